"""The server in this process, on a free loopback port, around an already loaded `Backend`: what the
tests and ``benchmarks/serve_latency.py`` run (a real uvicorn server, real sockets)."""
from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from liveavatar.serve.app import ServerState, create_app
from liveavatar.serve.backend import Backend
from liveavatar.serve.uploads import Limits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """``with LocalServer(backend, retention_s=5) as server: httpx.get(server.url + "/v1/health")``."""

    def __init__(self, backend: Backend, *, token: str | None = None, retention_s: float = 600.0,
                 max_per_client: int = 8, live_idle_limit_s: float = 30.0, default_size: str = "64*64",
                 max_area: int = 704 * 384, max_steps: int = 4, upload_mb: float = 50.0, max_audio_s: float = 600.0,
                 max_queued: int = 32, max_live_per_client: int = 2, **live):
        """``live``: the `ServerState`'s live fields (live_setting, live_lag_bound_s, tts_command)."""
        self.root = Path(tempfile.mkdtemp(prefix="liveavatar-serve-"))
        limits = Limits(upload_bytes=int(upload_mb * 2**20), audio_seconds=max_audio_s, max_area=max_area,
                        max_steps=max_steps, default_size=default_size)
        self.state = ServerState(backend=backend, root=self.root, limits=limits,
                                 retention_s=retention_s, max_per_client=max_per_client,
                                 live_idle_limit_s=live_idle_limit_s, token=token, max_queued=max_queued,
                                 max_live_per_client=max_live_per_client, **live)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/live"
        self._server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                     log_level="warning", timeout_graceful_shutdown=10))
        self._thread = threading.Thread(target=self._server.run, name="liveavatar-serve", daemon=True)

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.state.queue.stop()
        self._server.should_exit = True
        self._thread.join(30)
