"""The jobs page in headless Chromium (Debian's package, driven by Playwright; nothing is downloaded): it
submits a job with the shared media and its <video> plays (currentTime advances) before the job is done.
Skips with the reason when Chromium or Playwright is not installed."""
import shutil
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from liveavatar.serve.local import LocalServer
from test_serve_jobs import backend, short_wav, tiny  # noqa: F401 (module fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture
def browser_page(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (CI installs Debian's chromium package; `apt-get install chromium`)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_page_plays_the_video_before_the_job_is_done(browser_page, backend, tiny, media_dir, short_wav,
                                                          tmp_path):
    page = browser_page
    with LocalServer(backend) as server:
        page.goto(server.url + "/")
        page.set_input_files("#image", str(media_dir / "cyclops_baker.jpg"))
        page.set_input_files("#audio", str(short_wav))
        page.fill("#size", "64*64")
        page.fill("#steps", "1")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.includes('job ')")
        job_id = page.evaluate("document.getElementById('status').textContent.split(' ')[1].replace(':', '')")
        playing_while_running = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = page.evaluate("document.getElementById('video').currentTime")
            state = httpx.get(f"{server.url}/v1/videos/{job_id}").json()["state"]
            if current > 0 and state == "running":
                playing_while_running = current
                page.screenshot(path=str(tmp_path / "playing.png"))
                break
            assert state in ("queued", "running"), f"the job ended ({state}) before the video played"
            time.sleep(0.05)
        assert playing_while_running, "the <video> did not start playing while the job ran"
        page.wait_for_function("document.getElementById('status').textContent.includes(': done')", timeout=120_000)
        assert page.is_visible("#download")
        page.screenshot(path=str(tmp_path / "done.png"))
    assert (tmp_path / "playing.png").stat().st_size > 0


def test_the_live_page_streams_a_file_in_and_shows_the_avatar_with_its_latency(browser_page, backend, tiny, media_dir,
                                                                               short_wav, tmp_path):
    page = browser_page
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with LocalServer(backend) as server:
        page.goto(server.url + "/live")
        page.set_input_files("#image", str(media_dir / "cyclops_baker.jpg"))
        page.select_option("#source", "file")
        page.set_input_files("#audio", str(short_wav))
        page.fill("#size", "64*64")
        page.fill("#steps", "1")
        page.click("#start")
        page.wait_for_function("document.getElementById('status').textContent.includes('latency: audio in')",
                               timeout=120_000)
        assert "ms (median" in page.text_content("#status")
        page.wait_for_function("!document.getElementById('start').disabled", timeout=120_000)  # 'done' came
        page.screenshot(path=str(tmp_path / "live.png"))
    assert errors == []
