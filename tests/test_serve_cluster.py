"""`liveavatar serve --cluster` on a local Ray instance (one per module, few CPUs, no dashboard, small
object store) with two engine replicas on the tiny checkpoints: sessions pinned to different replicas with
their own frames, jobs spread by shortest queue, back-pressure past the global cap, a replica killed mid-job
and mid-session, and an ingress restart that keeps the finished videos."""
import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from liveavatar.cli.serve import add_serve_arguments
from liveavatar.errors import InputError
from liveavatar.io.media import load_audio
from liveavatar.serve.client import stream_file
from liveavatar.cli.serve_cluster import application, cluster_flags
from liveavatar.serve.cluster.config import APP_NAME
from liveavatar.serve.local import free_port
from liveavatar.serve.protocol import from_pcm16, to_pcm16
from test_serve_jobs import probe, write_wav

SMALL = {"size": "64*64", "steps": "1"}
LIVE = {"size": "64*64", "steps": 1, "seed": 5, "realtime": False}
MAX_WAITING = 4


class Cluster:
    def __init__(self, url: str, store):
        self.url, self.ws_url, self.store = url, url.replace("http", "ws") + "/v1/live", store
        self.client = httpx.Client(base_url=url, timeout=30)

    def info(self) -> dict:
        return self.client.get("/v1/info").json()

    def replicas(self, count: int, timeout: float = 90, exclude=()) -> list[dict]:
        """The replicas once ``count`` of them (none in ``exclude``) answer heartbeats."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                listed = [r for r in self.info()["replicas"] if r["id"] not in exclude]
            except (httpx.HTTPError, ValueError, KeyError):
                listed = []
            if len(listed) >= count:
                return listed
            time.sleep(0.25)
        raise AssertionError(f"{count} replicas did not answer within {timeout} s")

    def submit(self, media_dir, audio, **fields) -> httpx.Response:
        files = {"image": ("portrait.jpg", (media_dir / "cyclops_baker.jpg").read_bytes()),
                 "audio": ("speech.wav", audio.read_bytes())}
        return self.client.post("/v1/videos", files=files, data={**SMALL, **fields})

    def wait(self, job_id, states=("done", "failed", "cancelled"), timeout=90) -> dict:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            try:
                status = self.client.get(f"/v1/videos/{job_id}").json()
                if status["state"] in states:
                    return status
            except httpx.HTTPError:
                pass  # the ingress is restarting
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {status}")


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    store = tmp_path_factory.mktemp("store")
    args = parser.parse_args(["--ckpt_dir", str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--device", "cpu",
                              "--dtype", "float32", "--cluster", "--replicas", "2", "--size", "64*64",
                              "--max-size", "64*64", "--max-waiting", str(MAX_WAITING), "--store", str(store)])
    flags = {**cluster_flags(args), "torch_threads": 1, "token": None}
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(flags), name=APP_NAME, route_prefix="/")
        running = Cluster(f"http://127.0.0.1:{port}", store)
        running.replicas(2)
        yield running
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def speech(media_dir):
    return from_pcm16(to_pcm16(load_audio(media_dir / "cyclops_baker.wav")))


@pytest.fixture(scope="module")
def short_wav(speech, tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("audio") / "short.wav", speech[:int(1.6 * 16000)])


@pytest.fixture(scope="module")
def long_wav(speech, tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("audio") / "long.wav", speech[:int(4.8 * 16000)])


def _in_thread(function, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", function(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def test_two_live_sessions_land_on_different_replicas_each_with_its_own_frames(cluster, media_dir, speech):
    image = media_dir / "cyclops_baker.jpg"
    first, second = speech[:int(1.6 * 16000)], speech[int(1.6 * 16000):int(3.2 * 16000)]
    runs = [_in_thread(stream_file, cluster.ws_url, image, audio, keep_frames=True, **LIVE) for audio in (first, second)]
    both_live = False
    while any(thread.is_alive() for thread, _ in runs):
        replicas = cluster.info()["replicas"]
        both_live |= len(replicas) == 2 and all(r["running"] == "live" and len(r["sessions"]) == 1 for r in replicas)
        time.sleep(0.1)
    results = [out["result"] for _, out in runs]
    assert both_live, "the two sessions never ran at the same time on the two replicas"
    for result in results:
        assert result.error is None and result.done["reason"] == "end" and len(result.blocks) == 4
    assert results[0].frames != results[1].frames
    alone = stream_file(cluster.ws_url, image, first, keep_frames=True, **LIVE)
    assert alone.frames == results[0].frames  # nothing of the other session leaked into it


def test_six_jobs_spread_over_both_replicas_and_come_back_as_mp4s(cluster, media_dir, short_wav):
    ids = [cluster.submit(media_dir, short_wav).json()["id"] for _ in range(6)]
    statuses = [cluster.wait(job_id) for job_id in ids]
    assert [s["state"] for s in statuses] == ["done"] * 6, statuses
    placed = [s["replica"] for s in statuses]
    assert len(set(placed)) == 2 and max(placed.count(r) for r in set(placed)) <= 4, placed
    video = cluster.client.get(f"/v1/videos/{ids[-1]}/content")
    assert video.status_code == 200 and probe(video.content)["frames"] == 40
    # Each replica lists its live setting, chosen on its own device (the tiny model's: the ladder's smallest).
    assert all(r["settings"]["live"]["size"] == "64*64" for r in cluster.info()["replicas"])
    metrics = cluster.client.get("/metrics").text
    assert "liveavatar_replicas 2" in metrics and 'liveavatar_jobs{state="done"}' in metrics
    rates = [line for line in metrics.splitlines() if line.startswith("liveavatar_replica_blocks_per_second{")]
    assert len(rates) == 2 and all(float(line.split()[-1]) > 0 for line in rates), rates


def test_past_the_global_cap_new_work_gets_503_with_retry_after_and_sessions_a_busy_answer(cluster, media_dir, long_wav):
    from websockets.sync.client import connect

    ids = [cluster.submit(media_dir, long_wav).json()["id"] for _ in range(2 + MAX_WAITING)]
    try:
        refused = cluster.submit(media_dir, long_wav)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.text
        assert "--max-waiting" in refused.json()["error"]
        with connect(cluster.ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"type": "start", "image": base64.b64encode(
                (media_dir / "cyclops_baker.jpg").read_bytes()).decode(), **LIVE}))
            answer = json.loads(ws.recv(timeout=10))
            assert answer["type"] == "busy" and answer["retry_after_s"] > 0
            with pytest.raises(Exception):
                ws.recv(timeout=10)
            assert ws.close_code == 1013
    finally:
        for job_id in ids:
            cluster.client.delete(f"/v1/videos/{job_id}")
    assert {cluster.wait(job_id)["state"] for job_id in ids} == {"cancelled"}


def test_a_killed_replica_fails_its_job_with_the_cause_spares_the_other_session_and_comes_back(
        cluster, media_dir, speech, short_wav, long_wav):
    image = media_dir / "cyclops_baker.jpg"
    other_thread, other = _in_thread(stream_file, cluster.ws_url, image, speech[:int(4.8 * 16000)], pace=1.0, **LIVE)
    deadline = time.monotonic() + 30
    while not (serving := [r["id"] for r in cluster.info()["replicas"] if r["running"] == "live"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job_id = cluster.submit(media_dir, long_wav).json()["id"]
    running = cluster.wait(job_id, states=("running",))
    victim = next(r for r in cluster.info()["replicas"] if r["id"] == running["replica"])
    assert victim["id"] != serving[0]  # the shortest queue: the replica without the session
    os.kill(victim["pid"], signal.SIGKILL)
    failed = cluster.wait(job_id, timeout=15)
    assert failed["state"] == "failed" and "engine replica running it stopped" in failed["error"], failed
    other_thread.join(60)
    session = other["result"]
    assert session.error is None and session.done["reason"] == "end" and len(session.blocks) == 11
    # Ray starts a new replica, and it takes work.
    replacement = cluster.replicas(2, exclude=(victim["id"],))
    assert len(replacement) == 2
    ids = [cluster.submit(media_dir, short_wav).json()["id"] for _ in range(2)]
    statuses = [cluster.wait(job_id) for job_id in ids]
    assert {s["state"] for s in statuses} == {"done"} and len({s["replica"] for s in statuses}) == 2


def _replica_running_live(cluster, timeout=10.0) -> dict:
    """The replica whose heartbeat says it runs the live session: /v1/info shows the last heartbeat (one a
    second), which can still predate the session's start when its first block arrives."""
    deadline = time.monotonic() + timeout
    while True:
        running = [r for r in cluster.info()["replicas"] if r["running"] == "live"]
        if running or time.monotonic() > deadline:
            assert len(running) == 1, cluster.info()["replicas"]
            return running[0]
        time.sleep(0.2)


def test_a_killed_replica_ends_its_live_session_with_an_error_and_a_clean_close_within_10_s(cluster, media_dir, speech):
    from websockets.sync.client import connect

    cluster.replicas(2)
    with connect(cluster.ws_url, open_timeout=10, max_size=2**26) as ws:
        ws.send(json.dumps({"type": "start", "image": base64.b64encode(
            (media_dir / "cyclops_baker.jpg").read_bytes()).decode(), **LIVE}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(to_pcm16(speech[:int(2.5 * 16000)]))  # a block needs 1 s of lookahead past its own audio
        assert isinstance(ws.recv(timeout=30), bytes)
        victim = _replica_running_live(cluster)
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        messages = []
        with pytest.raises(Exception):
            while True:
                messages.append(ws.recv(timeout=15))
        assert time.monotonic() - killed < 10
        errors = [json.loads(m) for m in messages if isinstance(m, str)]
        assert errors and errors[-1]["type"] == "error" and "engine replica" in errors[-1]["message"], messages
        assert ws.close_code == 1011


def test_an_ingress_restart_keeps_every_finished_video(cluster, media_dir, short_wav):
    job_id = cluster.submit(media_dir, short_wav).json()["id"]
    assert cluster.wait(job_id)["state"] == "done"
    before = cluster.client.get(f"/v1/videos/{job_id}/content").content
    ingress = cluster.info()["ingress"]
    os.kill(ingress["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            if cluster.info()["ingress"]["pid"] != ingress["pid"]:
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, "the ingress did not come back"
        time.sleep(0.25)
    assert cluster.client.get(f"/v1/videos/{job_id}").json()["state"] == "done"
    assert cluster.client.get(f"/v1/videos/{job_id}/content").content == before


def _parse(*flags) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["--cluster", *flags])


def test_the_serve_deploy_config_carries_the_replica_layout_and_never_the_token(tmp_path):
    import inspect

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from liveavatar.cli.serve_cluster import app_builder, run_cluster

    path = tmp_path / "serve.yaml"
    assert run_cluster(_parse("--write-config", str(path), "--min-replicas", "2", "--max-replicas", "8",
                              "--gpus-per-replica", "2", "--host", "0.0.0.0", "--token", "secret")) == 0
    text = path.read_text()
    assert "secret" not in text
    app = yaml.safe_load(text)["applications"][0]
    assert app["import_path"] == "liveavatar.cli.serve_cluster:app_builder" and app["args"]["require_token"]
    engine, ingress = app["deployments"]
    assert engine["autoscaling_config"]["min_replicas"] == 2 and engine["autoscaling_config"]["max_replicas"] == 8
    assert engine["ray_actor_options"]["num_gpus"] == 2
    assert engine["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 2}]
    assert engine["request_router_config"]["request_router_class"].endswith("routing:PinnedOrShortestQueue")
    assert ingress["num_replicas"] == 1
    ServeDeploySchema.model_validate(yaml.safe_load(text))  # what `serve deploy` checks first
    assert list(inspect.signature(app_builder).parameters) == ["flags"]  # Serve's builders take one argument


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2", "--max-replicas", "3"], "--replicas: give either a fixed count or --min-replicas/"
                                                 "--max-replicas, not both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 --max-replicas 2: need 1 <= min <= max"),
    (["--gpus-per-replica", "0"], "--gpus-per-replica 0: must be >= 1 for a GPU device (0 only with --device cpu)"),
])
def test_bad_cluster_flags_get_one_line(flags, message):
    with pytest.raises(InputError) as refused:
        cluster_flags(_parse(*flags))
    assert str(refused.value) == message


def test_a_cluster_address_that_is_not_ray_client_gets_one_line():
    result = subprocess.run([sys.executable, "-m", "liveavatar", "serve", "--cluster", "tcp://head:6379"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --cluster tcp://head:6379: expected auto or ray://HOST:PORT (Ray Client's address, port 10001 by "
        "default)")


def test_an_ingress_beyond_loopback_refuses_to_start_without_a_token(tiny, tmp_path, monkeypatch):
    from liveavatar.cli.serve import serve_limits
    from liveavatar.serve.cluster.ingress import Ingress
    from liveavatar.serve.cluster.settings import ClusterSettings

    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    settings = ClusterSettings(limits=serve_limits(_parse()), retention_s=60, max_per_client=8, live_idle_limit_s=30,
                               max_waiting=4, max_queued=32, max_live_per_client=2, store=str(tmp_path), token=None, require_token=True)
    with pytest.raises(InputError, match=r"set \$LIVEAVATAR_TOKEN in the environment of `ray start`"):
        Ingress(None, settings)
