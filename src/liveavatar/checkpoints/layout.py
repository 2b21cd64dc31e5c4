"""Where every checkpoint piece lives, and a cheap completeness check that loads no weights.

The base directory is the Hub repo ``Wan-AI/Wan2.2-S2V-14B`` as downloaded (file names hard-coded by the
reference); the LoRA is a ``.safetensors`` file, a folder holding ``liveavatar.safetensors`` (the
``liveavatar download`` layout, or a Hugging Face cache folder such as the reference's ``ckpt/LiveAvatar``),
or a Hub repo id, looked for beside the base directory, in ``ckpt/LiveAvatar`` of the working folder (where
the reference's loader downloads it) and in the user's Hugging Face cache; nothing here touches the network.
Truncated files are found from their headers: a safetensors header states where its data ends, and a
``torch.save`` zip keeps its directory at the very end of the file. A Git LFS pointer left in place of a
file (a repository cloned without git-lfs) is named as such wherever a file does not parse.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from liveavatar.checkpoints.files import check_not_lfs_pointer, check_torch_file
from liveavatar.errors import CheckpointError

BASE_REPO, BASE_DIR_NAME = "Wan-AI/Wan2.2-S2V-14B", "Wan2.2-S2V-14B"
LORA_REPO, LORA_DIR_NAME = "Quark-Vision/Live-Avatar", "LiveAvatar"
LORA_FILE = "liveavatar.safetensors"
REFERENCE_LORA_CACHE = Path("ckpt") / LORA_DIR_NAME  # relative to the working folder, as in the reference
DIT_CONFIG = "config.json"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
WAV2VEC2_CONFIGS = ("config.json", "preprocessor_config.json")
WAV2VEC2_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
def resolve_lora(spec: str, ckpt_dir: Path) -> Path | None:
    """A LoRA file for ``spec`` (file, folder, or Hub id), or None when nothing local matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.absolute()
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return (path / LORA_FILE).absolute()
        cached = sorted(path.glob(f"models--*/snapshots/*/{LORA_FILE}"))
        return cached[0].absolute() if cached else None
    if spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
        return None
    from huggingface_hub import try_to_load_from_cache

    # The folder beside the base directory, then ckpt/LiveAvatar of the working folder (where the reference's
    # hf_hub_download(cache_dir="ckpt/LiveAvatar") puts it), each holding the file itself (`liveavatar
    # download`, `huggingface-cli download --local-dir`) or a Hugging Face cache; then the user's cache.
    for folder in dict.fromkeys([ckpt_dir.parent / LORA_DIR_NAME, REFERENCE_LORA_CACHE.absolute()]):
        if spec == LORA_REPO and (folder / LORA_FILE).is_file():
            return (folder / LORA_FILE).absolute()
        found = try_to_load_from_cache(spec, LORA_FILE, cache_dir=folder)
        if isinstance(found, str):
            return Path(found)
    found = try_to_load_from_cache(spec, LORA_FILE)
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of every piece. ``dit_dir`` is what ``CausalS2VTransformer.from_pretrained`` reads."""

    ckpt_dir: Path
    dit_config: Path
    t5: Path
    tokenizer: Path
    vae: Path
    wav2vec2: Path
    lora: Path | None
    lora_spec: str | None

    @property
    def dit_dir(self) -> Path:
        return self.ckpt_dir

    @classmethod
    def discover(cls, ckpt_dir: str | Path, lora: str | None = LORA_REPO) -> CheckpointLayout:
        """Locate the pieces without judging them (``problems()``/``validate()`` do that)."""
        ckpt_dir = Path(ckpt_dir).expanduser().absolute()
        return cls(
            ckpt_dir=ckpt_dir, dit_config=ckpt_dir / DIT_CONFIG, t5=ckpt_dir / T5_FILE, tokenizer=ckpt_dir / TOKENIZER_DIR, vae=ckpt_dir / VAE_FILE,
            wav2vec2=ckpt_dir / WAV2VEC2_DIR, lora=resolve_lora(lora, ckpt_dir) if lora else None, lora_spec=lora,
        )

    def weight_bytes(self) -> int:
        """Bytes of the weight files a load reads (the DiT's shards, the LoRA, the VAE, wav2vec2); the text
        encoder is read later, and only when a prompt is not in the prompt cache."""
        files = [*self.ckpt_dir.glob("diffusion_pytorch_model*.safetensors"), self.vae,
                 *self.wav2vec2.glob("*.safetensors"), *([self.lora] if self.lora else [])]
        return sum(path.stat().st_size for path in files if path.is_file())

    def validate(self) -> None:
        """Raise CheckpointError naming the first missing, truncated or mismatched piece."""
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more; `liveavatar doctor` lists them)" if len(problems) > 1 else ""
            raise CheckpointError(problems[0] + more)

    def problems(self) -> list[str]:
        """One line per bad piece, in loading order; empty when everything is in place."""
        if self.ckpt_dir.is_file():
            return [f"--ckpt_dir {self.ckpt_dir}: is a file; pass the folder that holds it (the {BASE_DIR_NAME} "
                    f"folder with config.json and the shards)"]
        if not self.ckpt_dir.is_dir():
            return [f"--ckpt_dir {self.ckpt_dir}: not found; fetch the weights with `liveavatar download ckpt` "
                    f"and pass --ckpt_dir ckpt/{BASE_DIR_NAME}"]
        checks = [self._check_dit_config, self._check_dit_weights, self._check_t5, self._check_tokenizer,
                  self._check_vae, self._check_wav2vec2, self._check_lora]
        problems = []
        for check in checks:
            try:
                check()
            except CheckpointError as error:
                problems.append(str(error))
        return problems

    def _check_dit_config(self) -> None:
        config = _read_json(self.dit_config, "the DiT config of Wan2.2-S2V-14B")
        if config.get("model_type", "s2v") != "s2v":
            raise CheckpointError(f"{self.dit_config}: model_type is {config['model_type']!r}, expected 's2v' "
                                  f"(the Wan2.2-S2V-14B transformer)")

    def _check_dit_weights(self) -> None:
        # Index, shards present, every header complete, every indexed key in its shard.
        from liveavatar.checkpoints.safetensors_io import checkpoint_files, checkpoint_shapes  # imports torch

        checkpoint_shapes(checkpoint_files(self.ckpt_dir))

    def _check_t5(self) -> None:
        _require_file(self.t5, "the UMT5-XXL encoder weights")
        check_torch_file(self.t5)

    def _check_tokenizer(self) -> None:
        if not any((self.tokenizer / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"{self.tokenizer}: missing the umt5-xxl tokenizer (expected "
                                  f"{' or '.join(TOKENIZER_FILES)} in it)")
        # the tokenizer library reads every file of the folder, and its errors for a pointer say nothing
        for path in sorted(p for p in self.tokenizer.rglob("*") if p.is_file()):
            check_not_lfs_pointer(path)

    def _check_vae(self) -> None:
        _require_file(self.vae, "the Wan 2.1 VAE weights")
        check_torch_file(self.vae)

    def _check_wav2vec2(self) -> None:
        for name in WAV2VEC2_CONFIGS:
            _read_json(self.wav2vec2 / name, "part of the wav2vec2 audio encoder folder")
        weights = [self.wav2vec2 / name for name in WAV2VEC2_WEIGHTS if (self.wav2vec2 / name).is_file()]
        if not weights:
            raise CheckpointError(f"{self.wav2vec2}: no weights, expected {' or '.join(WAV2VEC2_WEIGHTS)}")
        if weights[0].suffix == ".safetensors":
            _read_safetensors_header(weights[0])
        else:
            check_torch_file(weights[0])

    def _check_lora(self) -> None:
        if self.lora_spec is None:
            return
        if self.lora is None:
            raise CheckpointError(
                f"--lora_path_dmd {self.lora_spec}: not found as a file, a folder with {LORA_FILE}, beside the base "
                f"folder, in ./{REFERENCE_LORA_CACHE} nor in the local Hugging Face cache; run "
                f"`liveavatar download {self.ckpt_dir.parent}` or pass the file's path")
        if self.lora.suffix != ".safetensors":
            raise CheckpointError(f"--lora_path_dmd {self.lora}: expected a .safetensors LoRA file ({LORA_FILE})")
        if not any("lora_" in key for key in _read_safetensors_header(self.lora)):
            raise CheckpointError(f"--lora_path_dmd {self.lora}: has no lora_A/lora_B tensors; not a LoRA file")


def _read_safetensors_header(path: Path) -> dict:
    from liveavatar.checkpoints.safetensors_io import read_header  # imports torch: only when checking

    return read_header(path)[0]


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file ({what}); download it again")


def _read_json(path: Path, what: str) -> dict:
    _require_file(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        check_not_lfs_pointer(path)
        raise CheckpointError(f"{path}: not valid JSON ({what}); download it again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return value
