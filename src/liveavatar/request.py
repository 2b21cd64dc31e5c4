"""A generation request, resolved once: the decoded image, the audio source, the geometry, the length and
the options (`liveavatar.options.RequestOptions`, with the seed drawn). The CLI, the Python API and the
server build one with `resolve_request`; every later stage reads it and nothing re-derives or re-validates it.

Audio sources: `WaveformAudio` (a whole file or array, decoded once), or a `LiveSource` (samples pushed as
they arrive; the run lasts until the source ends), which computes its own features:
`liveavatar.runtime.live_audio.LiveAudio`.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

import numpy as np
from PIL import Image

from liveavatar.errors import ArgumentError, InputError
from liveavatar.geometry import (
    AUDIO_SAMPLE_RATE,
    DROPPED_LEADING_FRAMES,
    FPS,
    SIZE_GRANULARITY,
    WAV2VEC_WINDOW,
    ClipGeometry,
    audio_clip_count,
    audio_video_frames,
    size_for_area,
)
from liveavatar.io.media import load_audio, load_image, waveform_from_array
from liveavatar.options import Mode, RequestOptions

# Audio longer than this gets its wav2vec2 features block by block (bounded memory) instead of in one pass
# over the whole file as the reference does (whose attention cost grows with the square of the length).
WHOLE_FILE_AUDIO_LIMIT_S = 300.0

ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass(frozen=True, eq=False)
class WaveformAudio:
    """Audio known in full: 16 kHz mono float32 ``samples`` and the file they came from (muxed into an mp4)."""

    samples: np.ndarray
    path: Path | None = None


@runtime_checkable
class LiveSource(Protocol):
    """Audio that arrives while the video is made. ``block_features`` gives the loop's per-block features
    (an object with ``block(clip, block) -> features | None``, None once the audio has ended), computed
    with the engine's wav2vec2 ``extractor``."""

    def block_features(self, extractor, geometry: ClipGeometry): ...


AudioSource = Union[WaveformAudio, LiveSource]


@dataclass(frozen=True, eq=False)
class Request:
    """One video to make. ``num_clips`` None: as long as the (live) audio lasts. ``options`` as resolved: a
    concrete ``base_seed``, ``streamed_audio_features`` on where the audio needs it. Requests compare by
    identity (they hold decoded pixels and samples)."""

    image: Image.Image
    audio: AudioSource
    prompt: str
    geometry: ClipGeometry
    options: RequestOptions
    num_clips: int | None
    audio_clips: int | None
    notices: tuple[str, ...] = field(default=())

    @property
    def num_frames(self) -> int | None:
        """Frames the video holds: its clips' frames, cut where the audio ends (as the reference's
        ``-shortest`` mux cuts its mp4)."""
        if self.num_clips is None:
            return None
        frames = self.geometry.video_frames(self.num_clips)
        if isinstance(self.audio, WaveformAudio):
            frames = min(frames, audio_video_frames(len(self.audio.samples)))
        return frames

    @property
    def total_blocks(self) -> int | None:
        """Blocks to generate: those the video's frames need (none past the audio's end is made, since it
        would be cut away), in whole clips in single_gpu mode (which decodes clip by clip)."""
        if self.num_clips is None:
            return None
        blocks, per_clip = self.geometry.blocks_for_frames(self.num_frames), self.geometry.blocks_per_clip
        return -(-blocks // per_clip) * per_clip if self.options.mode == Mode.SINGLE_GPU else blocks

    @property
    def generated_frames(self) -> int | None:
        """Frames the generated blocks decode to (at least ``num_frames``)."""
        if self.num_clips is None:
            return None
        return self.total_blocks * self.geometry.frames_per_block - DROPPED_LEADING_FRAMES

    @property
    def audio_seconds(self) -> float | None:
        if isinstance(self.audio, WaveformAudio):
            return len(self.audio.samples) / AUDIO_SAMPLE_RATE
        return None

    def summary(self) -> str:
        """The one line printed before any heavy work: resolution, latents, tokens, clips, frames, seconds."""
        g = self.geometry
        head = (f"{g.width}x{g.height} (latent {g.latent_width}x{g.latent_height}, {g.frame_tokens} tokens/frame)")
        if self.num_clips is None:
            return f"{head}, {g.infer_frames}-frame clips for as long as the audio lasts at {FPS} fps"
        clips = f"{self.num_clips} clip{'s' if self.num_clips != 1 else ''}"
        if self.num_clips < self.audio_clips:
            clips += f" of {self.audio_clips}"
        line = (f"{head}, {clips} x {g.infer_frames} frames -> {self.num_frames} frames = "
                f"{self.num_frames / FPS:g} s at {FPS} fps (audio {round(self.audio_seconds, 3):g} s)")
        if self.generated_frames != self.num_frames:
            line += (f"; {self.total_blocks} blocks make {self.generated_frames} frames, cut to the audio's "
                     f"{self.num_frames}")
        return line

    def shape_report(self) -> dict:
        """What ``--dry-run --json`` reports about the video's shape."""
        g = self.geometry
        return {
            "width": g.width, "height": g.height, "latent_width": g.latent_width, "latent_height": g.latent_height,
            "tokens_per_frame": g.frame_tokens, "infer_frames": g.infer_frames, "audio_clips": self.audio_clips,
            "num_clips": self.num_clips, "num_frames": self.num_frames, "total_blocks": self.total_blocks,
            "generated_frames": self.generated_frames, "fps": FPS,
            "duration_s": None if self.num_frames is None else round(self.num_frames / FPS, 3),
            "audio_s": None if self.audio_seconds is None else round(self.audio_seconds, 3),
        }


def resolve_request(image: ImageInput, audio, prompt: str | None = "",
                    options: RequestOptions | None = None) -> Request:
    """Decode the image and the audio once and fix the geometry and the length (``options``: default the
    defaults; they were checked when built).

    ``image``: a path or a PIL image. ``audio``: a path, a 16 kHz mono waveform (float, or integer PCM,
    which is scaled), a `LiveAudio` or another `LiveSource`.
    """
    options = options or RequestOptions()
    notices: tuple[str, ...] = ()
    if options.base_seed == -1:
        options = replace(options, base_seed=secrets.randbelow(2**31))
        notices += (f"base_seed -1: using seed {options.base_seed}",)
    notices += options.notices
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ArgumentError("prompt", f"expected text, got {type(prompt).__name__}")

    picture = image if isinstance(image, Image.Image) else load_image(image)
    area = options.size
    height, width = size_for_area(picture.height, picture.width, area)
    if height < SIZE_GRANULARITY or width < SIZE_GRANULARITY:
        raise InputError(f"image: its aspect ratio {picture.width}x{picture.height} is too extreme for size area "
                         f"{area} (got {width}x{height}); crop it or raise the area")
    geometry = ClipGeometry(height, width, options.infer_frames)
    if area > picture.width * picture.height:
        notices += (f"size {area}: larger than the image ({picture.width}x{picture.height}), which is not upscaled; "
                    f"the video is {width}x{height}",)

    if isinstance(audio, LiveSource):
        if options.mode != Mode.STREAMING:
            raise InputError("live audio runs in mode streaming (single_gpu decodes whole clips, which needs "
                             "the audio's length up front)")
        return Request(picture, audio, prompt, geometry, replace(options, streamed_audio_features=True),
                       options.num_clip, None, notices)
    source = _waveform_audio(audio)
    if len(source.samples) < WAV2VEC_WINDOW:
        raise InputError(f"audio {source.path or 'waveform'}: {len(source.samples)} samples at 16 kHz is shorter "
                         f"than the {WAV2VEC_WINDOW / AUDIO_SAMPLE_RATE * 1000:.0f} ms one audio feature needs")
    audio_clips = audio_clip_count(len(source.samples), options.infer_frames)
    num_clips = audio_clips if options.num_clip is None else min(options.num_clip, audio_clips)
    if len(source.samples) > WHOLE_FILE_AUDIO_LIMIT_S * AUDIO_SAMPLE_RATE:
        options = replace(options, streamed_audio_features=True)
    return Request(picture, source, prompt, geometry, options, num_clips, audio_clips, notices)


def _waveform_audio(audio) -> WaveformAudio:
    if isinstance(audio, WaveformAudio):
        return audio
    if isinstance(audio, np.ndarray):
        return WaveformAudio(waveform_from_array(audio))
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio).expanduser().absolute()
        return WaveformAudio(load_audio(path), path)
    raise InputError(f"audio: expected a file path, a 16 kHz mono waveform or a LiveAudio, got {type(audio).__name__}")
