"""All denoising steps of a block, one after the other, on one device."""
from __future__ import annotations

from collections import deque

import torch

from liveavatar.runtime.caches import CacheSet
from liveavatar.runtime.executors.base import BlockJob, ForwardHook
from liveavatar.runtime.executors.graphs import ForwardGraphs
from liveavatar.runtime.schedule import FlowMatchSchedule


class SequentialExecutor:
    """Denoises each block as it is submitted.

    Step i attends to KV set i, which only ever holds K/V computed at timestep i (the reference's
    "timestep forcing"); the cond cache written by the sink prefill is shared by every step. The request
    state lives here, not on the model: the text's K/V, the steps' time vectors and the RoPE-offset
    draws (``ref_rope_offset(step)`` gives the next draw of a step). With ``graphs`` (a `ForwardGraphs`,
    owned by the engine so that its graphs serve every request) the forwards replay CUDA graphs.
    """

    depth = 1

    def __init__(self, model, caches: CacheSet, schedule: FlowMatchSchedule, text_kv, *, ref_rope_offset,
                 on_forward: ForwardHook | None = None, graphs: ForwardGraphs | None = None):
        self.model = model
        self.caches = caches
        self.schedule = schedule
        self.text_kv = text_kv
        self.ref_rope_offset = ref_rope_offset
        self.on_forward = on_forward
        self.forward = graphs.forward if graphs is not None else model.run_block
        self.times = [model.time_vectors(schedule.timestep(step)) for step in range(schedule.num_steps)]
        self.done: deque[torch.Tensor] = deque()

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        self.model.prefill_sink(self.caches.cond, self.text_kv, ref_latents, motion_latents)

    def submit(self, job: BlockJob) -> None:
        model, cond = self.model, self.caches.cond
        audio = model.audio_tokens(job.audio)
        x = job.noise
        for step in range(self.schedule.num_steps):
            kv = self.caches.kv_sets[step]
            inputs = model.prepare_block(x, audio, kv, cond, start_frame=job.start_frame,
                                         ref_rope_offset=self.ref_rope_offset(step))
            velocity = self.forward(x, self.times[step], self.text_kv, audio, kv, cond, inputs)
            if self.on_forward is not None:
                self.on_forward(job.clip, job.block, step, x, velocity)
            x = self.schedule.step(step, x, velocity)
        self.done.append(x)

    def collect(self) -> torch.Tensor:
        return self.done.popleft()
