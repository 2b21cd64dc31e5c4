"""The ASGI app: the jobs page at ``/``, the live page at ``/live``, the API under ``/v1``.

Why a page of our own instead of Gradio: the page must play the video while it is generated, which
needs a Media Source Extensions player fed from a byte stream, and the live page must exchange binary
WebSocket messages with the server; both are a few dozen lines of plain JavaScript, whereas Gradio's
components hand over finished files and would add a large dependency. FastAPI (Starlette) is the whole
stack, served by uvicorn.
"""
from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.serve.backend import Backend
from liveavatar.serve.fmp4 import MIME_TYPE
from liveavatar.serve.jobs import FINISHED, Job, QueueFull, ServerBusy, WorkQueue, error_line
from liveavatar.serve.live import serve_live
from liveavatar.serve.live_setting import LiveSetting, choose_live_setting
from liveavatar.serve.tts import DEFAULT_TTS_COMMAND
from liveavatar.serve.uploads import (FILE_FIELDS, TEXT_FIELDS, Limits, MultipartReader, UploadTooLarge, job_request,
                                      read_image)

STREAM_POLL_S = 0.05


@dataclass
class ServerState:
    backend: Backend | None  # None where the engines run in other processes (`liveavatar.serve.cluster`)
    root: Path  # the server's own temp folder: every file it writes is below it
    limits: Limits
    retention_s: float
    max_per_client: int
    live_idle_limit_s: float
    token: str | None = None
    live_setting: LiveSetting | None = None  # the live sessions' setting (None: chosen without a speed model)
    live_lag_bound_s: float = 2.0
    tts_command: str = DEFAULT_TTS_COMMAND
    # Where jobs and live sessions run, the one pluggable part: by default a `WorkQueue` on `backend` in this
    # process and `serve_live` on it; the cluster's ingress passes its own (same interface, engines elsewhere).
    queue: WorkQueue | None = None
    live: Callable[[WebSocket, "ServerState"], Awaitable[None]] = serve_live
    images: "ImageStore" = field(init=False)

    def __post_init__(self):
        if self.live_setting is None:
            self.live_setting = choose_live_setting(None, max_area=self.limits.max_area, max_steps=self.limits.max_steps)
        if self.queue is None:
            self.queue = WorkQueue(self.backend, self.root, retention_s=self.retention_s,
                                   max_per_client=self.max_per_client)
        self.images = ImageStore(self.root / "images", self.retention_s)


@dataclass
class ImageStore:
    """Portraits uploaded ahead of a live session (``image_id`` in its start message), kept ``retention_s``."""

    folder: Path
    retention_s: float
    added: dict[str, float] = field(default_factory=dict)

    def new_path(self) -> tuple[str, Path]:
        self.folder.mkdir(exist_ok=True)
        self._expire()
        image_id = secrets.token_hex(8)
        self.added[image_id] = time.time()
        return image_id, self.folder / image_id

    def get(self, image_id: str) -> Path | None:
        self._expire()
        return self.folder / image_id if image_id in self.added else None

    def remove(self, image_id: str) -> None:
        self.added.pop(image_id, None)
        (self.folder / image_id).unlink(missing_ok=True)

    def _expire(self) -> None:
        for image_id, added in list(self.added.items()):
            if added + self.retention_s <= time.time():
                self.remove(image_id)


def _page(name: str) -> str:
    return resources.files("liveavatar.serve").joinpath("static", name).read_text()


def _client(request: Request | WebSocket) -> str:
    return request.client.host if request.client else "unknown"


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.queue.join)
            shutil.rmtree(state.root, ignore_errors=True)

    app = FastAPI(title="liveavatar serve", lifespan=lifespan, docs_url="/v1/docs", openapi_url="/v1/openapi.json",
                  redoc_url=None)
    app.state.server = state
    if state.token:
        app.add_middleware(TokenGate, token=state.token)

    @app.exception_handler(LiveAvatarError)
    async def refused(request, error: LiveAvatarError):
        status = 413 if isinstance(error, UploadTooLarge) else 429 if isinstance(error, QueueFull) else \
            400 if isinstance(error, InputError) else 503
        headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, ServerBusy) else None
        return JSONResponse({"error": error_line(error)}, status_code=status, headers=headers)

    @app.get("/", response_class=HTMLResponse)
    async def jobs_page():
        return _page("index.html")

    @app.get("/live", response_class=HTMLResponse)
    async def live_page():
        return _page("live.html")

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "queued": state.queue.waiting, "busy": state.queue.running is not None}

    @app.post("/v1/videos", status_code=202)
    async def submit(request: Request):
        folder = state.queue.new_job_folder()
        try:
            reader = await _read_form(request, folder, FILE_FIELDS, TEXT_FIELDS)
            spec = await run_in_threadpool(job_request, folder, reader, state.limits)
            job = Job(spec=spec, client=_client(request), folder=folder)
            position = state.queue.submit(job)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": job.id, "state": job.state, "queue_position": position,
                "status_url": f"/v1/videos/{job.id}", "stream_url": f"/v1/videos/{job.id}/stream",
                "content_url": f"/v1/videos/{job.id}/content"}

    @app.get("/v1/videos/{job_id}")
    async def status(job_id: str):
        return state.queue.status(_job(job_id))

    @app.get("/v1/videos/{job_id}/content")
    async def content(job_id: str):
        job = _job(job_id)
        if job.state != "done":
            detail = f"the job is {job.state}" + (f": {job.error}" if job.error else "")
            return JSONResponse({"error": f"{detail}; the video is there once the state is done"}, status_code=409)
        return FileResponse(job.video, media_type="video/mp4", filename=f"liveavatar-{job.id}.mp4")

    @app.get("/v1/videos/{job_id}/stream")
    async def stream(job_id: str):
        job = _job(job_id)
        if job.state in ("failed", "cancelled"):
            return JSONResponse({"error": f"the job is {job.state}"}, status_code=409)
        return StreamingResponse(_follow(job), media_type=MIME_TYPE.split(";")[0],
                                 headers={"X-Content-Type": MIME_TYPE, "Cache-Control": "no-store"})

    async def _follow(job: Job):
        """The video's bytes as they are written; a client that leaves before the end cancels the job (a
        closed page frees the GPU for the next one)."""
        sent = 0
        try:
            while True:
                ready, finished = job.stream_bytes, job.state in FINISHED
                if ready > sent:
                    with open(job.video, "rb") as file:
                        file.seek(sent)
                        data = file.read(ready - sent)
                    sent += len(data)
                    yield data
                elif finished:
                    return
                else:
                    await asyncio.sleep(STREAM_POLL_S)
        finally:
            if job.state not in FINISHED:
                state.queue.cancel(job)

    @app.delete("/v1/videos/{job_id}")
    async def cancel(job_id: str):
        job = _job(job_id)
        if job.state in FINISHED:
            state.queue.delete(job)
            return {"id": job.id, "state": job.state, "deleted": True}
        state.queue.cancel(job)
        return {"id": job.id, "state": "cancelled" if job.state == "cancelled" else "cancelling"}

    @app.post("/v1/images", status_code=201)
    async def upload_image(request: Request):
        image_id, path = state.images.new_path()
        try:
            reader = await _read_form(request, path.parent, ("image",), (), target=path)
            if "image" not in reader.files:
                raise InputError("--image: required (upload the portrait as the 'image' file field)")
            await run_in_threadpool(read_image, path, reader.files["image"])
        except BaseException:
            state.images.remove(image_id)
            raise
        return {"image_id": image_id, "expires_at": time.time() + state.retention_s}

    @app.websocket("/v1/live")
    async def live(websocket: WebSocket):
        await state.live(websocket, state)

    def _job(job_id: str) -> Job:
        job = state.queue.jobs.get(job_id)
        if job is None:
            raise _NotFound(f"no job {job_id[:40]!r} (unknown, deleted, or past the server's retention time)")
        return job

    @app.exception_handler(_NotFound)
    async def not_found(request, error):
        return JSONResponse({"error": str(error)}, status_code=404)

    async def _read_form(request: Request, folder: Path, files, texts, target: Path | None = None) -> MultipartReader:
        declared = int(request.headers.get("content-length") or 0)
        if declared > len(files) * state.limits.upload_bytes + 2**20:
            raise UploadTooLarge(f"the request is {declared / 2**20:.1f} MiB, over this server's "
                                 f"{state.limits.upload_bytes / 2**20:g} MiB per file limit (--max-upload-mb)")
        reader = MultipartReader(request.headers.get("content-type", ""), folder, file_fields=files,
                                 text_fields=texts, max_file_bytes=state.limits.upload_bytes, target=target)
        try:
            async for chunk in request.stream():
                reader.feed(chunk)
            reader.finish()
        finally:
            reader.close()
        return reader

    return app


class _NotFound(Exception):
    pass


class TokenGate:
    """Every HTTP and WebSocket request must carry the token: ``Authorization: Bearer T`` or ``?token=T``
    (browsers cannot set headers on a WebSocket, and the page's own links carry it that way)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": "missing or wrong token"})
            return
        response = JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer TOKEN' or ?token=TOKEN"},
                                status_code=401)
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.lower().startswith(b"bearer "):
                given = value[7:].strip()
        if not given:
            from urllib.parse import parse_qs

            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
            given = values[0].encode() if values else b""
        return secrets.compare_digest(given, self.token)


class StoppingServer(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C / SIGTERM first stops the queue (cancels the running job, so that
    open video streams end; uvicorn's graceful shutdown waits for them) and exits 0 after a clean stop
    instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, *, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame):
        self.on_exit()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
