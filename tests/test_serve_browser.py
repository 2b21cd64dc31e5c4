"""The pages in headless Chromium (Debian's package, driven by Playwright; nothing is downloaded): the jobs
page goes idle -> queued -> preparing -> playing (its <video> plays before the job is done) -> done, offers
only what the server accepts, runs one job at a time, shows a refused upload and a lost server (with a retry
that resumes); the live page streams a file in, shows its metrics, sends no audio after `end` and can start
again after an error; the API docs render offline with a token. Each state is screenshotted (PNG) into
$LIVEAVATAR_SCREENSHOTS when set, else the test's temp folder. Skips with the reason when Chromium or
Playwright is not installed."""
import os
import shutil
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from liveavatar.serve.local import LocalServer
from test_serve_jobs import backend, short_wav, submit, tiny  # noqa: F401 (module fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture
def browser_page(tmp_path):
    """A page that records uncaught errors and console errors (a 404 favicon, a failed fetch) in ``problems``."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (CI installs Debian's chromium package; `apt-get install chromium`)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.problems = []
            page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
            page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
            yield page
        finally:
            browser.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("LIVEAVATAR_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return lambda page, name: page.screenshot(path=str(folder / f"{name}.png"))


def state(page) -> str:
    return page.evaluate("document.getElementById('status').dataset.state")


def wait_state(page, *states, timeout=120_000):
    page.wait_for_function(f"{list(states)}.includes(document.getElementById('status').dataset.state)",
                           timeout=timeout)


@pytest.fixture
def slow_start(backend, monkeypatch):
    """Each job's first block comes 1.5 s late, as a real server's prompt, portrait and first compile do, so
    that the page's "preparing" state is there to see."""
    real_job = backend.job

    def job(spec):
        time.sleep(1.5)
        return real_job(spec)

    monkeypatch.setattr(backend, "job", job)


def test_the_jobs_page_from_idle_to_done_plays_while_running_and_runs_one_job_at_a_time(
        browser_page, backend, tiny, media_dir, short_wav, slow_start, shots):
    page = browser_page
    with LocalServer(backend, max_area=320 * 192) as server, httpx.Client(base_url=server.url, timeout=60) as api:
        page.goto(server.url + "/")
        wait_state(page, "idle")
        assert page.is_disabled("#submit")  # nothing chosen yet
        info = api.get("/v1/info").json()
        assert page.eval_on_selector_all("#size option", "options => options.map(o => o.value)") == info["sizes"]
        assert page.input_value("#size") == info["default_size"] == "64*64"
        page.set_input_files("#image", str(media_dir / "cyclops_baker.jpg"))
        page.set_input_files("#audio", str(short_wav))
        assert page.is_visible("#preview") and page.is_enabled("#submit")
        page.select_option("#size", "64*64")
        page.fill("#steps", "1")
        shots(page, "jobs-idle")
        ahead = submit(api, media_dir, short_wav)  # another client's job holds the engine
        assert ahead.status_code == 202
        page.click("#submit")
        wait_state(page, "queued")
        shots(page, "jobs-queued")
        assert page.is_disabled("#submit") and page.is_enabled("#cancel")
        page.evaluate("document.getElementById('form').requestSubmit()")  # a second submit does nothing
        wait_state(page, "preparing")
        shots(page, "jobs-preparing")
        mine = [job for job in api.get("/v1/videos").json()["jobs"] if job["id"] != ahead.json()["id"]]
        assert len(mine) == 1, mine
        job_id, playing_while_running = mine[0]["id"], None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = page.evaluate("document.getElementById('video').currentTime")
            job_state = api.get(f"/v1/videos/{job_id}").json()["state"]
            if current > 0 and job_state == "running":
                playing_while_running = current
                break
            assert job_state in ("queued", "running"), f"the job ended ({job_state}) before the video played"
            time.sleep(0.05)
        assert playing_while_running, "the <video> did not start playing while the job ran"
        wait_state(page, "playing")
        shots(page, "jobs-playing")
        wait_state(page, "done")
        assert page.is_visible("#download") and page.is_enabled("#submit") and page.is_disabled("#cancel")
        assert "done: 1.6 s of video" in page.text_content("#status")
        shots(page, "jobs-done")
        page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shots(page, "jobs-done-phone")
    assert page.problems == []


def test_the_jobs_page_shows_a_refusal_and_a_lost_server_with_a_retry_that_resumes(browser_page, backend, tiny,
                                                                                    media_dir, short_wav, slow_start,
                                                                                    tmp_path, shots):
    page = browser_page
    (tmp_path / "notes.jpg").write_text("not a picture")
    with LocalServer(backend) as server:
        page.goto(server.url + "/")
        wait_state(page, "idle")
        page.set_input_files("#image", str(tmp_path / "notes.jpg"))
        page.set_input_files("#audio", str(short_wav))
        page.click("#submit")
        wait_state(page, "error")
        assert page.text_content("#status-detail") == "--image notes.jpg: not an image file Pillow can read"
        assert page.is_enabled("#submit")
        shots(page, "jobs-error")
        page.set_input_files("#image", str(media_dir / "cyclops_baker.jpg"))
        page.fill("#steps", "1")
        page.click("#submit")
        wait_state(page, "preparing", "playing")
        page.route("**/v1/**", lambda route: route.abort())  # the server is gone, as the page sees it
        wait_state(page, "offline")
        assert page.is_visible("#status-action") and page.is_disabled("#cancel") and page.is_disabled("#submit")
        shots(page, "jobs-server-gone")
        page.click("#status-action")  # still gone: still offline, no uncaught error
        wait_state(page, "offline")
        page.unroute("**/v1/**")
        page.click("#status-action")
        wait_state(page, "done")
    assert [p for p in page.problems if "Failed to load resource" not in p] == []  # the aborted requests only


def test_the_live_page_streams_a_file_shows_its_metrics_and_sends_nothing_after_end(browser_page, backend, tiny,
                                                                                    media_dir, short_wav, shots):
    page = browser_page
    # Every WebSocket message the page sends, in order: no audio may follow "end"; and the rtf of every block
    # header the page decodes.
    page.add_init_script("""
        window.sent = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
          window.sent.push(typeof data === "string" ? JSON.parse(data).type : "audio");
          return send.call(this, data);
        };
        window.rtfs = [];
        const decode = TextDecoder.prototype.decode;
        TextDecoder.prototype.decode = function (...args) {
          const text = decode.apply(this, args);
          try { const header = JSON.parse(text); if (header.type === "block") window.rtfs.push(header.rtf); } catch {}
          return text;
        };""")
    with LocalServer(backend) as server:
        page.goto(server.url + "/live")
        wait_state(page, "idle")
        assert page.input_value("#size") == "auto"  # the server's live setting, offered first
        page.set_input_files("#image", str(media_dir / "cyclops_baker.jpg"))
        page.select_option("#source", "file")
        page.set_input_files("#audio", str(short_wav))
        page.select_option("#size", "64*64")
        page.fill("#steps", "1")
        shots(page, "live-idle")
        page.click("#start")
        wait_state(page, "preparing", "playing")
        tts = httpx.get(server.url + "/v1/info").json()["tts"]
        assert page.is_visible("#say-box") is tts
        if tts:  # typed text for the server to speak
            page.fill("#say-text", "hi")
            page.click("#say")
        wait_state(page, "playing")
        page.wait_for_function("document.querySelector('#m-latency b').textContent.endsWith(' ms')", timeout=120_000)
        shots(page, "live-playing")
        wait_state(page, "done")
        assert page.is_enabled("#start") and page.is_disabled("#end")
        shots(page, "live-done")
        sent = page.evaluate("window.sent")
        rtfs = sorted(page.evaluate("window.rtfs")[-20:])
        # The tile shows the median block, not the last one (the first block's time holds the decoder's warm-up),
        # rounded as JavaScript's toFixed rounds a tie (2.125 -> 2.13; Python's format gives 2.12).
        median = Decimal(rtfs[len(rtfs) // 2]).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        assert page.text_content("#m-rtf b") == f"{median}× real time", rtfs
    assert sent[0] == "start" and sent.count("end") == 1 and "audio" not in sent[sent.index("end"):], sent
    assert ("say" in sent) is tts
    assert page.problems == []


def test_the_live_page_can_start_again_after_an_error_and_shows_a_lost_server(browser_page, backend, tiny,
                                                                             media_dir, tmp_path, shots):
    page = browser_page
    (tmp_path / "notes.jpg").write_text("not a picture")
    with LocalServer(backend) as server:
        page.goto(server.url + "/live")
        wait_state(page, "idle")
        page.set_input_files("#image", str(tmp_path / "notes.jpg"))
        page.wait_for_function("document.getElementById('placeholder').textContent === "
                               "'this file does not show as a picture here'")  # no broken image on the stage
        page.click("#start")
        wait_state(page, "error")
        assert page.text_content("#status-detail") == "--image image: not an image file Pillow can read"
        page.wait_for_function("!document.getElementById('start').disabled")
        shots(page, "live-error")
    page.click("#start")  # the server is gone: the connection fails
    wait_state(page, "offline")
    assert page.is_visible("#status-action") and page.is_enabled("#start")
    shots(page, "live-server-gone")
    assert [p for p in page.problems if "WebSocket connection" not in p] == []


def test_the_api_docs_render_offline_with_a_token(browser_page, backend, tiny):
    page = browser_page
    with LocalServer(backend, token="a-long-enough-secret") as server:
        page.goto(server.url + "/v1/docs?token=a-long-enough-secret")
        page.wait_for_selector(".opblock", timeout=30_000)  # the operations, from the token-guarded openapi.json
        assert "/v1/videos" in page.text_content("#swagger-ui")
    assert page.problems == []
