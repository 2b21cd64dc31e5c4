"""The ASGI app: the jobs page at ``/``, the live page at ``/live``, the API under ``/v1``, the pages' own
assets (and Swagger UI's, for ``/v1/docs``, from the ``swagger-ui-bundle`` package: no CDN) under ``/assets``.

Why a page of our own instead of Gradio: the page must play the video while it is generated, which
needs a Media Source Extensions player fed from a byte stream, and the live page must exchange binary
WebSocket messages with the server; both are a few dozen lines of plain JavaScript, whereas Gradio's
components hand over finished files and would add a large dependency. FastAPI (Starlette) is the whole
stack, served by uvicorn.
"""
from __future__ import annotations

import asyncio
import secrets
import shlex
import shutil
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Awaitable, Callable

import anyio
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.serve.backend import Backend
from liveavatar.serve.fmp4 import MIME_TYPE
from liveavatar.serve.jobs import FINISHED, Job, QueueFull, ServerBusy, WorkQueue, error_line
from liveavatar.serve.live import serve_live
from liveavatar.options import DEFAULTS
from liveavatar.serve.live_setting import LiveSetting, choose_live_setting
from liveavatar.serve.tts import DEFAULT_TTS_COMMAND
from liveavatar.serve.uploads import (FILE_FIELDS, MAX_TEXT_FIELD, TEXT_FIELDS, Limits, MultipartReader, UploadTooLarge,
                                      job_request, read_image)

STREAM_POLL_S = 0.05
PAGE_ASSETS = ("ui.css", "ui.js", "favicon.svg")
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")
PUBLIC_PREFIXES = ("/assets/", "/favicon.ico")  # library code and an icon: no token needed, nothing secret


@dataclass
class ServerState:
    backend: Backend | None  # None where the engines run in other processes (`liveavatar.serve.cluster`)
    root: Path  # the server's own temp folder: every file it writes is below it
    limits: Limits
    retention_s: float
    max_per_client: int
    live_idle_limit_s: float
    token: str | None = None
    max_queued: int = 32  # jobs waiting, all clients together
    max_live_per_client: int = 2
    live_setting: LiveSetting | None = None  # the live sessions' setting (None: chosen without a speed model)
    live_lag_bound_s: float = DEFAULTS.live_lag_bound_s
    tts_command: str = DEFAULT_TTS_COMMAND
    # Where jobs and live sessions run, the one pluggable part: by default a `WorkQueue` on `backend` in this
    # process and `serve_live` on it; the cluster's ingress passes its own (same interface, engines elsewhere),
    # and what ``/v1/info`` adds about it (``extra_info``: its replicas).
    queue: WorkQueue | None = None
    live: Callable[[WebSocket, "ServerState"], Awaitable[None]] = serve_live
    extra_info: Callable[[], dict] | None = None
    images: "ImageStore" = field(init=False)

    def __post_init__(self):
        if self.live_setting is None:
            self.live_setting = choose_live_setting(None, max_area=self.limits.max_area, max_steps=self.limits.max_steps)
        if self.queue is None:
            self.queue = WorkQueue(self.backend, self.root, retention_s=self.retention_s,
                                   max_per_client=self.max_per_client, max_queued=self.max_queued,
                                   max_live_per_client=self.max_live_per_client)
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


def _installed(command: str) -> bool:
    """Whether the live session's ``say`` can speak: its TTS command's program is on PATH."""
    argv = shlex.split(command)
    return bool(argv) and shutil.which(argv[0]) is not None


def swagger_folder() -> Path | None:
    """Swagger UI's files from the ``swagger-ui-bundle`` package (the ui extra); None when it is missing, and
    then ``/v1/docs`` is neither served nor advertised."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(swagger_ui_path)


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

    # OpenAPI 3.0: the Swagger UI that swagger-ui-bundle ships (4.15) renders 3.0 documents, not 3.1 ones; this
    # API's description uses nothing of 3.1.
    app = FastAPI(title="liveavatar serve", lifespan=lifespan, docs_url=None, openapi_url="/v1/openapi.json",
                  redoc_url=None)
    app.openapi_version = "3.0.3"
    app.state.server = state
    if state.token:
        app.add_middleware(TokenGate, token=state.token)
    swagger = swagger_folder()

    @app.exception_handler(LiveAvatarError)
    async def refused(request, error: LiveAvatarError):
        status = 413 if isinstance(error, UploadTooLarge) else 429 if isinstance(error, QueueFull) else \
            400 if isinstance(error, InputError) else 503
        headers = {"Retry-After": str(error.retry_after_s)} \
            if isinstance(error, (QueueFull, ServerBusy)) and error.retry_after_s is not None else None
        return JSONResponse({"error": error_line(error)}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        """Starlette's own 404/405 answers in the API's shape, ``{"error": ...}``."""
        line = {404: f"no such page or endpoint: {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse({"error": line}, status_code=error.status_code, headers=error.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def jobs_page():
        return _page("index.html")

    @app.get("/live", response_class=HTMLResponse, include_in_schema=False)
    async def live_page():
        return _page("live.html")

    @app.get("/assets/{name}", include_in_schema=False)
    async def asset(name: str):
        if name in PAGE_ASSETS:
            return Response(_page(name), media_type={"css": "text/css", "js": "text/javascript",
                                                     "svg": "image/svg+xml"}[name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": "no-cache"})
        if swagger is not None and name in SWAGGER_ASSETS:
            return FileResponse(swagger / name, headers={"Cache-Control": "max-age=86400"})
        raise HTTPException(404)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(_page("favicon.svg"), media_type="image/svg+xml")

    if swagger is not None:
        @app.get("/v1/docs", response_class=HTMLResponse, include_in_schema=False)
        async def docs():
            return _page("docs.html")

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "queued": state.queue.waiting, "busy": state.queue.running is not None}

    @app.get("/v1/info")
    async def info():
        """What this server accepts, for clients that offer choices (the pages offer only these)."""
        limits = state.limits
        return {"sizes": limits.sizes(), "default_size": limits.default_size, "default_steps": limits.default_steps,
                "max_steps": limits.max_steps, "max_upload_bytes": limits.upload_bytes,
                "max_audio_s": limits.audio_seconds, "max_prompt_chars": MAX_TEXT_FIELD,
                "token_required": state.token is not None, "live": state.live_setting.info(),
                "tts": _installed(state.tts_command), "replicas": None,
                **(state.extra_info() if state.extra_info is not None else {})}

    @app.post("/v1/videos", status_code=202)
    async def submit(request: Request):
        folder = state.queue.new_job_folder()
        try:
            reader = await _read_form(request, folder, FILE_FIELDS, TEXT_FIELDS)
            video = await run_in_threadpool(job_request, folder, reader, state.limits)
            job = Job(request=video, client=_client(request), folder=folder)
            position = state.queue.submit(job)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": job.id, "state": job.state, "queue_position": position,
                "status_url": f"/v1/videos/{job.id}", "stream_url": f"/v1/videos/{job.id}/stream",
                "content_url": f"/v1/videos/{job.id}/content"}

    @app.get("/v1/videos")
    async def my_jobs(request: Request):
        """This client's jobs (by address), oldest first: how a client that lost an id finds or cancels it."""
        mine = sorted((job for job in list(state.queue.jobs.values()) if job.client == _client(request)),
                      key=lambda job: job.created)
        return {"jobs": [state.queue.status(job) for job in mine]}

    @app.get("/v1/videos/{job_id}")
    async def status(job_id: str):
        return state.queue.status(_job(job_id))

    @app.get("/v1/videos/{job_id}/content")
    async def content(job_id: str):
        job = _job(job_id)
        if job.state != "done":
            return _no_video(job)
        return FileResponse(job.video, media_type="video/mp4", filename=f"liveavatar-{job.id}.mp4")

    app.add_api_route("/v1/videos/{job_id}/content", content, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/videos/{job_id}/stream")
    async def stream(job_id: str, cancel_on_disconnect: bool = False):
        """The fragmented MP4 as it is written. It ends cleanly only once the job is done; see `JobStream`."""
        job = _job(job_id)
        if job.state in ("failed", "cancelled"):
            return _no_video(job)
        job.cancel_on_disconnect |= cancel_on_disconnect
        return JobStream(job, state.queue)

    def _no_video(job: Job) -> JSONResponse:
        """409 while the video is still coming, 410 when it never will."""
        if job.state in ("queued", "running"):
            return JSONResponse({"error": f"the job is {job.state}; the video is there once the state is done "
                                          f"(/stream plays it while it is made)"}, status_code=409)
        reason = f": {job.error}" if job.error else ""
        return JSONResponse({"error": f"the job is {job.state}{reason}; it has no video (submit it again)"},
                            status_code=410)

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


class JobStream(Response):
    """ASGI response: a job's video bytes as they are written, to one watcher.

    Watching never cancels: only ``DELETE`` does, or, for a job whose watcher asked for
    ``cancel_on_disconnect`` (the page does: a closed page frees the GPU), the last watcher leaving. The
    response ends cleanly only when the job is done; when it fails or is cancelled mid-stream the chunked
    body is cut off without its last chunk, so every client sees a truncated transfer (curl exit 18, httpx
    ``RemoteProtocolError``, a browser's failed read) instead of a clean 200 with part of a video.
    """

    def __init__(self, job: Job, queue: WorkQueue):  # a Response so that FastAPI hands it over as it is
        self.job, self.queue = job, queue
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        self.job.watchers += 1
        try:
            async with anyio.create_task_group() as group:
                async def until_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(until_disconnect)
                await self._send(send)
                group.cancel_scope.cancel()
        finally:
            self.job.watchers -= 1
            if self.job.watchers == 0 and self.job.cancel_on_disconnect and self.job.state not in FINISHED:
                self.queue.cancel(self.job)

    async def _send(self, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", MIME_TYPE.split(";")[0].encode()),
                                (b"x-content-type", MIME_TYPE.encode()), (b"cache-control", b"no-store")]})
        sent = 0
        while True:
            finished = self.job.state in FINISHED  # read before the byte count: once finished, the count is final
            ready = self.job.stream_bytes
            if ready > sent:
                try:
                    data = await asyncio.to_thread(_read_range, self.job.video, sent, ready)
                except FileNotFoundError:
                    return  # cancelled or failed: its partial file is gone; cut the response off
                sent += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            elif finished:
                if self.job.state == "done":
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return  # failed or cancelled: no final chunk, the client sees the transfer cut off
            else:
                await asyncio.sleep(STREAM_POLL_S)


def _read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(start)
        return file.read(end - start)


class TokenGate:
    """Every HTTP and WebSocket request must carry the token: ``Authorization: Bearer T`` or ``?token=T``
    (browsers cannot set headers on a WebSocket, and the page's own links carry it that way)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(PUBLIC_PREFIXES) or \
                self._allowed(scope):
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
