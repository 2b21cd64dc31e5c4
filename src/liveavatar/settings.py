"""Everything ``generate`` needs, validated once: the size search, clip counts and the settings dataclass.

``--size`` is an AREA, as in the reference: the output aspect ratio follows the reference image and the
height/width come from the reference's own search (``size_for_area``), so outputs line up with it.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from liveavatar.checkpoints.layout import BASE_DIR_NAME, LORA_REPO, CheckpointLayout
from liveavatar.geometry import (
    AUDIO_SAMPLE_RATE,
    DEFAULT_SIZE,
    FPS,
    FRAMES_PER_BLOCK,
    MIN_AREA,
    SIZE_GRANULARITY as MIN_SIDE,
    MODES,
    REF_ROPE_OFFSET_RANGE,
    WAV2VEC_WINDOW,
    ClipGeometry,
    audio_clip_count,
    size_for_area,
)
from liveavatar.devices import DTYPE_NAMES, dtype_bytes
from liveavatar.errors import InputError
from liveavatar.runtime.planner.hardware import HARDWARE_PRESETS, detect_hardware
from liveavatar.runtime.planner.memory import Workload, dit_inventory, transformer_config_for
from liveavatar.runtime.planner.policy import Pins, Plan, default_host_budget, make_plan, plan_cpu_run, resolve_budget

DEFAULT_CKPT_DIR = f"ckpt/{BASE_DIR_NAME}"
MAX_SEED = 2**63 - 1

SIZE_FORMS = "704*384, 704x384, 704X384, 704×384 or '704 * 384'"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX×]\s*(\d+)\s*$")
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_UNSAFE_NAME_CHARS = re.compile(r'[\s/\\:*?"<>|\x00-\x1f]')


def parse_size(text: str) -> int:
    """``"704*384"`` (or x, X, ×, with spaces) -> the area 270336. Only the product is used."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InputError(f"--size {text!r}: expected WIDTH*HEIGHT, e.g. {SIZE_FORMS}")
    area = int(match.group(1)) * int(match.group(2))
    if area < MIN_AREA:
        raise InputError(f"--size {text!r}: the area must be at least 64*64; accepted forms: {SIZE_FORMS}")
    return area


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected True/False, 1/0 or yes/no, got {text!r}")


def parse_vram_budget(text: str) -> int:
    """``"40"``, ``"40G"``, ``"40GiB"``, ``"40GB"``, ``"38000MiB"`` -> bytes. Units are binary; no unit = GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--vram-budget {text!r}: expected a positive amount such as 40, 40GiB or 38000MiB")
    power = "kmgt".index(match.group(2).lower()) + 1 if match.group(2) else 3
    return int(float(match.group(1)) * 1024**power)


def parse_ref_rope_offset(text: str | int) -> str | int:
    """``seeded`` | ``random`` | an integer in 4..30 (the reference's relative_dist range)."""
    value = str(text).strip().lower()
    if value in ("seeded", "random"):
        return value
    low, high = REF_ROPE_OFFSET_RANGE
    if re.fullmatch(r"[+-]?\d+", value) and low <= int(value) <= high:
        return int(value)
    raise InputError(f"--ref_rope_offset {text!r}: expected seeded, random or an integer in {low}..{high}")


def split_audio_spec(spec: str) -> list[Path]:
    """``a.wav+b.wav`` -> two paths, as in the reference, unless the whole string is an existing path."""
    whole = Path(spec).expanduser()
    if whole.exists() or "+" not in spec:
        return [whole.absolute()]
    parts = spec.split("+")
    if any(not part.strip() for part in parts):
        raise InputError(f"--audio {spec!r}: an empty name around '+'; join files as a.wav+b.wav")
    return [Path(part).expanduser().absolute() for part in parts]


@dataclass(frozen=True)
class GenerationSettings:
    """A validated description of one ``generate`` run. Paths are absolute; ``base_seed`` is concrete.

    mode: ``streaming`` (default) reproduces the multi-GPU TPP pipeline (the paper's behaviour: VAE(ref)
    as the sink, replaced by the first generated latent before clip 1, one continuous streaming decode);
    ``single_gpu`` reproduces the single-GPU script, where ``enable_online_decode`` has its meaning.
    ref_rope_offset: the rolling-sink RoPE offset rd; ``seeded`` draws it from a generator seeded with
    base_seed, ``random`` draws it unseeded like the reference, an int fixes it.
    """

    image: Path
    audio: tuple[Path, ...]
    prompt: str = ""
    ckpt_dir: Path = Path(DEFAULT_CKPT_DIR)
    lora: str | None = LORA_REPO
    size_area: int = parse_size(DEFAULT_SIZE)
    infer_frames: int = 48
    sample_steps: int = 4
    num_clip: int | None = None
    base_seed: int = 420
    mode: str = "streaming"
    enable_online_decode: bool = False
    ref_rope_offset: str | int = "seeded"
    fp8: bool = False
    t5_cpu: bool = False
    device: str | None = None  # None: CUDA when available, else the CPU
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU
    vram_budget: int | None = None
    save_file: Path | None = None
    save_dir: Path = Path("output")
    keep_partial: bool = False

    def __post_init__(self):
        # Normalise in place (frozen dataclass): absolute paths, an audio spec string split on '+'.
        audio = split_audio_spec(str(self.audio)) if isinstance(self.audio, (str, os.PathLike)) else self.audio
        self._normalise("audio", tuple(Path(p).expanduser().absolute() for p in audio))
        self._normalise("image", Path(self.image).expanduser().absolute())
        self._normalise("ckpt_dir", Path(self.ckpt_dir).expanduser().absolute())
        self._normalise("save_dir", Path(self.save_dir).expanduser().absolute())
        if self.save_file is not None:
            self._normalise("save_file", Path(self.save_file).expanduser().absolute())
        if self.dtype is not None:
            self._normalise("dtype", DTYPE_NAMES.get(str(self.dtype).lower(), self.dtype))
        if not self.audio:
            raise InputError("--audio: no audio file given")
        if len(self.audio) > 1:
            raise InputError(f"--audio: {len(self.audio)} files joined with '+' drive several actors, which needs the "
                             f"reference's SAM2 face routing; this engine takes one audio file")
        if self.size_area < MIN_AREA:
            raise InputError(f"--size: the area {self.size_area} is below 64*64")
        if self.infer_frames <= 0 or self.infer_frames % FRAMES_PER_BLOCK:
            raise InputError(f"--infer_frames {self.infer_frames}: must be a positive multiple of "
                             f"{FRAMES_PER_BLOCK} (a block is 3 latent frames = 12 video frames); use 48")
        if self.sample_steps < 1:
            raise InputError(f"--sample_steps {self.sample_steps}: must be at least 1 (the LoRA is distilled for 4)")
        if self.num_clip is not None and self.num_clip < 1:
            raise InputError(f"--num_clip {self.num_clip}: must be at least 1 (leave it out to cover the whole audio)")
        if not 0 <= self.base_seed <= MAX_SEED:
            raise InputError(f"--base_seed {self.base_seed}: must be -1 (random) or in 0..{MAX_SEED}")
        if self.mode not in MODES:
            raise InputError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.enable_online_decode and self.mode != "single_gpu":
            raise InputError("--enable_online_decode: belongs to --mode single_gpu (the streaming mode always "
                             "refreshes the sink from the first generated latent)")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES.values():
            raise InputError(f"--dtype {self.dtype!r}: expected bfloat16 or float32")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise InputError(f"--device {self.device!r}: expected cuda, cuda:N, cpu or mps")
        if self.vram_budget is not None and self.vram_budget <= 0:
            raise InputError("--vram-budget: must be positive")
        self._normalise("ref_rope_offset", parse_ref_rope_offset(self.ref_rope_offset))
        if self.save_file is not None:
            if self.save_file.suffix.lower() != ".mp4":
                raise InputError(f"--save_file {self.save_file}: the output is an H.264 .mp4; give a name ending in .mp4")
            if self.save_file.is_dir():
                raise InputError(f"--save_file {self.save_file}: is a folder; give a file name (or use --save_dir)")
        elif self.save_dir.exists() and not self.save_dir.is_dir():
            raise InputError(f"--save_dir {self.save_dir}: exists and is not a folder")

    def _normalise(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def output_path(self, width: int, height: int, *, now: datetime | None = None) -> Path:
        """``--save_file`` verbatim, else ``<save_dir>/<YYYYmmdd_HHMMSS>_<W>x<H>_<steps>step[_<prompt>].mp4``."""
        if self.save_file is not None:
            return self.save_file
        stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
        name = f"{stamp}_{width}x{height}_{self.sample_steps}step"
        slug = _UNSAFE_NAME_CHARS.sub("_", self.prompt[:50]).strip("._")
        return self.save_dir / (f"{name}_{slug}.mp4" if slug else f"{name}.mp4")

    def checkpoint_layout(self) -> CheckpointLayout:
        return CheckpointLayout.discover(self.ckpt_dir, self.lora)


@dataclass(frozen=True)
class GenerationShape:
    """The resolved geometry of a run: what the one-line summary and ``--dry-run --json`` report."""

    width: int
    height: int
    latent_width: int
    latent_height: int
    tokens_per_frame: int
    infer_frames: int
    audio_clips: int
    num_clips: int
    num_frames: int
    fps: int
    duration_s: float
    audio_s: float

    @classmethod
    def compute(cls, settings: GenerationSettings, image_size: tuple[int, int],
                audio_samples_16k: int) -> GenerationShape:
        """``image_size`` is PIL's (width, height); ``audio_samples_16k`` the audio's length at 16 kHz."""
        image_w, image_h = image_size
        height, width = size_for_area(image_h, image_w, settings.size_area)
        if height < MIN_SIDE or width < MIN_SIDE:
            raise InputError(f"--image {settings.image}: its aspect ratio {image_w}x{image_h} is too extreme for "
                             f"--size area {settings.size_area} (got {width}x{height}); crop it or raise the area")
        if audio_samples_16k < WAV2VEC_WINDOW:
            raise InputError(f"--audio: shorter than {WAV2VEC_WINDOW / AUDIO_SAMPLE_RATE * 1000:.0f} ms of sound")
        geometry = ClipGeometry(height, width, settings.infer_frames)
        audio_clips = audio_clip_count(audio_samples_16k, settings.infer_frames)
        num_clips = audio_clips if settings.num_clip is None else min(settings.num_clip, audio_clips)
        num_frames = geometry.video_frames(num_clips)
        return cls(
            width=width, height=height,
            latent_width=geometry.latent_width, latent_height=geometry.latent_height,
            tokens_per_frame=geometry.frame_tokens,
            infer_frames=settings.infer_frames, audio_clips=audio_clips, num_clips=num_clips,
            num_frames=num_frames, fps=FPS, duration_s=round(num_frames / FPS, 3),
            audio_s=round(audio_samples_16k / AUDIO_SAMPLE_RATE, 3),
        )

    def summary(self) -> str:
        clips = f"{self.num_clips} clip{'s' if self.num_clips != 1 else ''}"
        if self.num_clips < self.audio_clips:
            clips += f" of {self.audio_clips}"
        return (f"{self.width}x{self.height} (latent {self.latent_width}x{self.latent_height}, "
                f"{self.tokens_per_frame} tokens/frame), {clips} x {self.infer_frames} frames -> "
                f"{self.num_frames} frames = {self.duration_s:g} s at {self.fps} fps (audio {self.audio_s:g} s)")

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_inputs(settings: GenerationSettings) -> GenerationShape:
    """Open every input the run needs without loading a model: the image, each audio file, every
    checkpoint piece (headers only). Raises InputError naming the first bad one."""
    from liveavatar.io.media import load_audio, load_image

    image = load_image(settings.image)
    (waveform,) = load_audio(settings.audio)
    settings.checkpoint_layout().validate()
    return GenerationShape.compute(settings, image.size, len(waveform))


def plan_for_settings(settings: GenerationSettings, height: int, width: int) -> Plan:
    """The plan ``generate`` runs under, made before anything is loaded (of the checkpoints only the DiT's
    config.json is read), for the video size already resolved from the image. ``vram_budget`` caps the GPU
    budget; ``fp8`` and ``t5_cpu`` pin those choices. A CPU run (``--device cpu``, or no GPU) gets a plan
    with no GPU budget. Call ``.check()`` on the result to refuse a run that does not fit."""
    import torch

    on_cpu = settings.device == "cpu" or (settings.device is None and not torch.cuda.is_available())
    dtype = settings.dtype or ("float32" if on_cpu else "bfloat16")
    work = Workload(height, width, settings.infer_frames, settings.sample_steps, 1, settings.mode, dtype_bytes(dtype))
    inventory = dit_inventory(transformer_config_for(settings.ckpt_dir))
    pins = Pins(weight_dtype="fp8" if settings.fp8 else None, text_encoder="cpu" if settings.t5_cpu else None)
    if on_cpu:
        return plan_cpu_run(inventory, work, pins)
    hardware = detect_hardware() or HARDWARE_PRESETS["h100"]
    budget, source = resolve_budget(vram_budget=settings.vram_budget)
    return make_plan(inventory, work, hardware, budget, budget_source=source, pins=pins,
                     host_budget_bytes=default_host_budget())
