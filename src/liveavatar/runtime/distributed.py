"""The processes of a multi-GPU run on torch.distributed: the process group, message links between ranks,
local spawning, torchrun, and failures.

Transport. Each message is a small header (a pickled dict) in the group's TCPStore plus, when it carries
tensors, one byte buffer sent point to point over gloo (device tensors are staged through host memory:
a block hop is ~1 MB, about a millisecond). A sender posts its ``isend`` and then publishes the header;
a receiver polls the store for the next header and only then posts its ``recv``, so a transfer always
starts with both ends posted, and nothing ever waits inside the communicator for work to arrive.

Timeouts, deliberately. `comm_timeout()` bounds one transfer whose both ends are posted (seconds at
most; minutes means a peer is broken). Waiting for work has no timeout: an idle server polls the store
(microseconds per poll, backing off to 5 ms) and never trips a communicator timeout, which is what
killed the reference's idle Gradio server. Failures are noticed by that polling instead: a rank that
raises records ``rank R (its role) failed: Error: message`` under the store's failure key before it exits; the process
that spawned the ranks records the exit of one that died (signal or exit code) and stops the others;
under torchrun the agent stops the others. Every poll reads the failure key (every 0.25 s), so all
ranks leave within a second or so with the first recorded cause.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from liveavatar.errors import InputError, LiveAvatarError

# The bound on one transfer whose both ends are posted (LIVEAVATAR_COMM_TIMEOUT_S overrides it).
COMM_TIMEOUT_S = 300.0
# How long ranks wait for each other to join at start (loading happens after joining).
JOIN_TIMEOUT = timedelta(minutes=10)
FAILURE_CHECK_S = 0.25
POLL_MAX_SLEEP_S = 0.005
# Messages a sender may have unread by its receiver before it waits; the pipeline's own depth keeps far
# fewer in flight, this only bounds host memory if a receiver stalls.
MAX_UNREAD = 64
STOP_GRACE_S = 10.0
_FAILURE_KEY = "failure"
_ALIGN = 16


class RankFailure(LiveAvatarError):
    """A rank of the pipeline failed or died; the message names the rank and the cause."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Its bytes in a message buffer: padded so that the next tensor's view is aligned."""
        return -(-self.size // _ALIGN) * _ALIGN


def comm_timeout() -> timedelta:
    """The communicator's timeout: ``LIVEAVATAR_COMM_TIMEOUT_S`` seconds, default 300."""
    return timedelta(seconds=float(os.environ.get("LIVEAVATAR_COMM_TIMEOUT_S", COMM_TIMEOUT_S)))


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], torch.Tensor | None]:
    """Tensors as their specs and one host byte buffer (each part padded so every view back is aligned),
    each copied once, straight into its place (from the device too)."""
    specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    if not specs:
        return specs, None
    buffer = torch.empty(sum(spec.nbytes for spec in specs), dtype=torch.uint8)
    offset = 0
    for spec, tensor in zip(specs, tensors.values()):
        buffer[offset:offset + spec.size].view(spec.dtype).view(spec.shape).copy_(tensor.detach())
        offset += spec.nbytes
    return specs, buffer


def unpack_tensors(specs: list[TensorSpec], buffer: torch.Tensor | None, device) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    for spec in specs:
        tensors[spec.name] = buffer[offset:offset + spec.size].view(spec.dtype).reshape(spec.shape).to(device)
        offset += spec.nbytes
    return tensors


class RankGroup:
    """This process's place in a run of ``world_size`` ranks: a gloo process group for the payloads and
    the store for headers and the failure record."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, parent_pid: int | None = None):
        self.rank, self.world_size = rank, world_size
        self._root_store = store
        self.store = dist.PrefixStore("liveavatar/", store)
        self.parent_pid = parent_pid  # a spawned rank leaves when the process that spawned it is gone
        self.role = ""
        self._next_check = 0.0
        # Its own gloo group, not torch.distributed's default one: a process may hold several pipelines.
        self.gloo: dist.ProcessGroupGloo | None = None

    def set_role(self, role: str) -> None:
        """What this rank does now ("steps 0-1"), for the failure messages of any rank."""
        if role != self.role:
            self.role = role
            self.store.set(f"role/{self.rank}", role.encode())

    def join(self, timeout: timedelta | None = None) -> "RankGroup":
        """Wait (watching for failures) until every rank has arrived, then form the gloo group; a rank that
        dies while starting up stops the others here instead of leaving them in the communicator's
        rendezvous."""
        self.store.set(f"joined/{self.rank}", b"1")
        keys = [f"joined/{rank}" for rank in range(self.world_size)]
        self.poll(lambda: self.store.check(keys))
        try:
            self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", self._root_store), self.rank, self.world_size,
                                              timeout or comm_timeout())
        except RuntimeError as error:  # a rank died while the group formed
            raise self.lost(None, error) from None
        return self

    def link_to(self, dst: int, tag: int = 0) -> "Sender":
        """Messages to ``dst``; links with different tags are independent (a benchmark's own traffic)."""
        return Sender(self, dst, tag)

    def link_from(self, src: int, tag: int = 0) -> "Receiver":
        return Receiver(self, src, tag)

    # ----------------------------------------------------------------------------------------------

    def fail(self, cause: str, rank: int | None = None) -> str:
        """Record the run's failure as ``rank R (role) cause`` (the first recorded one stays) and return the
        recorded line."""
        rank = self.rank if rank is None else rank
        try:
            role = self.role if rank == self.rank else \
                self.store.get(f"role/{rank}").decode() if self.store.check([f"role/{rank}"]) else ""
            line = f"rank {rank}{f' ({role})' if role else ''} {cause}"
            return self.store.compare_set(_FAILURE_KEY, "", line).decode()
        except Exception:  # the store is gone too: this line is all there is
            return f"rank {rank} {cause}"

    def failure(self) -> str | None:
        try:
            return self.store.get(_FAILURE_KEY).decode() if self.store.check([_FAILURE_KEY]) else None
        except Exception as error:
            return f"the run's store is gone ({one_line(error)}): the rank hosting it stopped"

    def check(self) -> None:
        """Raises `RankFailure` once any rank recorded a failure or the spawning process is gone."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + FAILURE_CHECK_S
        failure = self.failure()
        if failure is None and self.parent_pid is not None and os.getppid() != self.parent_pid:
            failure = "the output rank's process is gone"
        if failure is not None:
            raise RankFailure(failure)

    def poll(self, ready: Callable[[], bool]) -> None:
        """Wait, without any timeout, until ``ready()``; raises `RankFailure` if the run failed."""
        delay = 5e-5
        while True:
            try:
                if ready():
                    return
            except RankFailure:
                raise
            except Exception as error:  # the store's connection broke
                raise RankFailure(self.failure() or f"the run's store is gone ({one_line(error)})") from None
            self.check()
            time.sleep(delay)
            delay = min(2 * delay, POLL_MAX_SLEEP_S)

    def lost(self, peer: int | None, error: Exception) -> RankFailure:
        """The failure to raise when a transfer with ``peer`` (None: the group as it formed) broke: the
        recorded cause, if any arrives within a second."""
        deadline = time.monotonic() + 1.0  # a failing rank, or the spawner's watcher, records the cause
        while self.failure() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        link = "the other ranks" if peer is None else f"rank {peer}"
        return RankFailure(self.failure() or self.fail(f"lost its link to {link}: {one_line(error)}"))

    def close(self) -> None:
        self.gloo = None  # its connections close with it


class Sender:
    """Messages from this rank to ``dst``, in order."""

    def __init__(self, group: RankGroup, dst: int, tag: int = 0):
        self.group, self.dst, self.tag = group, dst, tag
        self.prefix = f"{tag}/{group.rank}>{dst}:"
        self.sent = 0
        self.unread: deque[tuple[str, object, torch.Tensor | None]] = deque()

    def send(self, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        specs, payload = pack_tensors(tensors or {})
        key = f"{self.prefix}{self.sent}"
        try:
            work = self.group.gloo.send([payload], self.dst, self.tag) if payload is not None else None
        except RuntimeError as error:
            raise self.group.lost(self.dst, error) from None
        self.group.store.set(key, pickle.dumps({**header, "tensors": specs}))
        self.unread.append((key, work, payload))
        self.sent += 1
        self._reap()

    def flush(self) -> None:
        """Wait until the receiver has taken every message (before this rank leaves)."""
        store = self.group.store
        for key, _, _ in self.unread:
            self.group.poll(lambda: not store.check([key]))
        self._reap()

    def _reap(self) -> None:
        """Finish the sends the receiver has taken (their header is gone); wait while too many are unread."""
        store = self.group.store
        while self.unread:
            key, work, _ = self.unread[0]
            if len(self.unread) > MAX_UNREAD:
                self.group.poll(lambda: not store.check([key]))
            elif store.check([key]):
                return
            try:
                if work is not None:
                    work.wait()
            except RuntimeError as error:
                raise self.group.lost(self.dst, error) from None
            self.unread.popleft()


class Receiver:
    """Messages from ``src`` to this rank, in order."""

    def __init__(self, group: RankGroup, src: int, tag: int = 0):
        self.group, self.src, self.tag = group, src, tag
        self.prefix = f"{tag}/{src}>{group.rank}:"
        self.received = 0

    def recv(self, device) -> tuple[dict, dict[str, torch.Tensor]]:
        """The next message: its header and its tensors on ``device``. Waits as long as it takes."""
        store, key = self.group.store, f"{self.prefix}{self.received}"
        self.group.poll(lambda: store.check([key]))
        header = pickle.loads(store.get(key))
        specs = header.pop("tensors")
        buffer = None
        if specs:
            buffer = torch.empty(sum(spec.nbytes for spec in specs), dtype=torch.uint8)
            try:
                self.group.gloo.recv([buffer], self.src, self.tag).wait()
            except RuntimeError as error:
                raise self.group.lost(self.src, error) from None
        store.delete_key(key)  # tells the sender its buffer is free
        self.received += 1
        return header, unpack_tensors(specs, buffer, device)


def one_line(error: BaseException) -> str:
    """An exception as ``Type: message`` on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --------------------------------------------------------------------------------------------------
# Running a rank


def run_rank(group: RankGroup, target: Callable[..., None], *args, timeout: timedelta | None = None) -> int:
    """Join the group and run a worker rank's ``target(group, *args)``; an exception becomes the run's
    recorded failure (one line, the traceback only with LIVEAVATAR_DEBUG=1) and exit status 1. A failure
    recorded by another rank ends this one quietly."""
    try:
        group.join(timeout)
        target(group, *args)
        return 0
    except RankFailure:
        return 1
    except BaseException as error:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        group.fail(f"failed: {one_line(error)}")
        if os.environ.get("LIVEAVATAR_DEBUG"):
            raise
        return 1
    finally:
        group.close()


def _spawned_rank(rank: int, world_size: int, port: int, parent_pid: int, timeout: timedelta,
                  target: Callable[..., None], args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group; the parent decides
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=JOIN_TIMEOUT)
    group = RankGroup(store, rank, world_size, parent_pid=parent_pid)
    sys.exit(run_rank(group, target, *args, timeout=timeout))


class LocalRanks:
    """Worker ranks spawned by this process (which takes ``own_rank``), each running ``target(group, *args)``
    with its entry of ``rank_args``. A watcher thread records the first unexpected exit (naming the rank
    and its signal or exit status) and stops the other ranks; `close` stops them all."""

    def __init__(self, world_size: int, own_rank: int, target: Callable[..., None], rank_args: dict[int, tuple],
                 *, timeout: timedelta | None = None):
        self.server = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                    timeout=JOIN_TIMEOUT)
        timeout = timeout or comm_timeout()
        context = multiprocessing.get_context("spawn")
        self.processes: dict[int, multiprocessing.Process] = {}
        for rank in range(world_size):
            if rank != own_rank:
                self.processes[rank] = context.Process(
                    target=_spawned_rank, daemon=True, name=f"liveavatar-rank{rank}",
                    args=(rank, world_size, self.server.port, os.getpid(), timeout, target, rank_args[rank]))
        self.closing = False
        self.group = RankGroup(self.server, own_rank, world_size)
        for process in self.processes.values():
            process.start()
        self._watcher = threading.Thread(target=self._watch, name="liveavatar-rank-watcher", daemon=True)
        self._watcher.start()
        try:
            self.group.join(timeout)
        except BaseException:
            self.close(graceful=False)
            raise

    def _watch(self) -> None:
        running = dict(self.processes)
        while running:
            sentinels = {process.sentinel: rank for rank, process in running.items()}
            for sentinel in multiprocessing.connection.wait(list(sentinels)):
                rank = sentinels[sentinel]
                process = running.pop(rank)
                process.join()
                if not self.closing:
                    self.group.fail(_exit_cause(process.exitcode), rank=rank)
                    self._stop(running.values())

    def _stop(self, processes) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    def close(self, *, graceful: bool = True) -> None:
        """Stop the ranks: wait for them to leave (after a stop message) up to a grace period, then end them."""
        self.closing = True
        deadline = time.monotonic() + (STOP_GRACE_S if graceful else 0.0)
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        self._stop(self.processes.values())
        for process in self.processes.values():
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
        self.group.close()


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"died: killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode} before the run ended"


# --------------------------------------------------------------------------------------------------
# torchrun and devices


def torchrun_group() -> RankGroup:
    """This process's group under torchrun, not joined yet: the env:// rendezvous (torchrun's store;
    multi-node runs meet through ``--rdzv-endpoint``)."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT))
    return RankGroup(store, rank, world_size)


def check_same_kind(names: Sequence[str], ranks: Sequence[int], *, flag: str) -> None:
    """One GPU kind per pipeline: the plan is made per kind and the pipeline runs at its slowest rank."""
    kinds = sorted(set(names))
    if len(kinds) > 1:
        listing = ", ".join(f"{rank}: {name}" for rank, name in zip(ranks, names))
        raise InputError(f"{flag}: mixed GPU kinds ({listing}); a pipeline runs at the speed of its slowest GPU "
                         f"and is planned for one kind: choose GPUs of one kind")


def gpu_devices(gpus: Sequence[int] | None, num_gpus: int | None) -> list[torch.device]:
    """The CUDA devices of a spawned pipeline (``--gpus 0,1,2`` or the first ``--num_gpus N``), checked:
    each exists, none repeats, one kind."""
    flag = "--gpus" if gpus is not None else "--num_gpus"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        gpus = list(range(num_gpus))
        if num_gpus > available:
            raise InputError(f"--num_gpus {num_gpus}: this machine has {available} CUDA GPU"
                             f"{'s' if available != 1 else ''}; use --num_gpus {max(available, 1)}"
                             f"{'' if available else ' or --device cpu'}")
    if len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus {','.join(map(str, gpus))}: a GPU appears twice; each rank needs its own GPU")
    missing = [gpu for gpu in gpus if not 0 <= gpu < available]
    if missing:
        have = f"GPUs 0-{available - 1}" if available else "no CUDA GPU"
        raise InputError(f"{flag} {','.join(map(str, gpus))}: GPU {missing[0]} does not exist (this machine has "
                         f"{have})")
    check_same_kind([torch.cuda.get_device_name(gpu) for gpu in gpus], gpus,
                    flag=f"--gpus {','.join(map(str, gpus))}" if flag == "--gpus" else f"--num_gpus {len(gpus)}")
    return [torch.device("cuda", gpu) for gpu in gpus]


def torchrun_device(local_rank: int, *, cpu: bool) -> torch.device:
    """The device of a torchrun rank: cuda:LOCAL_RANK (or the CPU for ``--device cpu``)."""
    if cpu:
        return torch.device("cpu")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= available:  # a node with GPUs, fewer than its ranks (without any, the ranks run on the CPU)
        raise InputError(f"torchrun local rank {local_rank} has no GPU: this node has {available}; launch with "
                         f"--nproc_per_node {available} or fewer, or give --device cpu")
    return torch.device("cuda", local_rank)
