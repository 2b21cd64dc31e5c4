"""``liveavatar make-tiny DIR``: a complete checkpoint set with the release's files, formats and key names
but tiny widths and seeded random weights, written by each model's own tiny writer.

DIR/Wan2.2-S2V-14B/ gets the sharded DiT (index + 2 shards + config.json recording the tiny sizes), the
T5 ``.pth`` with a working tokenizer folder, the VAE ``.pth`` and a wav2vec2 folder in Hugging Face
format; DIR/LiveAvatar/liveavatar.safetensors gets the LoRA. The engine loads it with the same code that
loads the real release. The DiT's text and audio widths match the tiny encoders' outputs.

The DiT and LoRA writers live here rather than in ``transformer.py``: they are test tooling, not part of
the model. The encoders' and the VAE's writers stay beside their models, because each writes its own
file format (T5 ``.pth`` + tokenizer, wav2vec2 through ``save_pretrained``, the VAE ``.pth``).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from liveavatar.checkpoints.layout import (BASE_DIR_NAME, LORA_DIR_NAME, LORA_FILE, VAE_FILE, WAV2VEC2_DIR,
                                           CheckpointLayout)
from liveavatar.checkpoints.lora import LORA_KEY_FORMAT, lora_target_modules
from liveavatar.checkpoints.safetensors_io import save_sharded
from liveavatar.models.audio_features import save_tiny_wav2vec2
from liveavatar.models.text_encoder import save_tiny_text_encoder
from liveavatar.models.transformer import CONFIG_NAME, WEIGHTS_STEM, CausalS2VTransformer, TransformerConfig
from liveavatar.models.vae import save_tiny_vae

TEXT_DIM = 48  # the tiny T5's width = the tiny DiT's text_dim
AUDIO_DIM = 32  # the tiny wav2vec2's width = the tiny DiT's audio_dim
LORA_RANK, LORA_ALPHA = 8, 4  # scale alpha/rank = 0.5, as the release's 64/128


def make_tiny_checkpoints(out_dir: str | Path, *, seed: int = 0) -> CheckpointLayout:
    """Write the tiny set under ``out_dir`` (each component with its own seed derived from ``seed``) and
    return its validated layout."""
    out_dir = Path(out_dir).expanduser().absolute()
    base = out_dir / BASE_DIR_NAME
    base.mkdir(parents=True, exist_ok=True)
    save_tiny_text_encoder(base, seed=seed, dim=TEXT_DIM)
    save_tiny_wav2vec2(base / WAV2VEC2_DIR, seed=seed + 1, hidden_size=AUDIO_DIM)
    save_tiny_vae(base / VAE_FILE, seed=seed + 2)
    config = replace(TransformerConfig.tiny(), text_dim=TEXT_DIM, audio_dim=AUDIO_DIM)
    save_tiny_transformer(base, config, seed=seed + 3, num_shards=2)
    lora_path = out_dir / LORA_DIR_NAME / LORA_FILE
    lora_path.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_lora(lora_path, config, rank=LORA_RANK, alpha=LORA_ALPHA, seed=seed + 4)
    layout = CheckpointLayout.discover(base, str(lora_path.parent))
    layout.validate()
    return layout


def _random_tensor(key: str, shape: torch.Size, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded weights that exercise every path: matrices N(0, 1/fan_in), biases N(0, 0.05²),
    norm gains 1 + N(0, 0.1²), modulations N(0, 1/dim)."""
    noise = torch.randn(shape, generator=generator)
    if key.endswith("modulation"):
        return noise * dim ** -0.5
    if key.endswith("bias"):
        return noise * 0.05
    if len(shape) == 1:
        return 1 + noise * 0.1
    return noise * shape[1:].numel() ** -0.5


def save_tiny_transformer(out_dir: str | Path, config: TransformerConfig | None = None, *, seed: int = 0,
                          num_shards: int = 2) -> Path:
    """Write a DiT checkpoint folder (config.json, shards, index) with seeded random weights."""
    config = config or TransformerConfig.tiny()
    out_dir = Path(out_dir)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in CausalS2VTransformer(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state_dict = {key: _random_tensor(key, shape, config.dim, generator) for key, shape in shapes.items()}
    save_sharded(state_dict, out_dir, stem=WEIGHTS_STEM, num_shards=num_shards)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    return out_dir


def save_tiny_lora(path: str | Path, config: TransformerConfig, *, rank: int, alpha: float, seed: int) -> Path:
    """Write a LoRA for ``config`` in the release's key layout (``<module>.lora_A.default.weight`` [rank, in],
    ``…lora_B.default.weight`` [out, rank]) covering every targeted module, with rank/alpha metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        targets = lora_target_modules(CausalS2VTransformer(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in targets.items():
        down = torch.randn(rank, layer.in_features, generator=generator) * layer.in_features ** -0.5
        up = torch.randn(layer.out_features, rank, generator=generator) * rank ** -0.5
        tensors[LORA_KEY_FORMAT.format(module=name, which="A")] = down
        tensors[LORA_KEY_FORMAT.format(module=name, which="B")] = up
    save_file(tensors, str(path), metadata={"format": "pt", "rank": str(rank), "alpha": str(alpha)})
    return path
