"""`liveavatar serve` as a process: --help, the token rule, and Ctrl-C/SIGTERM stopping cleanly (running job
cancelled, the server's temp folder removed); the GPU latency script runs on the tiny checkpoints."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from liveavatar.serve import ui_extra_status
from liveavatar.serve.local import free_port
from test_serve_jobs import short_wav, tiny  # noqa: F401 (module fixtures)

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "liveavatar", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_serve_help_documents_the_flags():
    result = _cli("serve", "--help")
    assert result.returncode == 0
    for flag in ("--ckpt_dir", "--lora_path_dmd", "--host", "--port", "--token", "--max-size", "--retention",
                 "--max-queued-per-client", "--max-upload-mb", "--live-idle-limit"):
        assert flag in result.stdout


def test_listening_beyond_loopback_needs_a_token():
    result = _cli("serve", "--host", "0.0.0.0", env={**os.environ, "LIVEAVATAR_TOKEN": ""})
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --host 0.0.0.0: listening beyond this machine needs --token T (or "
                                     "$LIVEAVATAR_TOKEN) so that only your clients reach the GPU")


def test_the_ui_extra_is_reported_installed():
    assert ui_extra_status() == (True, "ui extra: installed (fastapi, uvicorn, python-multipart, websockets, "
                                       "swagger-ui-bundle)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly_mid_job(tiny, media_dir, short_wav, tmp_path, sig):
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    server = subprocess.Popen([sys.executable, "-m", "liveavatar", "serve", "--ckpt_dir", str(tiny.ckpt_dir),
                               "--lora_path_dmd", str(tiny.lora), "--device", "cpu", "--dtype", "float32",
                               "--port", str(port), "--size", "64*64"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/v1/health")
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        files = {"image": ("p.jpg", (media_dir / "cyclops_baker.jpg").read_bytes()),
                 "audio": ("s.wav", (media_dir / "cyclops_baker.wav").read_bytes())}
        job = httpx.post(url + "/v1/videos", files=files, data={"steps": "1"}).json()  # 7 clips: still running
        while httpx.get(f"{url}/v1/videos/{job['id']}").json()["progress"]["frames_done"] < 1:
            time.sleep(0.05)
        (work,) = list(tmp_path.glob("liveavatar-serve-*"))
        assert list(work.rglob("video.mp4"))  # the partial video exists
        server.send_signal(sig)
        assert server.wait(timeout=30) == 0, server.stderr.read()
        assert not work.exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        if server.poll() is None:
            server.kill()


def test_the_gpu_latency_benchmark_runs_on_the_tiny_checkpoints(tiny, media_dir, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_latency.py"), "--ckpt_dir",
                             str(tiny.ckpt_dir), "--lora_path_dmd", str(tiny.lora), "--device", "cpu", "--dtype",
                             "float32", "--size", "64*64", "--steps", "1", "--live-seconds", "3",
                             "--json", str(tmp_path / "latency.json")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads((tmp_path / "latency.json").read_text())
    assert set(report) >= {"submit_to_first_frame_s", "chunk_to_frames_p50_s", "chunk_to_frames_p95_s",
                           "live_blocks_per_s", "live_capacity_blocks_per_s"}
    assert report["submit_to_first_frame_s"] > 0 and report["live_blocks_per_s"] > 0
