"""THE sampling loop: clips of blocks, each block denoised in ``num_steps`` Euler steps, decoded as it is done.

One loop serves both reference behaviours (pipeline.md §7-8, parallel_and_memory.md §1.4):

* ``mode="streaming"`` (default; the paper / multi-GPU TPP pipeline): the first generated latent frame
  (clip 0, block 0, frame 0) replaces the reference latent and the sink is re-prefilled before clip 1;
  the motion latents never change; every block is decoded as soon as it is clean by one continuous
  streaming VAE decode, warmed up with the first 7 motion latents.
* ``mode="single_gpu"`` (the single-GPU script): each clip is decoded after its last block with the
  re-encoded pixel history as context. With ``online_decode`` the history re-encoded after clip 0
  becomes the DiT's motion latents, clip 0's first latent frame becomes the reference, and the sink is
  re-prefilled before clip 1 (and only then).

Either way the first 3 decoded frames are dropped, so N clips give 48·N − 3 frames. Nothing accumulates
across clips or blocks: the loop yields events and forgets them.

Where the DiT forwards run is an executor's business. `SequentialExecutor` runs all steps of a block one
after the other on one device (step i uses KV set i; one cond cache shared by all steps). The loop only
asks it to prefill the sink and to denoise block b of clip r, so a pipeline-parallel executor (step i on
rank i, "timestep forcing") can replace it without touching the loop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, Union

import torch

from liveavatar.geometry import (
    DROPPED_LEADING_FRAMES,
    MOTION_FRAMES,
    MOTION_LATENT_FRAMES,
    REF_ROPE_OFFSET_RANGE,
    ClipGeometry,
    check_mode,
)
from liveavatar.runtime.conditioning import ReferenceLatents
from liveavatar.runtime.schedule import FlowMatchSchedule

STREAM_DECODE_WARMUP_LATENTS = 7

RefRopeShift = Callable[[int], int]
"""Gives the reference RoPE shift (the reference's ``relative_dist``) of the next forward of a step."""


# --------------------------------------------------------------------------------------------------
# Reference RoPE shift policies


def ref_rope_shifts(policy: Union[str, int], *, base_seed: int, mode: str, num_steps: int) -> RefRopeShift:
    """The rd source for a run: ``"seeded"``, ``"random"`` or a fixed int in 4..30.

    "seeded" reproduces an official run whose Python ``random`` was seeded: in single_gpu mode one
    generator seeded with ``base_seed`` draws in call order (clip, block, step), as the single process of
    the reference does; in streaming mode step i has its own generator seeded with ``base_seed + i``, as
    rank i of the TPP pipeline does, so the draws do not depend on how steps are spread over devices.
    "random" draws from OS entropy, like the (unseeded) reference.
    """
    low, high = REF_ROPE_OFFSET_RANGE
    if isinstance(policy, bool) or not isinstance(policy, (int, str)):
        raise ValueError(f"ref_rope_offset must be 'seeded', 'random' or an integer (got {policy!r})")
    if isinstance(policy, int):
        if not low <= policy <= high:
            raise ValueError(f"ref_rope_offset must be in {low}..{high} (got {policy})")
        return lambda step: policy
    if policy == "random":
        entropy = random.SystemRandom()
        return lambda step: entropy.randint(low, high)
    if policy != "seeded":
        raise ValueError(f"ref_rope_offset must be 'seeded', 'random' or an integer (got {policy!r})")
    if check_mode(mode) == "single_gpu":
        shared = random.Random(base_seed)
        return lambda step: shared.randint(low, high)
    per_step = [random.Random(base_seed + i) for i in range(num_steps)]
    return lambda step: per_step[step].randint(low, high)


def recorded_ref_rope_shifts(draws: Union[Sequence[int], Sequence[Sequence[int]]]) -> RefRopeShift:
    """Replays recorded rd values: one list in call order, or one list per step (per TPP rank)."""
    if draws and isinstance(draws[0], Sequence):
        per_step = [iter(list(d)) for d in draws]
        return lambda step: next(per_step[step])
    shared = iter(list(draws))
    return lambda step: next(shared)


# --------------------------------------------------------------------------------------------------
# Executors


class BlockExecutor(Protocol):
    """Runs the DiT for the loop. ``prefill`` (re)fills the sink; ``denoise_block`` returns clean latents."""

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None: ...

    def denoise_block(self, noise: torch.Tensor, audio: torch.Tensor, *, clip: int, block: int,
                      start_frame: int) -> torch.Tensor: ...


ForwardHook = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]
"""Called after every DiT forward with (clip, block, step, input latents, predicted velocity)."""


class SequentialExecutor:
    """All denoising steps of a block in sequence on the model's device.

    Step i attends to KV set i, which only ever holds K/V computed at timestep i (the reference's
    "timestep forcing"); the cond cache written by the sink prefill is shared by every step.
    """

    def __init__(self, model, schedule: FlowMatchSchedule, text: torch.Tensor, geometry: ClipGeometry, *,
                 ref_rope_shift: RefRopeShift, on_forward: ForwardHook | None = None):
        self.model = model
        self.geometry = geometry
        self.schedule = schedule
        self.text = text
        self.ref_rope_shift = ref_rope_shift
        self.on_forward = on_forward
        self.kv_caches = [model.new_kv_cache(cache_frames=geometry.latent_frames, frame_tokens=geometry.frame_tokens)
                          for _ in range(schedule.num_steps)]
        self.cond_cache = model.new_cond_cache(cond_tokens=geometry.cond_tokens)

    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        self.model.prefill_sink(self.cond_cache, self.text, ref_latents, motion_latents)

    def denoise_block(self, noise: torch.Tensor, audio: torch.Tensor, *, clip: int, block: int,
                      start_frame: int) -> torch.Tensor:
        x = noise
        for step in range(self.schedule.num_steps):
            velocity = self.model.forward_block(
                x, self.schedule.timestep(step), self.text, audio, self.kv_caches[step], self.cond_cache,
                start_frame=start_frame, ref_rope_shift=self.ref_rope_shift(step))
            if self.on_forward is not None:
                self.on_forward(clip, block, step, x, velocity)
            x = self.schedule.step(step, x, velocity)
        return x


# --------------------------------------------------------------------------------------------------
# Decoders: clean latents in, video frames [3, T, H, W] float32 in [-1, 1] out


class BlockStreamDecoder:
    """streaming mode: one continuous causal decode of [motion[:7], block 0, block 1, ...].

    Equivalent to decoding the whole latent stream at once and dropping the first 25 + 3 frames, with
    memory independent of the video length (the VAE's streaming decoder carries only its conv caches).
    """

    def __init__(self, vae, motion_latents: torch.Tensor, geometry: ClipGeometry):
        self.vae = vae
        self.warmup = motion_latents[:, :, :STREAM_DECODE_WARMUP_LATENTS]
        self.frames_per_block = geometry.frames_per_block
        self.stream = None

    def add_block(self, latents: torch.Tensor) -> torch.Tensor:
        first = self.stream is None
        if first:
            self.stream = self.vae.stream_decoder()
            self.stream.decode(self.warmup)
        frames = self.stream.decode(latents.unsqueeze(0))[0, :, -self.frames_per_block:]
        return frames[:, DROPPED_LEADING_FRAMES:] if first else frames


class ClipContextDecoder:
    """single_gpu mode: decode each clip after its last block, with the re-encoded pixel history as context.

    Decodes cat(context latents, clip latents), keeps the last infer_frames frames (the very first clip
    drops 3 more), slides the pixel history by min(73, frames) frames and re-encodes it as the next
    context. The history keeps the length it started with (365 frames in the reference's single-GPU
    script). Only one clip's latents are held at a time.
    """

    def __init__(self, vae, reference: ReferenceLatents, geometry: ClipGeometry):
        self.vae = vae
        self.geometry = geometry
        self.history = reference.history
        self.context = reference.motion
        self.first_clip = True
        self.clip_latents: list[torch.Tensor] = []

    @property
    def dit_motion(self) -> torch.Tensor:
        """The re-encoded history as DiT motion latents (online decode)."""
        return self.context[:, :, -MOTION_LATENT_FRAMES:]

    def add_block(self, latents: torch.Tensor) -> torch.Tensor | None:
        self.clip_latents.append(latents)
        if len(self.clip_latents) < self.geometry.blocks_per_clip:
            return None
        clip_latents = torch.cat(self.clip_latents, dim=1)
        self.clip_latents = []
        return self._decode(clip_latents)

    def _decode(self, clip_latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(torch.cat([self.context, clip_latents.unsqueeze(0).to(self.context.dtype)], dim=2))
        video = video[:, :, -self.geometry.infer_frames:]
        if self.first_clip:
            video = video[:, :, DROPPED_LEADING_FRAMES:]
            self.first_clip = False
        overlap = min(MOTION_FRAMES, video.shape[2])
        # The reference casts the history to the context's dtype and the new context to the latents' dtype.
        self.history = torch.cat([self.history[:, :, overlap:].to(video.dtype), video[:, :, -overlap:]], dim=2)
        self.history = self.history.to(self.context.dtype)
        self.context = self.vae.encode(self.history).to(clip_latents.dtype)
        return video[0]


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class BlockLatents:
    """A denoised block: clean latents [16, 3, h, w] of block ``block`` of clip ``clip``."""

    clip: int
    block: int
    latents: torch.Tensor


@dataclass(frozen=True)
class VideoFrames:
    """Decoded frames [3, T, H, W] float32 in [-1, 1]; ``start`` is the output index of the first one."""

    start: int
    frames: torch.Tensor

    @property
    def count(self) -> int:
        return self.frames.shape[1]


LoopEvent = Union[BlockLatents, VideoFrames]


class BlockAudio(Protocol):
    def block(self, clip: int, block: int) -> torch.Tensor: ...


def sample(executor: BlockExecutor, vae, reference: ReferenceLatents, audio: BlockAudio, geometry: ClipGeometry,
           *, num_clips: int, noise: Callable[[int], torch.Tensor], mode: str = "streaming",
           online_decode: bool = False) -> Iterator[LoopEvent]:
    """Generate ``num_clips`` clips; yields every clean block, then the frames it completes, as they are made.

    ``noise(r)`` gives clip r's initial noise [16, latent_frames, h, w]; ``audio.block(r, b)`` the block's
    features [1, 25, C, frames_per_block] (asked for in order); ``reference`` comes from `encode_reference`
    in the same mode.
    """
    check_mode(mode)
    if online_decode and mode != "single_gpu":
        raise ValueError("enable_online_decode belongs to the single-GPU behaviour; use mode='single_gpu' with it")

    if mode == "streaming":
        decoder = BlockStreamDecoder(vae, reference.motion, geometry)
    else:
        decoder = ClipContextDecoder(vae, reference, geometry)
    refresh_sink = mode == "streaming" or online_decode
    motion = reference.dit_motion
    executor.prefill(reference.ref, motion)
    first_latent = None
    produced = 0
    for clip in range(num_clips):
        if clip == 1 and refresh_sink:
            if online_decode:
                motion = decoder.dit_motion
            executor.prefill(first_latent, motion)
        clip_noise = noise(clip)
        for block in range(geometry.blocks_per_clip):
            latents = executor.denoise_block(
                clip_noise[:, geometry.block_slice(block)], audio.block(clip, block),
                clip=clip, block=block, start_frame=geometry.start_frame(clip, block))
            if first_latent is None:
                first_latent = latents[:, 0:1].unsqueeze(0)
            yield BlockLatents(clip, block, latents)
            frames = decoder.add_block(latents)
            if frames is not None:
                yield VideoFrames(produced, frames)
                produced += frames.shape[1]
