"""An engine replica: one `Engine` (through the server's `Backend`) on its GPU(s), running jobs and live
sessions one at a time from its own `WorkQueue`, exactly as the single-process server does.

The ingress reaches it only through Ray Serve calls, each naming the replica in its ``replica`` keyword
(which `routing.PinnedOrShortestQueue` reads; the methods need not):

* ``run_job``: a streaming call; the job's resolved `Request` (portrait and waveform included) arrives as
  the call's argument, through Ray's object store, so no filesystem is shared; it yields the job's progress
  and the fragmented MP4's bytes as they are written, and the replica keeps no file once it ends;
* ``live``: a streaming call for the life of a session (so the session stays on this replica): the ready /
  queued / done / error messages and each block already packed for the wire, plus a keep-alive every
  ``KEEPALIVE_S`` so that the ingress notices a replica that stopped answering;
* ``push``: the session's client messages (audio, end, interrupt), sent to this replica by name.

Leaving a streaming call (Serve cancels it on the replica) stops its work within one block. Every
``HEARTBEAT_S`` the replica tells the ingress who it is and how it is doing (for ``/v1/info`` and
``/metrics``).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from liveavatar.serve.cluster.metrics import Meter
from liveavatar.serve.jobs import FINISHED, Job, WorkQueue, error_line
from liveavatar.serve.live import LiveOptions, LiveSession
from liveavatar.serve.backend import LiveSpec
from liveavatar.serve.live_audio import PushedAudio
from liveavatar.serve.protocol import from_pcm16

HEARTBEAT_S = 1.0
KEEPALIVE_S = 1.0
POLL_S = 0.05
CHUNK_BYTES = 1 << 20
LEFTOVER_RETENTION_S = 600.0


@dataclass
class _OpenSession:
    session: LiveSession
    meter: Meter = field(default_factory=Meter)
    leftover: bytes = b""


class EngineReplica:
    async def __init__(self, flags: dict, ingress_name: str):
        from ray import serve

        args = argparse.Namespace(**flags)
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        self.settings = _settings(args)
        self.backend = await asyncio.to_thread(self.load, args)
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.root = Path(tempfile.mkdtemp(prefix="liveavatar-replica-"))
        # Jobs come from the ingress, which enforces the per-client caps; a finished one is removed here as
        # soon as its bytes went out (the retention is only the backstop for a call that vanished).
        self.queue = WorkQueue(self.backend, self.root, retention_s=LEFTOVER_RETENTION_S, max_per_client=1 << 30)
        self.queue.start()
        self.meter = Meter()
        self.sessions: dict[str, _OpenSession] = {}
        self.started_at = time.time()
        self._ingress = serve.get_deployment_handle(ingress_name, app_name=context.app_name)
        self._heartbeat = asyncio.create_task(self._beat())

    def __del__(self):
        self.queue.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def run_job(self, job_id: str, request, *, replica: str):
        job = Job(spec=request, client="ingress", folder=self.queue.new_job_folder(), id=job_id)
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

    async def live(self, session_id: str, spec: LiveSpec, options: LiveOptions, *, replica: str):
        geometry = self.backend.live_geometry(spec)
        audio = PushedAudio(self.backend.audio_encoder(), geometry, realtime=options.realtime)
        session = LiveSession("ingress", spec, options, audio, asyncio.get_running_loop())
        entry = self.sessions[session_id] = _OpenSession(session)
        try:
            position = self.queue.submit_live(session)
            yield {"type": "assigned", "replica": self.id, "position": position}
            while True:
                try:
                    item = await asyncio.wait_for(session.outbox.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield {"type": "alive", "position": self.queue.position(session)}
                    continue
                if isinstance(item, dict):
                    yield item
                    if item["type"] == "done":
                        return
                    continue
                frames = len(item[1].frames)
                entry.meter.record(frames)
                self.meter.record(frames)
                yield await asyncio.to_thread(session.encode, item)
        finally:
            self.sessions.pop(session_id, None)
            self.queue.withdraw(session)
            session.cancel()

    async def push(self, session_id: str, messages: list, *, replica: str) -> str | None:
        """A live session's client messages, in order: PCM16 bytes, "end" or "interrupt". Returns the one-line
        reason when the session must end (audio refused, session gone), else None."""
        entry = self.sessions.get(session_id)
        if entry is None:
            return "the session is over on its engine replica"
        audio = entry.session.audio
        for message in messages:
            if isinstance(message, bytes):
                data = entry.leftover + message
                even = len(data) - len(data) % 2
                entry.leftover = data[even:]
                try:
                    audio.push(from_pcm16(data[:even]))
                except ValueError as error:
                    return error_line(error)
            elif message == "end":
                audio.end()
            elif message == "interrupt":
                audio.interrupt()
        return None

    def describe(self) -> dict:
        import ray

        running = self.queue.running
        return {"id": self.id, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "started_at": self.started_at, "settings": self.settings,
                "running": None if running is None else "job" if isinstance(running, Job) else "live",
                "waiting": self.queue.waiting, "figures": self.meter.figures(), "gpu_memory": _gpu_memory(),
                "sessions": [{"id": session_id[:12], "state": "queued" if self.queue.position(entry.session) is not None
                              else "running", **entry.meter.figures()}
                             for session_id, entry in list(self.sessions.items())]}

    @staticmethod
    def load(args: argparse.Namespace):
        """The replica's `Backend`, planned and loaded as ``liveavatar serve`` does (a subclass may load
        something else: the latency benchmark's random weights)."""
        from liveavatar.cli.serve import load_backend, serve_limits

        if args.gpus_per_replica > 1:
            # A timestep pipeline over this replica's GPUs: its ranks are this process's children, on this node.
            from liveavatar.api import LiveAvatarPipeline
            from liveavatar.serve.backend import Backend

            devices = [f"cuda:{index}" for index in range(args.gpus_per_replica)]
            return Backend(LiveAvatarPipeline.from_pretrained(args.ckpt_dir, lora=args.lora_path_dmd, dtype=args.dtype,
                                                              devices=devices, sample_steps=args.max_steps))
        return load_backend(args, serve_limits(args))

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


def _settings(args: argparse.Namespace) -> dict:
    """What /v1/info shows of a replica's setup (its plan is printed to the replica's log)."""
    return {"device": args.device or "auto", "dtype": args.dtype or "auto", "gpus": args.gpus_per_replica,
            "max_size": args.max_size, "max_steps": args.max_steps, "default_size": args.size,
            "live_idle_limit_s": args.live_idle_limit}


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
