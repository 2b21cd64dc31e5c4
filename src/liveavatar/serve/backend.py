"""The server's only door into the engine: load once, run a job, run a live session.

Everything serve/ needs from the engine goes through `Backend`, so that porting the server to the
`Engine` / `Request` / `LiveAudio` API touches this module (and `live_audio.py`, the pushed-audio
feature path that `LiveAudio` replaces) only:

* `Backend.load(...)`      -> ``Engine`` construction (placement from the planner, as ``generate``);
* `Backend.job(spec)`      -> ``engine.run(resolve_request(...))`` with the whole file as the audio;
* `Backend.live(spec, audio)` -> ``engine.run(resolve_request(..., audio=LiveAudio, num_clip=None))``.

Both return a `Run`: the output size, the block count when known, and an iterator of `BlockDone` and
`Frames` events. Closing the iterator stops the run within one block (the loop is a generator that is
suspended at a block boundary).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image

from liveavatar.geometry import ClipGeometry, size_for_area
from liveavatar.io.media import reference_tensor
from liveavatar.io.video_writer import pixels_to_uint8
from liveavatar.runtime.conditioning import clip_noise, encode_reference
from liveavatar.runtime.sampler import BlockLatents, SequentialExecutor, ref_rope_shifts, sample
from liveavatar.runtime.schedule import FlowMatchSchedule


@dataclass(frozen=True)
class JobSpec:
    """One validated video request; the files lie in the server's temp folder."""

    image: Path
    audio: Path
    prompt: str
    size_area: int
    sample_steps: int
    base_seed: int
    mode: str
    num_clip: int | None = None


@dataclass(frozen=True)
class LiveSpec:
    """A live session's settings (the audio comes separately, pushed while it runs)."""

    image: Image.Image
    prompt: str
    size_area: int
    sample_steps: int
    base_seed: int


@dataclass(frozen=True)
class BlockDone:
    blocks_done: int
    blocks_total: int | None  # None: a live session, which runs until it is stopped


@dataclass(frozen=True)
class Frames:
    start: int  # output index of the first frame
    frames: np.ndarray  # uint8 [N, H, W, 3]


Event = Union[BlockDone, Frames]


@dataclass
class Run:
    width: int
    height: int
    blocks_total: int | None
    events: Iterator[Event]


class Backend:
    """The loaded pipeline; one run at a time (the job queue's worker thread is its only caller)."""

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def load(cls, *, ckpt_dir: str, lora: str | None, device: str | None, dtype: str | None, fp8: bool,
             t5_cpu: bool, vram_budget: int | None, max_area: int, max_steps: int, work_dir: Path,
             prompt_cache_dir: str | None = None) -> "Backend":
        """Plan for the largest request the server accepts (``max_area`` at ``max_steps``), as ``generate``
        plans before loading, then load every model once."""
        from liveavatar.api import LiveAvatarPipeline
        from liveavatar.runtime.planner import plan_for_settings

        # The planner reads the aspect ratio from an image; a blank one of the largest landscape size stands in.
        height, width = size_for_area(9, 16, max_area)
        planning_image = work_dir / "planning.png"
        Image.new("RGB", (width, height)).save(planning_image)
        settings = SimpleNamespace(image=planning_image, size_area=max_area, infer_frames=48, sample_steps=max_steps,
                                   mode="streaming", device=device, dtype=dtype, ckpt_dir=Path(ckpt_dir), fp8=fp8,
                                   t5_cpu=t5_cpu, vram_budget=vram_budget)
        plan = plan_for_settings(settings).check()
        planning_image.unlink()
        if torch.cuda.is_available() and device != "cpu":
            print(f"plan: {plan.placement.describe()}; predicted peak {plan.predicted_peak_bytes / 2**30:.1f} GiB "
                  f"({plan.budget_source})", file=sys.stderr)
        pipe = LiveAvatarPipeline.from_pretrained(ckpt_dir, lora=lora, device=device, dtype=dtype,
                                                  placement=plan.placement, prompt_cache_dir=prompt_cache_dir)
        return cls(pipe)

    # ------------------------------------------------------------------------------------------------ jobs

    def job(self, spec: JobSpec) -> Run:
        """The whole-file video of a job, as ``generate`` makes it."""
        run = self.pipe._prepare(spec.image, spec.audio, spec.prompt, size=spec.size_area, infer_frames=48,
                                 sample_steps=spec.sample_steps, num_clip=spec.num_clip, base_seed=spec.base_seed,
                                 mode=spec.mode, enable_online_decode=False, ref_rope_offset="seeded")
        total = run.num_clips * run.geometry.blocks_per_clip
        return Run(run.geometry.width, run.geometry.height, total, _events(run.events, total))

    # ------------------------------------------------------------------------------------------------ live

    def live_geometry(self, spec: LiveSpec) -> ClipGeometry:
        height, width = size_for_area(spec.image.height, spec.image.width, spec.size_area)
        return ClipGeometry(height, width, 48)

    def audio_encoder(self):
        return self.pipe.audio_encoder

    def live(self, spec: LiveSpec, audio) -> Run:
        """An endless run driven by ``audio`` (a `live_audio.PushedAudio`): the streaming mode's loop with
        the pushed-audio features, clip after clip until the caller closes the events."""
        geometry = self.live_geometry(spec)
        schedule = FlowMatchSchedule.create(spec.sample_steps)
        rd = ref_rope_shifts("seeded", base_seed=spec.base_seed, mode="streaming", num_steps=spec.sample_steps)
        events = self._live_events(spec, audio, geometry, schedule, rd)
        return Run(geometry.width, geometry.height, None, _events(events, None))

    @torch.no_grad()
    def _live_events(self, spec: LiveSpec, audio, geometry: ClipGeometry, schedule, rd) -> Iterator:
        # The body of LiveAvatarPipeline._events with the audio source swapped for the pushed one; the
        # Engine takes the audio source from the Request instead.
        pipe = self.pipe
        with pipe.text_encoder:
            context = pipe.text_encoder.encode(spec.prompt)
        text = pipe.transformer.embed_text(context.to(pipe.device))
        reference = encode_reference(pipe.vae, reference_tensor(spec.image, geometry.height, geometry.width)
                                     .to(pipe.device, pipe.dtype), "streaming")
        executor = SequentialExecutor(pipe.transformer, schedule, text, geometry, ref_rope_shift=rd)
        yield from sample(executor, pipe.vae, reference, audio, geometry, num_clips=sys.maxsize,
                          noise=lambda clip: clip_noise(spec.base_seed, clip, geometry, device=pipe.device,
                                                        dtype=pipe.dtype))


def _events(loop: Iterator, total: int | None) -> Iterator[Event]:
    done = 0
    try:
        for event in loop:
            if isinstance(event, BlockLatents):
                done += 1
                yield BlockDone(done, total)
            else:
                yield Frames(event.start, pixels_to_uint8(event.frames))
    finally:
        loop.close()
