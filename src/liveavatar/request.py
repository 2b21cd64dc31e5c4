"""A generation request, resolved once: the decoded image, the audio source, the geometry, the length, the
seed, the mode and the RoPE-offset policy. The CLI, the Python API and the server build one with
`resolve_request`; every later stage reads it and nothing re-derives or re-validates it.

Audio sources: `WaveformAudio` (a whole file or array, decoded once), or a `LiveSource` (samples pushed as
they arrive; the run lasts until the source ends), which computes its own features:
`liveavatar.runtime.live_audio.LiveAudio`.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

import numpy as np
from PIL import Image

from liveavatar.errors import ArgumentError, InputError
from liveavatar.geometry import (
    AUDIO_SAMPLE_RATE,
    DEFAULT_SIZE,
    DROPPED_LEADING_FRAMES,
    FRAMES_PER_BLOCK,
    FPS,
    MIN_AREA,
    MODES,
    REF_ROPE_OFFSET_RANGE,
    SIZE_GRANULARITY,
    WAV2VEC_WINDOW,
    ClipGeometry,
    SIZE_FORMS,
    audio_clip_count,
    audio_video_frames,
    size_for_area,
)
from liveavatar.io.media import load_audio, load_image, waveform_from_array

MAX_SEED = 2**63 - 1
# Audio longer than this gets its wav2vec2 features block by block (bounded memory) instead of in one pass
# over the whole file as the reference does (whose attention cost grows with the square of the length).
WHOLE_FILE_AUDIO_LIMIT_S = 300.0
DEFAULT_SAMPLE_STEPS = 4  # the LoRA is distilled for 4
ONLINE_DECODE_IGNORED = ("enable_online_decode: ignored, it belongs to mode single_gpu; the streaming pipeline "
                         "always refreshes the sink from the first generated latent")

ImageInput = Union[str, os.PathLike, Image.Image]
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX×]\s*(\d+)\s*$")


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
    """One video to make. ``num_clips`` None: as long as the (live) audio lasts. Requests compare by
    identity (they hold decoded pixels and samples)."""

    image: Image.Image
    audio: AudioSource
    prompt: str
    geometry: ClipGeometry
    num_clips: int | None
    audio_clips: int | None
    sample_steps: int
    base_seed: int
    mode: str
    online_decode: bool
    ref_rope_offset: str | int
    streamed_audio_features: bool
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
        return -(-blocks // per_clip) * per_clip if self.mode == "single_gpu" else blocks

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


def _infer_frames_advice(asked) -> str:
    """The valid clip lengths nearest to what was asked: the one below uses less memory, the nearest keeps the
    length (the default, 48, when the value is no positive number)."""
    if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
        return "use 48 (the default)"
    below = max(FRAMES_PER_BLOCK, asked // FRAMES_PER_BLOCK * FRAMES_PER_BLOCK)
    nearest = max(FRAMES_PER_BLOCK, (asked + FRAMES_PER_BLOCK // 2) // FRAMES_PER_BLOCK * FRAMES_PER_BLOCK)
    if below == nearest:
        return f"use {nearest} (the nearest, and less memory)"
    return f"use {below} for less memory, or {nearest} for the nearest length"


def parse_size(text: str) -> int:
    """``"704*384"`` (or x, X, ×, with spaces) -> the area 270336. Only the product is used."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ArgumentError("size", f"{text!r}: expected WIDTH*HEIGHT, e.g. {SIZE_FORMS}")
    area = int(match.group(1)) * int(match.group(2))
    if area < MIN_AREA:
        raise ArgumentError("size", f"{text!r}: the area must be at least 64*64; accepted forms: {SIZE_FORMS}")
    return area


def parse_ref_rope_offset(value: str | int) -> str | int:
    """``seeded`` | ``random`` | an integer in 4..30 (the reference's relative_dist range)."""
    text = str(value).strip().lower()
    if text in ("seeded", "random"):
        return text
    low, high = REF_ROPE_OFFSET_RANGE
    if not isinstance(value, bool) and text.lstrip("+-").isdigit() and low <= int(text) <= high:
        return int(text)
    raise ArgumentError("ref_rope_offset", f"{value!r}: expected seeded, random or an integer in {low}..{high}")


def resolve_online_decode(mode: str, enable_online_decode: bool) -> tuple[bool, tuple[str, ...]]:
    """The one rule for online decode: it belongs to single_gpu mode; in streaming mode it is ignored with a
    notice (the streaming pipeline always refreshes the sink from the first generated latent)."""
    if enable_online_decode and mode != "single_gpu":
        return False, (ONLINE_DECODE_IGNORED,)
    return bool(enable_online_decode), ()


def resolve_request(image: ImageInput, audio, prompt: str | None = "", *, size: int | str = DEFAULT_SIZE,
                    infer_frames: int = 48, sample_steps: int = DEFAULT_SAMPLE_STEPS, num_clip: int | None = None,
                    base_seed: int = 420, mode: str = "streaming", enable_online_decode: bool = False,
                    ref_rope_offset: str | int = "seeded", streamed_audio_features: bool = False) -> Request:
    """Check every argument, decode the image and the audio once, and fix the geometry and the length.

    ``image``: a path or a PIL image. ``audio``: a path, a 16 kHz mono waveform (float, or integer PCM,
    which is scaled), or a `LiveAudio`. ``size``: an area, ``"704*384"`` or a number; the aspect ratio
    follows the image. ``streamed_audio_features``: compute wav2vec2 features block by block as a live
    session does (always so for live audio and for audio longer than 300 s).
    """
    notices: tuple[str, ...] = ()
    area = parse_size(size) if isinstance(size, str) else size
    if isinstance(area, bool) or not isinstance(area, int) or area < MIN_AREA:
        raise ArgumentError("size", f"{size!r}: expected an area of at least 64*64, e.g. '704*384' or 270336")
    if not isinstance(infer_frames, int) or infer_frames <= 0 or infer_frames % FRAMES_PER_BLOCK:
        raise ArgumentError("infer_frames", f"{infer_frames}: must be a positive multiple of {FRAMES_PER_BLOCK}, as "
                                            f"each block denoises 3 latent frames = {FRAMES_PER_BLOCK} video frames "
                                            f"(the reference leaves a clip's leftover latent frames undenoised); "
                                            f"{_infer_frames_advice(infer_frames)}")
    if not isinstance(sample_steps, int) or sample_steps < 1:
        raise ArgumentError("sample_steps", f"{sample_steps}: must be at least 1 (the LoRA is distilled for 4)")
    if num_clip is not None and (not isinstance(num_clip, int) or num_clip < 1):
        raise ArgumentError("num_clip", f"{num_clip}: must be at least 1 (leave it out for the whole audio)")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not -1 <= base_seed <= MAX_SEED:
        raise ArgumentError("base_seed", f"{base_seed!r}: must be -1 (draw one) or an integer in 0..{MAX_SEED}")
    if base_seed == -1:
        base_seed = secrets.randbelow(2**31)
        notices += (f"base_seed -1: using seed {base_seed}",)
    if mode not in MODES:
        raise ArgumentError("mode", f"{mode!r}: expected one of {', '.join(MODES)}")
    online_decode, online_notices = resolve_online_decode(mode, enable_online_decode)
    notices += online_notices
    offset = parse_ref_rope_offset(ref_rope_offset)
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ArgumentError("prompt", f"expected text, got {type(prompt).__name__}")

    picture = image if isinstance(image, Image.Image) else load_image(image)
    height, width = size_for_area(picture.height, picture.width, area)
    if height < SIZE_GRANULARITY or width < SIZE_GRANULARITY:
        raise InputError(f"image: its aspect ratio {picture.width}x{picture.height} is too extreme for size area "
                         f"{area} (got {width}x{height}); crop it or raise the area")
    geometry = ClipGeometry(height, width, infer_frames)
    if area > picture.width * picture.height:
        notices += (f"size {size}: larger than the image ({picture.width}x{picture.height}), which is not upscaled; "
                    f"the video is {width}x{height}",)

    if isinstance(audio, LiveSource):
        if mode != "streaming":
            raise InputError("live audio runs in mode streaming (single_gpu decodes whole clips, which needs "
                             "the audio's length up front)")
        return Request(picture, audio, prompt, geometry, num_clip, None, sample_steps, base_seed, mode,
                       online_decode, offset, True, notices)
    source = _waveform_audio(audio)
    if len(source.samples) < WAV2VEC_WINDOW:
        raise InputError(f"audio {source.path or 'waveform'}: {len(source.samples)} samples at 16 kHz is shorter "
                         f"than the {WAV2VEC_WINDOW / AUDIO_SAMPLE_RATE * 1000:.0f} ms one audio feature needs")
    audio_clips = audio_clip_count(len(source.samples), infer_frames)
    num_clips = audio_clips if num_clip is None else min(num_clip, audio_clips)
    streamed = streamed_audio_features or len(source.samples) > WHOLE_FILE_AUDIO_LIMIT_S * AUDIO_SAMPLE_RATE
    return Request(picture, source, prompt, geometry, num_clips, audio_clips, sample_steps, base_seed, mode,
                   online_decode, offset, streamed, notices)


def _waveform_audio(audio) -> WaveformAudio:
    if isinstance(audio, WaveformAudio):
        return audio
    if isinstance(audio, np.ndarray):
        return WaveformAudio(waveform_from_array(audio))
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio).expanduser().absolute()
        return WaveformAudio(load_audio(path), path)
    raise InputError(f"audio: expected a file path, a 16 kHz mono waveform or a LiveAudio, got {type(audio).__name__}")
