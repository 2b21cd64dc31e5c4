"""Timestep-pipeline parallel (TPP) over ranks: the output rank's executor and the other ranks' loop.

The output rank (the last one, see `liveavatar.runtime.step_layout`) runs the sampling loop, its
conditioning, the decode and the output; its `StepRanksExecutor` hands every block to rank 0 and collects
it, clean, from the rank before it. Each rank runs its share of the denoising steps with a
`SequentialExecutor` over those steps, on the KV sets of those steps and its own cond cache: the same code
as one device, so the same bits. Several blocks are in flight (``depth``), so that in steady state every
rank works on a different block and one block leaves the pipeline per step-time.

What travels (in order on every link: output rank -> 0 -> 1 -> ... -> output rank):

* ``begin``: a request's id, geometry, schedule, the steps of every rank and the prompt embedding; a
  rank resets its caches and derives its text K/V from the embedding.
* ``prefill``: the sink's reference and motion latents; every rank refills its cond cache. It is ordered
  with the blocks, so blocks submitted before it see the old sink and blocks after it the new one (the
  reference broadcasts the new sink from its VAE rank to every DiT rank before clip 1).
* ``block``: clip, block, start frame, the RoPE-offset draw of every step (drawn by the output rank in
  the order one device draws them, so any policy gives the same draws), the latents and the audio
  features; each rank applies its steps to the latents and passes them on.
* ``stop``: the ranks leave.

A request closed before its end leaves blocks in flight; the next request's messages follow them on
every link, and the output rank drops what arrives with an older request id.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from liveavatar.geometry import ClipGeometry
from liveavatar.models.quantised_attention import SelfAttention, resolve_self_attention
from liveavatar.runtime.caches import CacheSet
from liveavatar.runtime.distributed import RankFailure, RankGroup, one_line
from liveavatar.runtime.executors.base import BlockJob, ExecutorFactory, ForwardHook
from liveavatar.runtime.executors.sequential import SequentialExecutor
from liveavatar.runtime.schedule import FlowMatchSchedule
from liveavatar.runtime.step_layout import StepLayout, steps_phrase

BEGIN, PREFILL, BLOCK, STOP = "begin", "prefill", "block", "stop"
STOP_WAIT_S = 30.0


def _schedule_fields(schedule: FlowMatchSchedule) -> dict:
    return {"timesteps": schedule.timesteps.tolist(), "sigmas": schedule.sigmas.tolist()}


def _schedule(header: dict) -> FlowMatchSchedule:
    # float32 -> Python float -> float32 is exact
    return FlowMatchSchedule(torch.tensor(header["timesteps"], dtype=torch.float32),
                             torch.tensor(header["sigmas"], dtype=torch.float32))


def _trace_hook(traced: dict[str, torch.Tensor]) -> ForwardHook:
    def record(clip, block, step, x, velocity):
        traced[f"trace.{step}.x"], traced[f"trace.{step}.v"] = x, velocity
    return record


class StepRanks:
    """The output rank's side of a pipeline: its group, the layout, and the links to rank 0 and from the
    rank before it. ``ranks`` are the worker processes it spawned (None under torchrun)."""

    def __init__(self, group: RankGroup, layout: StepLayout, device: torch.device, *, ranks=None):
        if group.rank != layout.output_rank or group.world_size != layout.world_size:
            raise ValueError(f"the output rank of {layout.world_size} ranks is rank {layout.output_rank}, "
                             f"not rank {group.rank} of {group.world_size}")
        self.group, self.layout, self.device, self.ranks = group, layout, device, ranks
        self.to_first = group.link_to(0)
        self.from_last = group.link_from(layout.output_rank - 1)
        self.requests = 0
        self.closed = False

    def executor(self, geometry: ClipGeometry, text: torch.Tensor, attention: str) -> "StepRanksFactory":
        """The executor factory of one request (for ``Engine.run``): ``text`` is its prompt embedding,
        ``attention`` its self-attention mode (every rank runs it)."""
        return StepRanksFactory(self, geometry, text, attention)

    def begin(self, geometry: ClipGeometry, schedule: FlowMatchSchedule, text: torch.Tensor, *,
              trace: bool, attention: str) -> int:
        """Start a request on every rank; a pipeline that was stopped or has failed refuses it."""
        if self.closed:
            raise RankFailure("the pipeline's ranks were stopped (close()); start a new pipeline")
        failure = self.group.failure()
        if failure is not None:
            raise RankFailure(failure)
        self.requests += 1
        self.group.set_role(self.layout.roles(schedule.num_steps)[self.layout.output_rank])
        self.to_first.send({"kind": BEGIN, "request": self.requests, "trace": trace, "attention": attention,
                            "geometry": (geometry.height, geometry.width, geometry.infer_frames),
                            "steps": self.layout.steps(schedule.num_steps), **_schedule_fields(schedule)},
                           {"text": text})
        return self.requests

    def close(self, failure: BaseException | None = None) -> None:
        """Stop the other ranks. Normally a stop message goes through the pipeline (after whatever is still
        in flight) and the spawned processes are joined; after ``failure`` (an error or Ctrl-C here) it is
        recorded for every rank to see and spawned processes are ended at once."""
        if self.closed:
            return
        self.closed = True
        try:
            if failure is not None:
                if not isinstance(failure, RankFailure):
                    self.group.fail("stopped: interrupted" if isinstance(failure, KeyboardInterrupt) else
                                    f"failed: {one_line(failure)}")
            elif self.group.failure() is None:
                self.to_first.send({"kind": STOP})
                while self.from_last.recv(self.device)[0]["kind"] != STOP:
                    pass
                self.to_first.flush()
        finally:
            if self.ranks is not None:
                self.ranks.close(graceful=failure is None)
            else:
                self.group.close()


class StepRanksFactory(ExecutorFactory):
    """Builds a request's `StepRanksExecutor` from what ``Engine.run`` passes an executor factory; the
    engine allocates caches only for `local_steps` (none on a decode-only output rank)."""

    def __init__(self, step_ranks: StepRanks, geometry: ClipGeometry, text: torch.Tensor, attention: str):
        self.step_ranks, self.geometry, self.text, self.attention = step_ranks, geometry, text, attention

    def local_steps(self, num_steps: int) -> tuple[int, ...]:
        return self.step_ranks.layout.steps(num_steps)[self.step_ranks.layout.output_rank]

    def __call__(self, model, caches: CacheSet | None, schedule: FlowMatchSchedule, text_kv, *,
                 on_forward: ForwardHook | None = None, graphs=None) -> "StepRanksExecutor":
        return StepRanksExecutor(self.step_ranks, self.geometry, self.text, model, caches, schedule, text_kv,
                                 on_forward=on_forward, graphs=graphs, attention=self.attention)


class StepRanksExecutor:
    """The output rank's `BlockExecutor`: blocks go to rank 0 and come back clean from the rank before the
    output rank, which then runs its own steps, if it has any."""

    def __init__(self, step_ranks: StepRanks, geometry: ClipGeometry, text: torch.Tensor, model,
                 caches: CacheSet | None, schedule: FlowMatchSchedule, text_kv, *,
                 on_forward: ForwardHook | None = None, graphs=None, attention: str):
        self.step_ranks = step_ranks
        self.num_steps = schedule.num_steps
        self.on_forward = on_forward
        # Every other rank busy with a block, one more queued for the next rank, one being decoded here.
        self.depth = step_ranks.layout.world_size + 1
        steps = step_ranks.layout.steps(self.num_steps)[step_ranks.layout.output_rank]
        self.local = None if not steps else SequentialExecutor(
            model, caches, schedule, text_kv, on_forward=on_forward, graphs=graphs, steps=steps)
        self.request = step_ranks.begin(geometry, schedule, text, trace=on_forward is not None, attention=attention)

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        self.step_ranks.to_first.send({"kind": PREFILL, "request": self.request},
                                    {"ref": ref_latents, "motion": motion_latents})

    def submit(self, job: BlockJob) -> None:
        self.step_ranks.to_first.send({"kind": BLOCK, "request": self.request, "clip": job.clip, "block": job.block,
                                     "start_frame": job.start_frame, "draws": list(job.ref_rope_offsets)},
                                    {"x": job.noise, "audio": job.audio})

    def collect(self) -> torch.Tensor:
        while True:
            header, tensors = self.step_ranks.from_last.recv(self.step_ranks.device)
            if header.get("request") != self.request or header["kind"] == BEGIN:
                continue  # left over from a request closed early, or this request's begin coming round
            if header["kind"] == PREFILL:
                if self.local is not None:
                    self.local.prefill(tensors["ref"], tensors["motion"])
                continue
            clip, block = header["clip"], header["block"]
            if self.on_forward is not None:
                for step in range(self.num_steps):
                    if f"trace.{step}.v" in tensors:
                        self.on_forward(clip, block, step, tensors[f"trace.{step}.x"], tensors[f"trace.{step}.v"])
            if self.local is None:
                return tensors["x"]
            self.local.submit(BlockJob(clip, block, header["start_frame"], tensors["x"], tensors["audio"],
                                       tuple(header["draws"])))
            return self.local.collect()


def serve_stage(group: RankGroup, model, caches_for: Callable[[ClipGeometry, Sequence[int]], CacheSet],
                device: torch.device, *, graphs_for: Callable[[CacheSet], object] | None = None) -> None:
    """A worker rank: run this rank's steps on every block that comes from the rank before it and pass it
    on, until ``stop``. ``caches_for(geometry, steps)`` gives the caches of a request (reset);
    ``graphs_for(caches)`` the rank's CUDA graphs for them (`Engine.forward_graphs`: None where the fast
    path or the placement has none), so a worker's forwards replay graphs as one GPU's do."""
    upstream = group.link_from(group.rank - 1 if group.rank else group.world_size - 1)
    downstream = group.link_to(group.rank + 1)
    stage, traced = None, {}
    attentions: dict[str, SelfAttention] = {}  # each mode resolved once (one fallback notice)
    while True:
        header, tensors = upstream.recv(device)
        kind = header["kind"]
        if kind == BEGIN:
            steps = header["steps"][group.rank]
            group.set_role(steps_phrase(steps) if steps else "idle")
            stage = None
            mode = header["attention"]
            if mode not in attentions:
                attentions[mode] = resolve_self_attention(mode, device, head_dim=model.config.head_dim)
            model.self_attention = attentions[mode]
            if steps:
                caches = caches_for(ClipGeometry(*header["geometry"]), steps)
                stage = SequentialExecutor(model, caches, _schedule(header), model.text_kv(tensors["text"]),
                                           steps=steps, on_forward=_trace_hook(traced) if header["trace"] else None,
                                           graphs=graphs_for(caches) if graphs_for else None)
        elif kind == PREFILL and stage is not None:
            stage.prefill(tensors["ref"], tensors["motion"])
        elif kind == BLOCK and stage is not None:
            traced.clear()
            stage.submit(BlockJob(header["clip"], header["block"], header["start_frame"], tensors["x"],
                                  tensors["audio"], tuple(header["draws"])))
            tensors = {**tensors, **traced, "x": stage.collect()}
        downstream.send(header, tensors)
        if kind == STOP:
            downstream.flush()
            return
