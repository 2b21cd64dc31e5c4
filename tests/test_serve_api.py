"""The jobs API as a client meets it (issue 23): what the server accepts (/v1/info), watchers that never cancel
and cut-off streams that read as errors, the job list and the queue caps, error bodies, HEAD, the docs
served without a CDN and usable with a token. A real uvicorn server on the tiny checkpoints."""
import base64
import json
import shutil

import httpx
import pytest

pytest.importorskip("fastapi")

from liveavatar.cli.serve import check_host, server_url
from liveavatar.errors import InputError
from liveavatar.serve.local import LocalServer
from liveavatar.serve.uploads import form_options
from test_serve_jobs import backend, server, short_wav, submit, tiny, wait  # noqa: F401 (module fixtures)


def test_info_offers_only_what_the_server_accepts(backend, tiny):
    with LocalServer(backend, default_size="64*64", max_area=320 * 192, max_steps=2, upload_mb=3,
                     max_audio_s=20) as server:
        info = httpx.get(server.url + "/v1/info").json()
    assert info["sizes"] == ["320*192", "64*64"]  # the offered ladder cut at --max-size, and the default
    assert (info["default_size"], info["default_steps"], info["max_steps"]) == ("64*64", 2, 2)
    assert (info["max_upload_bytes"], info["max_audio_s"], info["max_prompt_chars"]) == (3 * 2**20, 20, 4096)
    assert info["token_required"] is False and info["replicas"] is None
    assert info["live"] == server.state.live_setting.info()  # the server's live setting (--live auto)
    assert info["tts"] is (shutil.which("espeak-ng") is not None)  # the default --tts-command
    limits = server.state.limits
    for size in info["sizes"]:  # every offered size passes the server's own checks, at the default steps
        assert form_options({"size": size}, limits).sample_steps == 2  # not 4: above --max-steps 2
    with pytest.raises(InputError, match="above this server's limit"):
        form_options({"size": "384*256"}, limits)


def test_a_watcher_leaving_never_cancels_and_the_other_watcher_gets_the_whole_video(server, media_dir, short_wav):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, media_dir, short_wav).json()
        with client.stream("GET", job["stream_url"]) as first:
            chunks = first.iter_bytes()
            streamed = next(chunks)
            with client.stream("GET", job["stream_url"]) as second:
                next(second.iter_bytes())  # the second watcher leaves after its first fragment
            streamed += b"".join(chunks)
        assert wait(client, job["id"])["state"] == "done"
        assert client.get(job["content_url"]).content == streamed
        head = client.head(job["content_url"])
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(streamed)


def test_the_last_watcher_of_a_job_that_asked_leaving_cancels_it_within_a_block(server, media_dir, short_wav):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first = submit(client, media_dir, short_wav).json()
        second = submit(client, media_dir, short_wav).json()
        with client.stream("GET", first["stream_url"] + "?cancel_on_disconnect=true") as stream:
            next(stream.iter_bytes())  # the first fragment: the job is under way
        blocks_when_left = client.get(first["status_url"]).json()["progress"]["blocks_done"]
        final = wait(client, first["id"])
        assert final["state"] == "cancelled"
        assert final["progress"]["blocks_done"] <= blocks_when_left + 1
        assert wait(client, second["id"])["state"] == "done"  # the engine went on to the next job


def test_a_stream_cut_by_a_cancel_ends_as_an_error_not_a_clean_200(server, media_dir, short_wav):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, media_dir, short_wav).json()
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("GET", job["stream_url"]) as stream:
                for number, _ in enumerate(stream.iter_bytes()):
                    if number == 0:
                        client.delete(job["status_url"])
        assert wait(client, job["id"])["state"] == "cancelled"
        gone = client.get(job["content_url"])
        assert gone.status_code == 410
        assert gone.json()["error"] == "the job is cancelled; it has no video (submit it again)"
        assert client.get(job["stream_url"]).status_code == 410


def test_a_client_lists_its_own_jobs_only(server, media_dir, short_wav):
    other = httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with httpx.Client(base_url=server.url, timeout=60) as client, other:
        mine = [submit(client, media_dir, short_wav).json()["id"] for _ in range(2)]
        theirs = submit(other, media_dir, short_wav).json()["id"]
        assert [job["id"] for job in client.get("/v1/videos").json()["jobs"]] == mine
        listed = other.get("/v1/videos").json()["jobs"]
        assert [job["id"] for job in listed] == [theirs] and listed[0]["state"] in ("queued", "running")
        for job_id in mine + [theirs]:
            client.delete(f"/v1/videos/{job_id}")


def test_a_global_queue_cap_answers_429_with_retry_after_across_clients(backend, tiny, media_dir, short_wav):
    with LocalServer(backend, max_queued=2) as server:
        clients = [httpx.Client(base_url=server.url, timeout=60,
                                transport=httpx.HTTPTransport(local_address=f"127.0.0.{n}")) for n in (1, 2, 3)]
        answers = [submit(clients[n % 3], media_dir, short_wav) for n in range(4)]  # one runs, two wait
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert answers[3].json()["error"].startswith("the server's queue is full (2 jobs waiting, --max-queued)")
        assert int(answers[3].headers["retry-after"]) >= 1
        for answer in answers[:3]:
            clients[0].delete(answer.json()["status_url"])
        for client in clients:
            client.close()


def test_a_client_gets_at_most_its_cap_of_live_sessions(backend, tiny, media_dir):
    from websockets.sync.client import connect

    image = base64.b64encode((media_dir / "cyclops_baker.jpg").read_bytes()).decode()
    start = json.dumps({"type": "start", "image": image, "size": "64*64", "steps": 1, "idle_limit_s": 5})
    with LocalServer(backend, max_live_per_client=1) as server, connect(server.ws_url) as first:
        first.send(start)
        assert json.loads(first.recv())["type"] in ("ready", "queued")
        with connect(server.ws_url) as second:
            second.send(start)
            refused = json.loads(second.recv())
            assert refused["type"] == "error"
            assert "1 live sessions waiting or running, the server's limit (--max-live-per-client)" in refused["message"]


def test_errors_are_error_bodies(server, media_dir, short_wav):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        missing = client.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json() == {"error": "no such page or endpoint: /v1/nothing"}
        wrong = client.post("/v1/health")
        assert wrong.status_code == 405 and wrong.json() == {"error": "POST is not allowed on /v1/health"}
        job = submit(client, media_dir, short_wav).json()
        early = client.get(job["content_url"])
        assert early.status_code == 409 and "once the state is done" in early.json()["error"]
        client.delete(job["status_url"])


def test_the_docs_are_served_from_the_package_and_work_with_a_token(backend, tiny):
    with LocalServer(backend, token="a-long-enough-secret") as server:
        page = httpx.get(server.url + "/v1/docs?token=a-long-enough-secret")
        assert page.status_code == 200 and "/assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text
        script = httpx.get(server.url + "/assets/swagger-ui-bundle.js")  # library code: no token needed
        assert script.status_code == 200 and "SwaggerUIBundle" in script.text
        assert httpx.get(server.url + "/v1/openapi.json").status_code == 401
        described = httpx.get(server.url + "/v1/openapi.json", headers={"Authorization": "Bearer a-long-enough-secret"})
        assert "/v1/videos" in described.json()["paths"]
        assert httpx.get(server.url + "/assets/../v1/health").status_code in (401, 404)


def test_the_banner_brackets_ipv6_and_a_short_token_is_refused():
    assert server_url("::1", 17861) == "http://[::1]:17861/"
    assert server_url("127.0.0.1", 7860) == "http://127.0.0.1:7860/"
    with pytest.raises(InputError, match=r"--token: 1 character is too short .*at least 16"):
        check_host("0.0.0.0", "x")
    check_host("0.0.0.0", "x" * 16)
    check_host("::1", None)
