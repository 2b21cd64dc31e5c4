"""THE sampling loop: clips of blocks, each block denoised in ``num_steps`` Euler steps, decoded as it is done.

One loop serves both reference behaviours (``causal_s2v_pipeline_tpp.py`` and ``causal_s2v_pipeline.py``):

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

Where the DiT forwards run is the executor's business (`liveavatar.runtime.executors`): the loop submits
blocks and collects clean latents, with up to ``executor.depth`` blocks in flight. The decoder is handed
in (`make_decoder` builds the one a mode needs), so a decode on another stream or rank plugs in. The loop
runs for a given number of blocks, or, in streaming mode, until the audio source has no more blocks.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, Union

import numpy as np
import torch

from liveavatar.geometry import (
    DROPPED_LEADING_FRAMES,
    MOTION_FRAMES,
    MOTION_LATENT_FRAMES,
    REF_ROPE_OFFSET_RANGE,
    ClipGeometry,
)
from liveavatar.io.video_writer import pixels_to_uint8
from liveavatar.options import Mode
from liveavatar.runtime.conditioning import ReferenceLatents
from liveavatar.runtime.executors import BlockExecutor, BlockJob

STREAM_DECODE_WARMUP_LATENTS = 7

RefRopeOffset = Callable[[int], int]
"""Gives the reference RoPE offset (the reference's ``relative_dist``) of the next forward of a step."""


# --------------------------------------------------------------------------------------------------
# Reference RoPE offset policies


def ref_rope_offsets(policy: Union[str, int], *, base_seed: int, mode: Mode, num_steps: int) -> RefRopeOffset:
    """The offset source of a request: ``"seeded"``, ``"random"`` or a fixed int in 4..30.

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
    if mode == Mode.SINGLE_GPU:
        shared = random.Random(base_seed)
        return lambda step: shared.randint(low, high)
    per_step = [random.Random(base_seed + i) for i in range(num_steps)]
    return lambda step: per_step[step].randint(low, high)


def recorded_ref_rope_offsets(draws: Union[Sequence[int], Sequence[Sequence[int]]]) -> RefRopeOffset:
    """Replays recorded offsets: one list in call order, or one list per step (per TPP rank)."""
    if draws and isinstance(draws[0], Sequence):
        per_step = [iter(list(d)) for d in draws]
        return lambda step: next(per_step[step])
    shared = iter(list(draws))
    return lambda step: next(shared)


# --------------------------------------------------------------------------------------------------
# Decoders: clean latents in, video frames [3, T, H, W] float32 in [-1, 1] out


@dataclass(frozen=True)
class DecodedFrames:
    """What a decoder hands out: frames [3, T, H, W] float32 in [-1, 1] and, when the decoder already made
    them, the same frames as uint8 [T, H, W, 3] on the host."""

    frames: torch.Tensor
    pixels: np.ndarray | None = None


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

    def add_block(self, latents: torch.Tensor) -> list[DecodedFrames]:
        first = self.stream is None
        if first:
            self.stream = self.vae.stream_decoder()
            self.stream.decode(self.warmup)
        frames = self.stream.decode(latents.unsqueeze(0))[0, :, -self.frames_per_block:]
        return [DecodedFrames(frames[:, DROPPED_LEADING_FRAMES:] if first else frames)]

    def flush(self) -> list[DecodedFrames]:
        return []


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

    def add_block(self, latents: torch.Tensor) -> list[DecodedFrames]:
        self.clip_latents.append(latents)
        if len(self.clip_latents) < self.geometry.blocks_per_clip:
            return []
        clip_latents = torch.cat(self.clip_latents, dim=1)
        self.clip_latents = []
        return [DecodedFrames(self._decode(clip_latents))]

    def flush(self) -> list[DecodedFrames]:
        return []  # a clip is decoded when its last block is in; sample() only runs whole clips here

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
    """Decoded frames [3, T, H, W] float32 in [-1, 1]; ``start`` is the output index of the first one;
    ``pixels``: the same frames as uint8 [T, H, W, 3] on the host, when the decoder already made them."""

    start: int
    frames: torch.Tensor
    pixels: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self.frames.shape[1]

    def uint8(self) -> np.ndarray:
        """The frames as uint8 [T, H, W, 3] on the host (as the reference saves them)."""
        return self.pixels if self.pixels is not None else pixels_to_uint8(self.frames)


LoopEvent = Union[BlockLatents, VideoFrames]


class Decoder(Protocol):
    """Clean latents in, frames out: ``add_block`` returns the frames the block completes (none, or one
    piece per block or clip), ``flush`` what is still held at the end."""

    def add_block(self, latents: torch.Tensor) -> list[DecodedFrames]: ...

    def flush(self) -> list[DecodedFrames]: ...


class BlockAudio(Protocol):
    def block(self, clip: int, block: int) -> torch.Tensor | None:
        """Features [1, 25, C, frames_per_block] of a block (asked for in order); None once the audio
        source has ended before it."""


class NoDecoder:
    """Decodes nothing: the loop yields clean blocks only."""

    def add_block(self, latents: torch.Tensor) -> list[DecodedFrames]:
        return []

    def flush(self) -> list[DecodedFrames]:
        return []


def make_decoder(mode: Mode, vae, reference: ReferenceLatents, geometry: ClipGeometry) -> Decoder:
    """The decoder a mode needs: one streaming decode of every block, or the per-clip context decode."""
    if mode == Mode.STREAMING:
        return BlockStreamDecoder(vae, reference.motion, geometry)
    return ClipContextDecoder(vae, reference, geometry)


def sample(executor: BlockExecutor, decoder: Decoder, reference: ReferenceLatents, audio: BlockAudio,
           geometry: ClipGeometry, *, noise: Callable[[int], torch.Tensor], ref_rope_offset: RefRopeOffset,
           num_steps: int, total_blocks: int | None,
           mode: Mode = Mode.STREAMING, online_decode: bool = False) -> Iterator[LoopEvent]:
    """Generate ``total_blocks`` blocks (whole clips in single_gpu mode), or with None, in streaming mode,
    until ``audio.block`` says the audio has ended; yields every clean block, then the frames it completes.

    ``noise(r)`` gives clip r's initial noise [16, latent_frames, h, w]; ``ref_rope_offset`` draws each
    block's RoPE offsets, one per step of ``num_steps``, when the block is submitted; ``reference`` comes from
    `encode_reference` and ``decoder`` from `make_decoder`, both in the same mode.
    """
    if mode == Mode.SINGLE_GPU and (total_blocks is None or total_blocks % geometry.blocks_per_clip):
        raise ValueError("mode single_gpu decodes whole clips: give total_blocks as a whole number of clips")
    refresh_sink = mode == Mode.STREAMING or online_decode
    executor.prefill(reference.ref, reference.dit_motion)
    in_flight: deque[tuple[int, int]] = deque()
    first_latent = None
    produced = 0

    def emit(decoded: DecodedFrames) -> VideoFrames:
        nonlocal produced
        event = VideoFrames(produced, decoded.frames, decoded.pixels)
        produced += event.count
        return event

    def finish_one() -> Iterator[LoopEvent]:
        nonlocal first_latent
        clip, block = in_flight.popleft()
        latents = executor.collect()
        if first_latent is None:
            first_latent = latents[:, 0:1].unsqueeze(0)
        yield BlockLatents(clip, block, latents)
        for decoded in decoder.add_block(latents):
            yield emit(decoded)

    clip_noise = None
    index = 0
    while total_blocks is None or index < total_blocks:
        clip, block = divmod(index, geometry.blocks_per_clip)
        features = audio.block(clip, block)
        if features is None:
            break
        if block == 0:
            if clip == 1 and refresh_sink:
                # The new sink needs clip 0's first latent (and, with online decode, clip 0 decoded).
                while in_flight and (online_decode or first_latent is None):
                    yield from finish_one()
                executor.prefill(first_latent, decoder.dit_motion if online_decode else reference.dit_motion)
            clip_noise = noise(clip)
        draws = tuple(ref_rope_offset(step) for step in range(num_steps))
        executor.submit(BlockJob(clip, block, geometry.start_frame(clip, block),
                                 clip_noise[:, geometry.block_slice(block)], features, draws))
        in_flight.append((clip, block))
        while len(in_flight) >= executor.depth:
            yield from finish_one()
        index += 1
    while in_flight:
        yield from finish_one()
    for decoded in decoder.flush():
        yield emit(decoded)
