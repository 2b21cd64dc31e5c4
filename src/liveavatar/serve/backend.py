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

import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image

from liveavatar.geometry import ClipGeometry, size_for_area
from liveavatar.io.media import load_image, reference_tensor
from liveavatar.io.video_writer import pixels_to_uint8
from liveavatar.runtime.conditioning import ReferenceLatents, clip_noise, encode_reference
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
    """The loaded pipeline; one run at a time (the job queue's worker thread is its only caller).

    Keeps the reference latents of the last few portraits: a server sees the same avatar again and again,
    and encoding its 73-frame motion history is the largest fixed cost of a request after loading.
    """

    REFERENCE_CACHE_SIZE = 4

    def __init__(self, pipe):
        self.pipe = pipe
        self._references: OrderedDict[tuple, ReferenceLatents] = OrderedDict()

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

    def job(self, spec: JobSpec) -> Run:
        """The whole-file video of a job, as ``generate`` makes it."""
        # _prepare validates the request exactly as generate does; its loop is not started (closed unused).
        prepared = self.pipe._prepare(spec.image, spec.audio, spec.prompt, size=spec.size_area, infer_frames=48,
                                      sample_steps=spec.sample_steps, num_clip=spec.num_clip,
                                      base_seed=spec.base_seed, mode=spec.mode, enable_online_decode=False,
                                      ref_rope_offset="seeded")
        prepared.events.close()
        geometry = prepared.geometry
        audio = self.pipe._audio_features(self.pipe._waveform(spec.audio), geometry)
        total = prepared.num_clips * geometry.blocks_per_clip
        loop = self._loop(load_image(spec.image), audio, spec.prompt, geometry, prepared.num_clips,
                          sample_steps=spec.sample_steps, base_seed=spec.base_seed, mode=spec.mode)
        return Run(geometry.width, geometry.height, total, _events(loop, total))

    def live_geometry(self, spec: LiveSpec) -> ClipGeometry:
        height, width = size_for_area(spec.image.height, spec.image.width, spec.size_area)
        return ClipGeometry(height, width, 48)

    def audio_encoder(self):
        return self.pipe.audio_encoder

    def live(self, spec: LiveSpec, audio) -> Run:
        """An endless run driven by ``audio`` (a `live_audio.PushedAudio`): the streaming mode's loop with
        the pushed-audio features, clip after clip until the caller closes the events."""
        loop = self._loop(spec.image, audio, spec.prompt, self.live_geometry(spec), sys.maxsize,
                          sample_steps=spec.sample_steps, base_seed=spec.base_seed, mode="streaming")
        geometry = self.live_geometry(spec)
        return Run(geometry.width, geometry.height, None, _events(loop, None))

    @torch.no_grad()
    def _loop(self, picture: Image.Image, audio, prompt: str, geometry: ClipGeometry, num_clips: int, *,
              sample_steps: int, base_seed: int, mode: str) -> Iterator:
        # LiveAvatarPipeline._events with any audio source and the reference cache; the Engine takes the
        # audio source from the Request and owns the caches.
        pipe = self.pipe
        schedule = FlowMatchSchedule.create(sample_steps)
        rd = ref_rope_shifts("seeded", base_seed=base_seed, mode=mode, num_steps=sample_steps)
        with pipe.text_encoder:  # loads the encoder only on a prompt-cache miss, frees it on exit
            context = pipe.text_encoder.encode(prompt)
        text = pipe.transformer.embed_text(context.to(pipe.device))
        reference = self._reference(picture, geometry, mode)
        executor = SequentialExecutor(pipe.transformer, schedule, text, geometry, ref_rope_shift=rd)
        yield from sample(executor, pipe.vae, reference, audio, geometry, num_clips=num_clips,
                          noise=lambda clip: clip_noise(base_seed, clip, geometry, device=pipe.device, dtype=pipe.dtype),
                          mode=mode)

    def _reference(self, picture: Image.Image, geometry: ClipGeometry, mode: str) -> ReferenceLatents:
        pixels = reference_tensor(picture, geometry.height, geometry.width)
        key = (hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), geometry.height, geometry.width, mode)
        if key in self._references:
            self._references.move_to_end(key)
        else:
            self._references[key] = encode_reference(self.pipe.vae, pixels.to(self.pipe.device, self.pipe.dtype), mode)
            while len(self._references) > self.REFERENCE_CACHE_SIZE:
                self._references.popitem(last=False)
        return self._references[key]


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
