"""What the sampling loop is conditioned on: clip geometry, reference and motion latents, audio per block,
noise per clip.

The two reference behaviours (``causal_s2v_pipeline.py`` and ``causal_s2v_pipeline_tpp.py``) differ here only in how the
reference image is encoded:

* ``streaming`` (the paper's pipeline, our default): ref latent = VAE(reference as one frame); motion
  history = the reference repeated ``MOTION_FRAMES`` times.
* ``single_gpu`` (the single-GPU script): the reference is first repeated 5 times; ref latent = the
  second latent of VAE(those 5 frames); the motion history is those 5 frames repeated ``MOTION_FRAMES``
  times again (365 frames, 92 latents, of which the DiT reads the last 19). This 5x-too-long history is
  also the pixel context of the single-GPU per-clip decode, so it is reproduced as is.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from liveavatar.geometry import LATENT_CHANNELS, MOTION_FRAMES, MOTION_LATENT_FRAMES, ClipGeometry
from liveavatar.options import Mode

SINGLE_GPU_REFERENCE_REPEATS = 5


class WholeFileAudio:
    """Audio features computed over the whole file, as the reference does: [1, 25, C, clips * infer_frames]."""

    def __init__(self, features: torch.Tensor, geometry: ClipGeometry):
        self.features = features
        self.geometry = geometry

    def block(self, clip: int, block: int) -> torch.Tensor:
        """Features [1, 25, C, frames_per_block] driving block ``block`` of clip ``clip``."""
        start = clip * self.geometry.infer_frames + block * self.geometry.frames_per_block
        return self.features[..., start:start + self.geometry.frames_per_block]


class StreamedAudio:
    """Audio features made block by block (`StreamingAudioFeatures`) from a long file cut into pieces, so
    that memory stays bounded however long the audio is (live input has its own source:
    `liveavatar.runtime.live_audio`). Blocks must be asked for in order.

    ``next_chunk()`` returns the next samples, or None once the audio has ended. After the end, blocks are
    zeros (a file whose clip count covers more than its audio, as the whole-file path).
    """

    def __init__(self, streamer, next_chunk: Callable[[], np.ndarray | None], geometry: ClipGeometry, *,
                 feature_shape: tuple[int, int]):
        self.streamer = streamer
        self.next_chunk = next_chunk
        self.geometry = geometry
        self.feature_shape = feature_shape  # (hidden states, channels)
        self.ready: deque[torch.Tensor] = deque()
        self.next_block = 0
        self.finished = False

    def block(self, clip: int, block: int) -> torch.Tensor:
        index = clip * self.geometry.blocks_per_clip + block
        if index != self.next_block:
            raise ValueError(f"streamed audio blocks must be read in order: asked for {index}, next is {self.next_block}")
        self.next_block += 1
        while not self.ready and not self.finished:
            chunk = self.next_chunk()
            if chunk is None:
                self.ready.extend(self.streamer.finish())
                self.finished = True
            elif len(chunk):
                self.ready.extend(self.streamer.push(chunk))
        if self.ready:
            return self.ready.popleft()
        layers, channels = self.feature_shape
        return torch.zeros(1, layers, channels, self.geometry.frames_per_block)


def waveform_chunks(waveform: np.ndarray, chunk_samples: int = 16_000) -> Callable[[], np.ndarray | None]:
    """``next_chunk`` for `StreamedAudio` over a waveform known in full."""
    position = 0

    def next_chunk() -> np.ndarray | None:
        nonlocal position
        if position >= len(waveform):
            return None
        position += chunk_samples
        return waveform[position - chunk_samples:position]

    return next_chunk


def clip_noise(base_seed: int, clip: int, geometry: ClipGeometry, *, device, dtype) -> torch.Tensor:
    """Initial noise [16, latent_frames, h, w] of a clip: a CPU generator seeded with base_seed + clip.

    Drawn in float32 on the CPU so that every device gives the same video. The reference draws in
    bfloat16 with a CUDA generator, a stream no CPU run can reproduce; its float32 CPU fixtures draw
    exactly this tensor.
    """
    generator = torch.Generator("cpu").manual_seed(base_seed + clip)
    noise = torch.randn(LATENT_CHANNELS, geometry.latent_frames, geometry.latent_height, geometry.latent_width,
                        generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def motion_history(reference: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Pixel motion history [1, 3, T, H, W] the reference starts from: the reference image repeated."""
    repeats = MOTION_FRAMES * (SINGLE_GPU_REFERENCE_REPEATS if mode == Mode.SINGLE_GPU else 1)
    return reference.expand(-1, -1, repeats, -1, -1)


@dataclass
class ReferenceLatents:
    """The sink's conditioning latents and, for the single-GPU decode, the pixel history they came from."""

    ref: torch.Tensor  # [1, 16, 1, h, w] float32
    motion: torch.Tensor  # [1, 16, T, h, w] float32; the DiT reads the last MOTION_LATENT_FRAMES
    history: torch.Tensor  # [1, 3, T_pixels, H, W], the pixels ``motion`` encodes

    @property
    def dit_motion(self) -> torch.Tensor:
        return self.motion[:, :, -MOTION_LATENT_FRAMES:]


def encode_reference(vae, reference: torch.Tensor, mode: Mode) -> ReferenceLatents:
    """Reference and motion latents of ``reference`` [1, 3, 1, H, W] in [-1, 1], as the given mode makes them."""
    if mode == Mode.SINGLE_GPU:
        ref = vae.encode(reference.expand(-1, -1, SINGLE_GPU_REFERENCE_REPEATS, -1, -1))[:, :, 1:2]
    else:
        ref = vae.encode(reference)
    history = motion_history(reference, mode)
    return ReferenceLatents(ref=ref, motion=vae.encode(history), history=history)
