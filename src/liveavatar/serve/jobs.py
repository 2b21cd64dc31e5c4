"""The queue: one worker thread runs jobs and live sessions on the engine, one at a time, in order.

A job goes queued -> running -> done | failed | cancelled. Its files live in its own folder under the
server's temp folder, named by the server (``image``, ``audio``, ``video.mp4``); the inputs are deleted
when it ends, the video (done jobs only) ``retention_s`` later, together with the job's record.
Cancelling a queued job removes it; a running one stops at the next block boundary. A job's exception
ends that job only: its record carries the one-line message and the worker goes on.
Live sessions wait in the same queue, ahead of queued jobs (a person is waiting for them), and hold the
engine until they end.
"""
from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from liveavatar.errors import ArgumentError, LiveAvatarError
from liveavatar.geometry import FPS, SAMPLES_PER_FRAME, audio_video_frames
from liveavatar.request import Request
from liveavatar.serve.backend import Backend, BlockDone
from liveavatar.serve.fmp4 import FragmentedMp4Writer

FINISHED = ("done", "failed", "cancelled")


class QueueFull(LiveAvatarError):
    """The server or this client already has as much work waiting as allowed (HTTP 429, with ``Retry-After``
    when it is known)."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerBusy(LiveAvatarError):
    """Every engine is busy and the server's waiting line is full (HTTP 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Work(Protocol):
    client: str

    def run(self, backend: Backend) -> None: ...

    def cancel(self) -> None: ...


def refuse_over_caps(jobs: Iterable["Job"], client: str, waiting: int, *, max_per_client: int, max_queued: int,
                     retry_after_s: int | None) -> None:
    """QueueFull when ``client`` already has its cap of jobs queued or running, or ``waiting`` jobs fill the
    server's queue (the single-process server's rule, and the cluster ingress's)."""
    mine = sum(1 for job in jobs if job.client == client and job.state in ("queued", "running"))
    if mine >= max_per_client:
        raise QueueFull(f"this client already has {mine} jobs queued or running, the server's limit "
                        f"(--max-queued-per-client); wait for one to finish or DELETE one", retry_after_s)
    if waiting >= max_queued:
        raise QueueFull(f"the server's queue is full ({waiting} jobs waiting, --max-queued); try again later",
                        retry_after_s)


def error_line(error: BaseException) -> str:
    """One line for a job's error: the message of errors a user can act on, the type for anything else."""
    text = " ".join((error.as_flag() if isinstance(error, ArgumentError) else str(error)).split())
    if isinstance(error, (LiveAvatarError, ValueError, OSError)):
        return text or type(error).__name__
    return f"internal error ({type(error).__name__}: {text}); the server log has the traceback"


@dataclass
class Job:
    request: Request  # the video to make (liveavatar.request), resolved when it was uploaded
    client: str
    folder: Path
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    blocks_done: int = 0
    blocks_total: int | None = None
    frames_done: int = 0
    stream_bytes: int = 0  # bytes of video.mp4 that are complete fragments, safe to send
    watchers: int = 0  # open /stream responses
    cancel_on_disconnect: bool = False  # a watcher asked: the last watcher leaving cancels the job
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def video(self) -> Path:
        return self.folder / "video.mp4"

    def cancel(self) -> None:
        self._cancel.set()

    def run(self, backend: Backend) -> None:
        self.state, self.started = "running", time.time()
        writer = None
        try:
            run = backend.job(self.request)
            self.blocks_total = run.blocks_total
            waveform = self.request.audio.samples
            writer = FragmentedMp4Writer(self.video, width=run.width, height=run.height)
            try:
                for event in run.events:
                    if self._cancel.is_set():
                        break
                    if isinstance(event, BlockDone):
                        self.blocks_done = event.blocks_done
                    else:
                        self._write(writer, event.frames, waveform)
            finally:
                run.events.close()
            if self._cancel.is_set():
                writer.abort()
                self.state = "cancelled"
            else:
                writer.close()
                self.stream_bytes = writer.bytes_written
                self.state = "done"
        except Exception as error:
            if writer is not None:
                writer.abort()
            self.error = error_line(error)
            self.state = "failed"
            if not isinstance(error, LiveAvatarError):
                import traceback

                traceback.print_exc()
        finally:
            self.finished = time.time()
            for name in ("image", "audio"):
                (self.folder / name).unlink(missing_ok=True)

    def _write(self, writer: FragmentedMp4Writer, frames, waveform) -> None:
        """Frames with their audio; frames past the end of the audio are dropped, as ``generate``'s mp4 ends
        with the shorter stream."""
        start = self.frames_done
        frames = frames[:max(0, audio_video_frames(len(waveform)) - start)]
        if len(frames):
            writer.write(frames, waveform[start * SAMPLES_PER_FRAME:(start + len(frames)) * SAMPLES_PER_FRAME])
        self.frames_done += len(frames)
        self.stream_bytes = writer.bytes_written

    def status(self, position: int | None, expires_at: float | None) -> dict:
        eta = None
        if self.state == "running" and self.blocks_done and self.blocks_total:
            per_block = (time.time() - self.started) / self.blocks_done
            eta = round(per_block * (self.blocks_total - self.blocks_done), 1)
        return {"id": self.id, "state": self.state, "queue_position": position, "error": self.error,
                "progress": {"blocks_done": self.blocks_done, "blocks_total": self.blocks_total,
                             "frames_done": self.frames_done, "video_seconds": round(self.frames_done / FPS, 2),
                             "eta_s": eta},
                "created_at": self.created, "started_at": self.started, "finished_at": self.finished,
                "expires_at": expires_at}


class WorkQueue:
    """``max_per_client`` jobs queued or running per client address, ``max_queued`` jobs waiting in all, and
    ``max_live_per_client`` live sessions waiting or running per client address; past them ``QueueFull``."""

    def __init__(self, backend: Backend, root: Path, *, retention_s: float, max_per_client: int, max_queued: int,
                 max_live_per_client: int):
        self.backend = backend
        self.root = root
        self.retention_s = retention_s
        self.max_per_client = max_per_client
        self.max_queued = max_queued
        self.max_live_per_client = max_live_per_client
        self.jobs: dict[str, Job] = {}
        self.running: Work | None = None
        self._waiting: deque[Work] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="liveavatar-engine", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def new_job_folder(self) -> Path:
        folder = self.root / secrets.token_hex(8)
        folder.mkdir()
        return folder

    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (how many go before it). Raises QueueFull over the client's cap."""
        with self._lock:
            refuse_over_caps(self.jobs.values(), job.client, sum(1 for work in self._waiting if isinstance(work, Job)),
                             max_per_client=self.max_per_client, max_queued=self.max_queued,
                             retry_after_s=self._retry_after_s())
            if self._stopping:
                raise LiveAvatarError("the server is shutting down")
            job.created = time.time()  # under the lock: submission order is creation order
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
            return self._ahead(job)

    def submit_live(self, session: Work) -> int:
        """Queue a live session ahead of the waiting jobs (behind other sessions)."""
        with self._lock:
            mine = sum(1 for work in [self.running, *self._waiting]
                       if work is not None and not isinstance(work, Job) and work.client == session.client)
            if mine >= self.max_live_per_client:
                raise QueueFull(f"this client already has {mine} live sessions waiting or running, the server's "
                                f"limit (--max-live-per-client); end one first", self._retry_after_s())
            if self._stopping:
                raise LiveAvatarError("the server is shutting down")
            index = sum(1 for work in self._waiting if not isinstance(work, Job))
            self._waiting.insert(index, session)
            self._lock.notify_all()
            return self._ahead(session)

    def _retry_after_s(self) -> int:
        """When a place is likely to free up: the running job's ETA, else one typical job's time (10 s)."""
        running = self.running
        eta = running.status(None, None)["progress"]["eta_s"] if isinstance(running, Job) else None
        return max(1, round(eta if eta is not None else 10))

    def position(self, work: Work) -> int | None:
        """How many items run before this waiting one (the running one included); None once it started."""
        with self._lock:
            return self._ahead(work) if work in self._waiting else None

    def _ahead(self, work: Work) -> int:
        return self._waiting.index(work) + (self.running is not None)

    def withdraw(self, work: Work) -> bool:
        """Take a waiting item out of the queue; False when it already started."""
        with self._lock:
            if work in self._waiting:
                self._waiting.remove(work)
                return True
            return False

    def cancel(self, job: Job) -> None:
        """Queued: removed (state cancelled, files deleted). Running: stops at the next block boundary."""
        if self.withdraw(job):
            job.state, job.finished = "cancelled", time.time()
            shutil.rmtree(job.folder, ignore_errors=True)
        else:
            job.cancel()

    def delete(self, job: Job) -> None:
        with self._lock:
            self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def status(self, job: Job) -> dict:
        expires = job.finished + self.retention_s if job.finished is not None else None
        return job.status(self.position(job), expires)

    def stop(self) -> None:
        """Stop without blocking (it runs in a signal handler): cancel the running item, drop the waiting ones."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            if self.running is not None:
                self.running.cancel()
            self._lock.notify_all()
        for work in waiting:
            work.cancel()
            if isinstance(work, Job):
                work.state, work.finished = "cancelled", time.time()

    def join(self, timeout: float | None = None) -> None:
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait(self._next_expiry())
                    self._expire()
                if self._stopping:
                    return
                self.running = self._waiting.popleft()
            try:
                self.running.run(self.backend)
            finally:
                with self._lock:
                    self.running = None
                    self._expire()

    def _next_expiry(self) -> float | None:
        ends = [job.finished + self.retention_s for job in self.jobs.values() if job.finished is not None]
        return max(0.0, min(ends) - time.time()) if ends else None

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs.values() if j.finished is not None and j.finished + self.retention_s <= now]:
            del self.jobs[job.id]
            shutil.rmtree(job.folder, ignore_errors=True)
