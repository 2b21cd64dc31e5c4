"""The denoising steps of a block, one after the other, on one device: all of them, or the share of one
pipeline stage."""
from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from liveavatar.runtime.caches import CacheSet
from liveavatar.runtime.executors.base import BlockJob, ExecutorFactory, ForwardHook
from liveavatar.runtime.executors.graphs import ForwardGraphs
from liveavatar.runtime.schedule import FlowMatchSchedule


class SequentialExecutor:
    """Denoises each block as it is submitted.

    Step i attends to KV set i, which only ever holds K/V computed at timestep i (the reference's
    "timestep forcing"); the cond cache written by the sink prefill is shared by every step. The request
    state lives here, not on the model: the text's K/V and the steps' time vectors (a block's RoPE-offset
    draws come in its job). With ``graphs`` (a `ForwardGraphs`,
    owned by the engine so that its graphs serve every request) the forwards replay CUDA graphs. ``steps``: the denoising steps it runs
    (default all; a pipeline stage runs its consecutive share, on the caches of those steps only).
    """

    depth = 1

    def __init__(self, model, caches: CacheSet, schedule: FlowMatchSchedule, text_kv, *,
                 on_forward: ForwardHook | None = None, graphs: ForwardGraphs | None = None,
                 steps: Sequence[int] | None = None):
        self.model = model
        self.caches = caches
        self.schedule = schedule
        self.text_kv = text_kv
        self.on_forward = on_forward
        self.forward = graphs.forward if graphs is not None else model.run_block
        self.steps = tuple(range(schedule.num_steps) if steps is None else steps)
        self.times = {step: model.time_vectors(schedule.timestep(step)) for step in self.steps}
        self.done: deque[torch.Tensor] = deque()

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        self.model.prefill_sink(self.caches.cond, self.text_kv, ref_latents, motion_latents)

    def submit(self, job: BlockJob) -> None:
        model, cond = self.model, self.caches.cond
        audio = model.audio_tokens(job.audio)
        x = job.noise
        for step in self.steps:
            kv = self.caches.kv_sets[step]
            inputs = model.prepare_block(x, audio, kv, cond, start_frame=job.start_frame,
                                         ref_rope_offset=job.ref_rope_offsets[step])
            velocity = self.forward(x, self.times[step], self.text_kv, audio, kv, cond, inputs)
            if self.on_forward is not None:
                self.on_forward(job.clip, job.block, step, x, velocity)
            x = self.schedule.step(step, x, velocity)
        self.done.append(x)

    def collect(self) -> torch.Tensor:
        return self.done.popleft()


class SequentialFactory(ExecutorFactory):
    """One device runs every step: a `SequentialExecutor` per request."""

    def __call__(self, model, caches: CacheSet, schedule: FlowMatchSchedule, text_kv, *,
                 on_forward: ForwardHook | None = None, graphs: ForwardGraphs | None = None) -> SequentialExecutor:
        return SequentialExecutor(model, caches, schedule, text_kv, on_forward=on_forward, graphs=graphs)
