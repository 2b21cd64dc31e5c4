"""The command line's settings of one ``generate`` run: paths, output, device, and the generation's
`RequestOptions`, which `settings.request()` resolves (once) into a `liveavatar.request.Request`."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

from liveavatar.checkpoints.layout import BASE_DIR_NAME, LORA_REPO, CheckpointLayout
from liveavatar.devices import DTYPE_NAMES
from liveavatar.errors import InputError
from liveavatar.options import RequestOptions
from liveavatar.request import Request, resolve_request


DEFAULT_CKPT_DIR = f"ckpt/{BASE_DIR_NAME}"
WEIGHT_CHOICES = ("auto", "bf16", "fp8")

_UNSAFE_NAME_CHARS = re.compile(r'[\s/\\:*?"<>|\x00-\x1f]')


def parse_vram_budget(text: str) -> int:
    """``"40"``, ``"40G"``, ``"40GiB"``, ``"40GB"``, ``"38000MiB"`` -> bytes. Units are binary; no unit = GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--vram-budget {text!r}: expected a positive amount such as 40, 40GiB or 38000MiB")
    power = "kmgt".index(match.group(2).lower()) + 1 if match.group(2) else 3
    return int(float(match.group(1)) * 1024**power)


def split_audio_spec(spec: str) -> list[Path]:
    """``a.wav+b.wav`` -> two paths, as in the reference, unless the whole string is an existing path."""
    whole = Path(spec).expanduser()
    if whole.exists() or "+" not in spec:
        return [whole.absolute()]
    parts = spec.split("+")
    if any(not part.strip() for part in parts):
        raise InputError(f"--audio {spec!r}: an empty name around '+'; give one audio file")
    return [Path(part).expanduser().absolute() for part in parts]


@dataclass(frozen=True)
class GenerationSettings:
    """One ``generate`` run as the command line gives it: the inputs, the generation's ``options`` (checked
    when they were built), and paths, output, device and dtype, checked here. Paths are absolute."""

    image: Path
    audio: tuple[Path, ...]
    prompt: str = ""
    options: RequestOptions = RequestOptions()
    ckpt_dir: Path = Path(DEFAULT_CKPT_DIR)
    lora: str | None = LORA_REPO
    weights: str = "auto"  # auto: the planner's choice (FP8 where bf16 does not fit or FP8 is faster)
    lora_alpha: float | None = None  # None: rank/2, the release's alpha
    t5_cpu: bool = False
    device: str | None = None  # None: CUDA when available, else the CPU
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU
    num_gpus: int | None = None  # ranks of the timestep pipeline spawned here (None: one device, or --gpus)
    gpus: tuple[int, ...] | None = None  # the CUDA GPUs of those ranks (None: the first num_gpus)
    vram_budget: int | None = None
    host_memory: int | None = None  # None: what the machine (or its cgroup) has available
    compile: bool = True  # the DiT's compiled fast path where the device has a compiler (--no-compile: False)
    save_file: Path | None = None
    save_dir: Path = Path("output")
    keep_partial: bool = False
    overwrite: bool = False

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
        if self.weights not in WEIGHT_CHOICES:
            raise InputError(f"--weights {self.weights!r}: expected one of {', '.join(WEIGHT_CHOICES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES.values():
            raise InputError(f"--dtype {self.dtype!r}: expected bfloat16 or float32")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise InputError(f"--device {self.device!r}: expected cuda, cuda:N or cpu (other backends, e.g. Apple's "
                             f"mps, are not supported)")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise InputError(f"--num_gpus {self.num_gpus}: must be at least 1")
        if self.gpus is not None:
            if self.num_gpus is not None and self.num_gpus != len(self.gpus):
                raise InputError(f"--num_gpus {self.num_gpus} --gpus {','.join(map(str, self.gpus))}: they disagree; "
                                 f"give one of them")
            if self.device == "cpu":
                raise InputError("--gpus names CUDA GPUs; with --device cpu give the number of processes with "
                                 "--num_gpus")
        if self.ranks > 1 and self.device not in (None, "cpu", "cuda"):
            raise InputError(f"--device {self.device} with {self.ranks} ranks: choose the GPUs with --gpus (--device "
                             f"takes only cuda or cpu then)")
        if self.vram_budget is not None and self.vram_budget <= 0:
            raise InputError("--vram-budget: must be positive")
        if self.host_memory is not None and self.host_memory <= 0:
            raise InputError("--host-memory: must be positive")
        if self.save_file is not None:
            if self.save_file.is_dir():
                raise InputError(f"--save_file {self.save_file}: is a folder; give a file name, e.g. "
                                 f"{self.save_file / 'video.mp4'} (or use --save_dir)")
            if self.save_file.suffix.lower() != ".mp4":
                raise InputError(f"--save_file {self.save_file}: the output is an H.264 .mp4; give a name ending in .mp4")
        elif self.save_dir.exists() and not self.save_dir.is_dir():
            raise InputError(f"--save_dir {self.save_dir}: exists and is not a folder")

    def _normalise(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @property
    def ranks(self) -> int:
        """Processes of the run: 1, or the ranks of a timestep pipeline spawned here."""
        return len(self.gpus) if self.gpus is not None else self.num_gpus or 1

    def output_path(self, width: int, height: int, *, now: datetime | None = None) -> Path:
        """``--save_file`` verbatim, else ``<save_dir>/<YYYYmmdd_HHMMSS>_<W>x<H>_<steps>step[_<prompt>].mp4``,
        with ``_2``, ``_3``, ... added when that name is taken (batch runs started in the same second)."""
        if self.save_file is not None:
            return self.save_file
        stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
        name = f"{stamp}_{width}x{height}_{self.options.sample_steps}step"
        slug = _UNSAFE_NAME_CHARS.sub("_", self.prompt[:50]).strip("._")
        stem = f"{name}_{slug}" if slug else name
        path, number = self.save_dir / f"{stem}.mp4", 1
        while path.exists():
            number += 1
            path = self.save_dir / f"{stem}_{number}.mp4"
        return path

    @cached_property
    def checkpoint_layout(self) -> CheckpointLayout:
        """The checkpoint files, discovered once per run."""
        return CheckpointLayout.discover(self.ckpt_dir, self.lora)

    def request(self) -> Request:
        """The run's `Request`: the image and the audio decoded once."""
        return resolve_request(self.image, self.audio[0], self.prompt, self.options)
