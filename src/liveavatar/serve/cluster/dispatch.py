"""The ingress's side of the work: the job table, the engine replicas it heard from, and the dispatch of
each job to the engine deployment. It has `WorkQueue`'s interface, so the single-process app serves it
unchanged (``ServerState(queue=ClusterQueue(...))``); the engines run in the replicas.

New work (a job, a live session) goes to the replica with the shortest queue: the fewest jobs and sessions
this ingress sent it that have not ended (every piece of work passes through here, so the count is exact
and is taken when the work is sent, with no race between two at once); the call names that replica for
`routing.PinnedOrShortestQueue`. Each job is one streaming call to the engine deployment; the replica
streams back the job's progress and its fragmented MP4, which the ingress
writes into the job's folder in its store, so ``/stream`` and ``/content`` read a local file as in the
single-process server, and a finished video never depends on the replica that made it. The store keeps a
``record.json`` per job: an ingress that Ray restarts reloads every finished job (its video included)
that is inside the retention time, and reports the jobs it had in flight as failed, with that cause.

When a replica dies (the call raises, or sends nothing for ``WATCHDOG_S``), a job that had not started
is sent again (another replica takes it); a running one fails with the cause: its video was half
streamed to clients already, so it is not silently restarted.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from liveavatar.errors import LiveAvatarError
from liveavatar.serve.jobs import FINISHED, Job, QueueFull, ServerBusy, refuse_over_caps

WATCHDOG_S = 8.0  # replicas send something at least every second while they hold work
ASSIGN_TIMEOUT_S = 10.0  # how long a replica may take to accept work sent to it (it accepts at once)
NO_REPLICA_TIMEOUT_S = 60.0  # how long new work waits for a first replica (the cluster is starting)
DISPATCH_ATTEMPTS = 3
STALE_S = 10.0  # a replica not heard from for this long is no longer listed
RETRY_AFTER_S = 10
RECORD = "record.json"
RECORDED = ("id", "client", "state", "error", "created", "started", "finished", "blocks_done", "blocks_total",
            "frames_done", "stream_bytes")


class ReplicaLost(LiveAvatarError):
    """The engine replica holding a job or a session stopped answering."""


@dataclass
class ReplicaBook:
    """The engine replicas as their heartbeats describe them."""

    seen: dict[str, tuple[float, dict]] = field(default_factory=dict)

    def heard(self, info: dict) -> None:
        self.seen[info["id"]] = (time.monotonic(), info)

    def forget(self, replica: str) -> None:
        """A replica that failed a call: not offered new work unless it is heard from again."""
        self.seen.pop(replica, None)

    def live(self) -> list[dict]:
        now = time.monotonic()
        for replica, (when, _) in list(self.seen.items()):
            if now - when > STALE_S:
                del self.seen[replica]
        return [info for _, info in sorted(self.seen.values(), key=lambda item: item[1]["id"])]


class ClusterQueue:
    def __init__(self, engine, store: Path, *, retention_s: float, max_per_client: int, max_waiting: int,
                 max_queued: int, max_live_per_client: int):
        self.engine = engine  # the engine deployment's handle
        self.store = store
        self.retention_s = retention_s
        self.max_per_client = max_per_client
        self.max_waiting = max_waiting
        self.max_queued = max_queued
        self.max_live_per_client = max_live_per_client
        self.live_open: dict[str, int] = {}  # client -> its open live sessions
        self.jobs: dict[str, Job] = {}
        self.replicas = ReplicaBook()
        self.placed: dict[str, str] = {}  # job id -> the replica that took it
        self.live_waiting = 0  # live sessions dispatched whose engine has not started them
        self.load: dict[str, int] = {}  # replica -> jobs and sessions sent to it that have not ended
        self._positions: dict[str, int | None] = {}
        self._calls: dict[str, object] = {}  # job id -> its streaming call, to cancel it
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    # ---------------------------------------------------------------- WorkQueue's interface, for the app

    @property
    def waiting(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state == "queued") + self.live_waiting

    @property
    def running(self):
        """Something, while no replica is free (the health answer's ``busy``); None while one is."""
        replicas = self.replicas.live()
        return None if any(info["running"] is None for info in replicas) or not replicas else len(replicas)

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self._reload()
        self._spawn(self._expire_loop())

    def stop(self) -> None:
        self._stopping = True
        for call in list(self._calls.values()):
            call.cancel()

    def join(self, timeout: float | None = None) -> None:
        self.stop()

    def new_job_folder(self) -> Path:
        folder = self.store / secrets.token_hex(8)
        folder.mkdir()
        return folder

    def submit(self, job: Job) -> int:
        if self._stopping:
            raise LiveAvatarError("the server is shutting down")
        refuse_over_caps(self.jobs.values(), job.client, sum(1 for j in self.jobs.values() if j.state == "queued"),
                         max_per_client=self.max_per_client, max_queued=self.max_queued, retry_after_s=RETRY_AFTER_S)
        self.admit()
        job.created = time.time()
        self.jobs[job.id] = job
        self._save(job)
        self._spawn(self._run(job))
        return self.waiting - 1

    def admit(self) -> None:
        """Refuse new work past the global cap on waiting work (jobs and live sessions alike)."""
        if self.waiting >= self.max_waiting:
            raise ServerBusy(f"every engine replica is busy and {self.waiting} jobs and sessions are waiting, this "
                             f"server's limit (--max-waiting); try again in {RETRY_AFTER_S} s", RETRY_AFTER_S)

    def open_live(self, client: str) -> None:
        """Count a new live session of ``client``, past the per-client cap and the global one; `close_live`
        when it ends."""
        mine = self.live_open.get(client, 0)
        if mine >= self.max_live_per_client:
            raise QueueFull(f"this client already has {mine} live sessions waiting or running, the server's limit "
                            f"(--max-live-per-client); end one first", RETRY_AFTER_S)
        self.admit()
        self.live_open[client] = mine + 1

    def close_live(self, client: str) -> None:
        self.live_open[client] -= 1
        if not self.live_open[client]:
            del self.live_open[client]

    def position(self, job: Job) -> int | None:
        return self._positions.get(job.id) if job.state == "queued" else None

    def status(self, job: Job) -> dict:
        expires = job.finished + self.retention_s if job.finished is not None else None
        return {**job.status(self.position(job), expires), "replica": self.placed.get(job.id)}

    def cancel(self, job: Job) -> None:
        job.cancel()
        call = self._calls.get(job.id)
        if call is not None:
            call.cancel()

    def delete(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.placed.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    # ---------------------------------------------------------------- the cluster's part

    def replicas_info(self) -> list[dict]:
        return [{**info, "open": self.load.get(info["id"], 0)} for info in self.replicas.live()]

    async def take_replica(self) -> str:
        """The replica new work goes to (the shortest queue), counted as holding it until `release`."""
        deadline = time.monotonic() + NO_REPLICA_TIMEOUT_S
        while not (replicas := self.replicas.live()):
            if time.monotonic() > deadline:
                raise ReplicaLost(f"no engine replica came up within {NO_REPLICA_TIMEOUT_S:g} s")
            await asyncio.sleep(0.2)
        replica = min((info["id"] for info in replicas), key=lambda rid: (self.load.get(rid, 0), rid))
        self.load[replica] = self.load.get(replica, 0) + 1
        return replica

    def release(self, replica: str) -> None:
        self.load[replica] -= 1
        if not self.load[replica]:
            del self.load[replica]

    async def _run(self, job: Job) -> None:
        for attempt in range(1, DISPATCH_ATTEMPTS + 1):
            try:
                await self._attempt(job)
                break
            except asyncio.CancelledError:
                if job._cancel.is_set() or self._stopping:
                    _finish(job, "cancelled")
                    break
                raise
            except Exception as error:
                if _cancelled(error) and (job._cancel.is_set() or self._stopping):
                    _finish(job, "cancelled")
                    break
                if job.state == "queued" and attempt < DISPATCH_ATTEMPTS and not job._cancel.is_set():
                    continue  # it never started: another replica takes it
                _finish(job, "failed", f"the engine replica {'running' if job.state == 'running' else 'taking'} it "
                                       f"stopped ({cause_line(error)}); submit it again")
                break
        self._calls.pop(job.id, None)
        self._positions.pop(job.id, None)
        if job.state != "done":
            job.video.unlink(missing_ok=True)
        for name in ("image", "audio"):
            (job.folder / name).unlink(missing_ok=True)
        self._save(job)

    async def _attempt(self, job: Job) -> None:
        replica = await self.take_replica()
        call = self.engine.options(stream=True).run_job.remote(job.id, job.request, replica=replica)
        self._calls[job.id] = call
        self.placed[job.id] = replica
        job.stream_bytes = 0
        try:
            await self._follow(job, call)
        except BaseException as error:
            call.cancel()
            if not isinstance(error, asyncio.CancelledError) and not _cancelled(error):
                self.replicas.forget(replica)
            raise
        finally:
            self.release(replica)

    async def _follow(self, job: Job, call) -> None:
        with open(job.video, "wb") as video:
            first = True
            while True:
                event = await asyncio.wait_for(call.__anext__(), ASSIGN_TIMEOUT_S if first else WATCHDOG_S)
                first = False
                if isinstance(event, bytes):
                    video.write(event)
                    video.flush()
                    job.stream_bytes += len(event)
                elif event["type"] == "assigned":
                    self._positions[job.id] = event["position"]
                elif event["type"] == "progress":
                    self._positions[job.id] = event["position"]
                    job.blocks_done, job.blocks_total = event["blocks_done"], event["blocks_total"]
                    job.frames_done = event["frames_done"]
                    if event["state"] == "running" and job.state == "queued":
                        job.state, job.started = "running", time.time()
                elif event["type"] == "end":
                    _finish(job, event["state"], event["error"])
                    return

    def _reload(self) -> None:
        """Jobs of an earlier life of this ingress (Ray restarted it): finished ones come back as they were,
        those it had in flight as failed; folders without a record are leftovers and go."""
        for folder in self.store.iterdir():
            try:
                record = json.loads((folder / RECORD).read_text())
            except (OSError, ValueError):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            job = Job(request=None, client=record["client"], folder=folder, id=record["id"])
            for name in RECORDED:
                setattr(job, name, record[name])
            self.placed[job.id] = record.get("replica")
            if job.state not in FINISHED:
                _finish(job, "failed", "the server's ingress restarted while it was "
                                       f"{job.state}; submit it again")
                job.video.unlink(missing_ok=True)
                self._save(job)
            self.jobs[job.id] = job
        self._expire()

    async def _expire_loop(self) -> None:
        while not self._stopping:
            self._expire()
            await asyncio.sleep(1.0)

    def _expire(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs.values() if j.finished is not None and j.finished + self.retention_s <= now]:
            self.delete(job)

    def _save(self, job: Job) -> None:
        record = {name: getattr(job, name) for name in RECORDED}
        (job.folder / RECORD).write_text(json.dumps({**record, "replica": self.placed.get(job.id)}))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _finish(job: Job, state: str, error: str | None = None) -> None:
    job.state, job.error, job.finished = state, error, time.time()


def _cancelled(error: Exception) -> bool:
    from ray.serve.exceptions import RequestCancelledError

    return isinstance(error, RequestCancelledError)


def cause_line(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"no answer for {WATCHDOG_S:g} s"
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
