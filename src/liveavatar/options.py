"""A generation's options, the only place their defaults and rules live: `RequestOptions`.

The command line, the Python API, the server's form and the live start message all build one (each in
one function) and hand it to `liveavatar.request.resolve_request`; an option's value is checked here,
once, when the options are built, and nothing later re-checks it. Adding an option: DESIGN.md, "Adding a
request option".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from enum import StrEnum

from liveavatar.errors import ArgumentError
from liveavatar.geometry import FRAMES_PER_BLOCK, LATENT_FRAMES_PER_BLOCK, MIN_AREA, REF_ROPE_OFFSET_RANGE

MAX_SEED = 2**63 - 1
MIN_LAG_BOUND_S = 0.5
DEFAULT_SIZE = "704*384"
SIZE_FORMS = "704*384, 704x384, 704X384, 704×384 or '704 * 384'"
ONLINE_DECODE_IGNORED = ("enable_online_decode: ignored, it belongs to mode single_gpu; the streaming pipeline "
                         "always refreshes the sink from the first generated latent")
# The blocks' self-attention: bf16 (the reference's exact attention) or quantised (opt-in; see
# liveavatar.models.quantised_attention).
ATTENTION_MODES = ("bf16", "int8", "fp8")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX×]\s*(\d+)\s*$")
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


class Mode(StrEnum):
    """Which reference behaviour the one loop reproduces. ``streaming``: the multi-GPU TPP pipeline (the
    paper's: VAE(ref) as the sink, replaced by the first generated latent before clip 1, one continuous
    streaming decode). ``single_gpu``: the single-GPU script, where ``enable_online_decode`` has its meaning."""

    STREAMING = "streaming"
    SINGLE_GPU = "single_gpu"


def attention_mode(value) -> str:
    """The one rule for a self-attention mode (``--attention``), wherever a mode enters: the request's options
    and the engine's or a benchmark's direct calls."""
    mode = str(value).strip().lower()
    if mode not in ATTENTION_MODES:
        raise ArgumentError("attention", f"{value!r}: expected one of {', '.join(ATTENTION_MODES)}")
    return mode


@dataclass(frozen=True)
class RequestOptions:
    """How to make one video, checked when built (bad values raise `ArgumentError` naming the option).

    size: an AREA (``"704*384"`` in any spelling of `SIZE_FORMS`, or a number), kept as the area; the aspect
    ratio follows the image. num_clip: at most this many clips (None: as many as the audio needs).
    base_seed: clip r is seeded with base_seed + r; -1 draws one when the request is resolved.
    ref_rope_offset: the rolling sink's RoPE offset rd; ``seeded`` draws it from generators seeded with
    base_seed, ``random`` unseeded like the reference, an int in 4..30 fixes it. streamed_audio_features:
    wav2vec2 block by block as a live session does (always so for live audio and audio over 300 s).
    live_lag_bound_s: with live audio fed in real time, how far behind real time the queued audio may end
    before the session catches up (`liveavatar.runtime.live_audio`).
    attention: the blocks' self-attention, ``bf16`` (exact) or quantised ``int8`` / ``fp8`` (SageAttention2's
    method; bf16 with a notice where the GPU cannot run it).
    """

    size: int | str = DEFAULT_SIZE
    infer_frames: int = 48
    sample_steps: int = 4
    num_clip: int | None = None
    base_seed: int = 420
    mode: Mode = Mode.STREAMING
    enable_online_decode: bool = False
    ref_rope_offset: str | int = "seeded"
    streamed_audio_features: bool = False
    live_lag_bound_s: float = 2.0
    attention: str = "bf16"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # normalise in place (frozen)
        size = self.size
        set_("size", parse_size(size) if isinstance(size, str) else size)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < MIN_AREA:
            raise ArgumentError("size", f"{size!r}: expected an area of at least 64*64, e.g. '704*384' or 270336")
        frames = self.infer_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0 or frames % FRAMES_PER_BLOCK:
            raise ArgumentError("infer_frames", f"{frames}: must be a positive multiple of {FRAMES_PER_BLOCK}, as "
                                f"each block denoises {LATENT_FRAMES_PER_BLOCK} latent frames = {FRAMES_PER_BLOCK} "
                                f"video frames (the reference leaves a clip's leftover latent frames undenoised); "
                                f"{_infer_frames_advice(frames)}")
        if isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise ArgumentError("sample_steps", f"{self.sample_steps}: must be at least 1 (the LoRA is distilled "
                                                f"for 4)")
        if self.num_clip is not None and (not isinstance(self.num_clip, int) or self.num_clip < 1):
            raise ArgumentError("num_clip", f"{self.num_clip}: must be at least 1 (leave it out for the whole audio)")
        seed = self.base_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= MAX_SEED:
            raise ArgumentError("base_seed", f"{seed!r}: must be -1 (draw one) or an integer in 0..{MAX_SEED}")
        try:
            set_("mode", Mode(self.mode))
        except ValueError:
            raise ArgumentError("mode", f"{self.mode!r}: expected one of {', '.join(Mode)}") from None
        set_("enable_online_decode", _bool_option("enable_online_decode", self.enable_online_decode))
        set_("ref_rope_offset", parse_ref_rope_offset(self.ref_rope_offset))
        set_("streamed_audio_features", _bool_option("streamed_audio_features", self.streamed_audio_features))
        bound = self.live_lag_bound_s
        try:
            set_("live_lag_bound_s", float(bound))
        except (TypeError, ValueError):
            raise ArgumentError("live_lag_bound_s", f"{bound!r}: expected a number of seconds") from None
        if isinstance(bound, bool) or not self.live_lag_bound_s >= MIN_LAG_BOUND_S:
            raise ArgumentError("live_lag_bound_s", f"{bound!r}: must be at least {MIN_LAG_BOUND_S:g} s (a block is "
                                                    f"0.48 s of audio)")
        set_("attention", attention_mode(self.attention))

    @classmethod
    def build(cls, options: RequestOptions | None = None, **overrides) -> RequestOptions:
        """``options`` (default: the defaults) with ``overrides`` by option name; an unknown name is refused."""
        unknown = [name for name in overrides if name not in OPTION_NAMES]
        if unknown:
            raise ArgumentError(unknown[0], f": not an option; the options are {', '.join(OPTION_NAMES)}")
        return replace(options or cls(), **overrides) if overrides else options or cls()

    @property
    def online_decode(self) -> bool:
        """The one rule for online decode: it belongs to single_gpu mode (the streaming pipeline always
        refreshes the sink from the first generated latent)."""
        return self.enable_online_decode and self.mode == Mode.SINGLE_GPU

    @property
    def notices(self) -> tuple[str, ...]:
        """What the user should hear about these options (an option that has no effect)."""
        return (ONLINE_DECODE_IGNORED,) if self.enable_online_decode and not self.online_decode else ()


def option_from_text(name: str, text: str):
    """An option's value from text (a form field, a start message's value): the type its field declares."""
    if name not in OPTION_NAMES:
        raise ArgumentError(name, f": not an option; the options are {', '.join(OPTION_NAMES)}")
    kind = next(field.type for field in fields(RequestOptions) if field.name == name)
    if kind in ("int", "int | None"):
        try:
            return int(text)
        except ValueError:
            raise ArgumentError(name, f"{text!r}: expected an integer") from None
    return _bool_option(name, text) if kind == "bool" else text


def _infer_frames_advice(asked) -> str:
    """The valid clip lengths nearest to what was asked: the one below uses less memory, the nearest keeps the
    length (the default when the value is no positive number)."""
    if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
        return f"use {RequestOptions.infer_frames} (the default)"
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


def parse_bool(text: str | bool) -> bool:
    """True/False, 1/0, yes/no, on/off (any case), or a bool."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"expected True/False, 1/0 or yes/no, got {text!r}")


def _bool_option(name: str, value: str | bool) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        raise ArgumentError(name, f"{value!r}: expected True/False, 1/0 or yes/no") from None


OPTION_NAMES = tuple(field.name for field in fields(RequestOptions))
DEFAULTS = RequestOptions()  # what the flags, the server and the planner show and assume (size as an area)
