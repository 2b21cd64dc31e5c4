"""An engine replica: one `Engine` (through the server's `Backend`) on its GPU(s), running jobs and live
sessions one at a time from its own `WorkQueue`, exactly as the single-process server does: a live
session here is the single-process `serve_live` itself, talking to a `RelayedSocket` instead of the client.

The ingress reaches it only through Ray Serve calls, each naming the replica in its ``replica`` keyword
(which `routing.PinnedOrShortestQueue` reads; the methods need not):

* ``run_job``: a streaming call; the job's resolved `Request` (portrait and waveform included) arrives as
  the call's argument, through Ray's object store, so no filesystem is shared; it yields the job's progress
  and the fragmented MP4's bytes as they are written, and the replica keeps no file once it ends;
* ``live``: a streaming call for the life of a session (so the session stays on this replica): everything
  the session sends the client (``("text", str)``, ``("bytes", data)``, then ``("close", code, reason)``),
  plus ``("alive",)`` every ``KEEPALIVE_S`` of silence so that the ingress notices a replica that stopped;
* ``push``: the client's WebSocket messages for a session, in order, as the ingress received them.

Leaving a streaming call (Serve cancels it on the replica) stops its work within one block. Every
``HEARTBEAT_S`` the replica tells the ingress who it is and how it is doing (for ``/v1/info`` and
``/metrics``).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable

from starlette.datastructures import Address
from starlette.websockets import WebSocketDisconnect

from liveavatar.serve.app import ServerState
from liveavatar.serve.cluster.metrics import Meter
from liveavatar.serve.cluster.settings import ClusterSettings
from liveavatar.serve.jobs import FINISHED, Job
from liveavatar.serve.live import serve_live

HEARTBEAT_S = 1.0
KEEPALIVE_S = 1.0
POLL_S = 0.05
CHUNK_BYTES = 1 << 20
LEFTOVER_RETENTION_S = 600.0
UNCAPPED = 1 << 30


class RelayedSocket:
    """The WebSocket `serve_live` talks to on a replica: the client's messages come in through
    `EngineReplica.push`, what the session sends goes out as the items of its ``live`` call."""

    def __init__(self, client: str):
        self.client = Address(client, 0)
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.meter = Meter()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def receive_text(self) -> str:
        message = await self.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message.get("text") or ""

    async def send_json(self, data) -> None:
        self.outgoing.put_nowait(("text", json.dumps(data)))

    async def send_text(self, data: str) -> None:
        self.outgoing.put_nowait(("text", data))

    async def send_bytes(self, data: bytes) -> None:
        self.meter.record(_frames_in(data))
        self.outgoing.put_nowait(("bytes", data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.outgoing.put_nowait(("close", code, reason or ""))

    def hang_up(self) -> None:
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})


class EngineReplica:
    async def __init__(self, load_backend: Callable, settings: ClusterSettings, shown: dict, ingress_name: str,
                       torch_threads: int | None):
        """``load_backend()`` -> (the replica's `Backend`, its live setting or None for the flags' own)."""
        from ray import serve

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        backend, live_setting = await asyncio.to_thread(load_backend)
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        # The single-process server's state around this replica's engine (its WorkQueue included); work comes
        # from the ingress, which enforces the queue and per-client caps across the cluster, and a finished job
        # is removed here as soon as its bytes went out (the retention is only the backstop for a lost call).
        self.state = ServerState(backend=backend, root=Path(tempfile.mkdtemp(prefix="liveavatar-replica-")),
                                 limits=settings.limits, retention_s=LEFTOVER_RETENTION_S, max_per_client=UNCAPPED,
                                 max_queued=UNCAPPED, max_live_per_client=UNCAPPED,
                                 live_idle_limit_s=settings.live_idle_limit_s,
                                 **settings.live_state(live_setting))
        self.settings = {**shown, "live": self.state.live_setting.info()}
        self.queue = self.state.queue
        self.queue.start()
        self.meter = Meter()
        self.sockets: dict[str, RelayedSocket] = {}
        self.started_at = time.time()
        self._ingress = serve.get_deployment_handle(ingress_name, app_name=context.app_name)
        self._heartbeat = asyncio.create_task(self._beat())

    def __del__(self):
        self.queue.stop()
        shutil.rmtree(self.state.root, ignore_errors=True)

    async def run_job(self, job_id: str, request, *, replica: str):
        job = Job(request=request, client="ingress", folder=self.queue.new_job_folder(), id=job_id)
        position = self.queue.submit(job)
        yield {"type": "assigned", "replica": self.id, "position": position}
        sent, blocks, frames, reported, said = 0, 0, 0, None, time.monotonic()
        try:
            while True:
                finished = job.state in FINISHED
                ready = job.stream_bytes
                while sent < ready:
                    data = await asyncio.to_thread(_read, job.video, sent, min(ready - sent, CHUNK_BYTES))
                    sent += len(data)
                    yield data
                if job.blocks_done > blocks:
                    new = job.blocks_done - blocks
                    for _ in range(new):
                        self.meter.record((job.frames_done - frames) // new)
                    blocks, frames = job.blocks_done, job.frames_done
                progress = {"type": "progress", "state": job.state, "position": self.queue.position(job),
                            "blocks_done": job.blocks_done, "blocks_total": job.blocks_total,
                            "frames_done": job.frames_done, "started_at": job.started}
                if progress != reported or time.monotonic() - said > KEEPALIVE_S:
                    reported, said = progress, time.monotonic()
                    yield progress
                if finished:
                    yield {"type": "end", "state": job.state, "error": job.error, "finished_at": job.finished}
                    return
                await asyncio.sleep(POLL_S)
        finally:
            if job.state not in FINISHED:
                self.queue.cancel(job)
            asyncio.get_running_loop().create_task(self._remove_when_finished(job))

    async def live(self, session_id: str, client: str, *, replica: str):
        socket = self.sockets[session_id] = RelayedSocket(client)
        session = asyncio.create_task(serve_live(socket, self.state))
        session.add_done_callback(lambda _: socket.outgoing.put_nowait(("close", 1000, "")))
        try:
            yield ("alive",)  # taken: the ingress starts sending the client's messages
            while True:
                try:
                    item = await asyncio.wait_for(socket.outgoing.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ("alive",)
                    continue
                if item[0] == "bytes":
                    self.meter.record(_frames_in(item[1]))
                yield item
                if item[0] == "close":
                    return
        finally:
            self.sockets.pop(session_id, None)
            socket.hang_up()
            session.cancel()

    async def push(self, session_id: str, messages: list[dict], *, replica: str) -> str | None:
        """A session's client messages (ASGI WebSocket messages), in order; a reason when it is gone."""
        socket = self.sockets.get(session_id)
        if socket is None:
            return "the session is over on its engine replica"
        for message in messages:
            socket.incoming.put_nowait(message)
        return None

    def describe(self) -> dict:
        import ray

        running = self.queue.running
        return {"id": self.id, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "started_at": self.started_at, "settings": self.settings,
                "running": None if running is None else "job" if isinstance(running, Job) else "live",
                "waiting": self.queue.waiting, "figures": self.meter.figures(), "gpu_memory": _gpu_memory(),
                "sessions": [{"id": session_id[:12], **socket.meter.figures()}
                             for session_id, socket in list(self.sockets.items())]}

    async def _beat(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._ingress.heartbeat.remote(self.describe()), HEARTBEAT_S * 2)
            except Exception:  # the ingress is restarting or busy: the next beat tells it
                pass
            await asyncio.sleep(HEARTBEAT_S)

    async def _remove_when_finished(self, job: Job) -> None:
        while job.state not in FINISHED:
            await asyncio.sleep(POLL_S)
        self.queue.delete(job)


def _frames_in(message: bytes) -> int:
    """The frames of a packed block (`protocol.pack_block`), from its header alone."""
    (length,) = struct.unpack(">I", message[:4])
    return len(json.loads(message[4:4 + length])["frame_bytes"])


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size)


def _gpu_memory() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "used": total - free, "total": total}
