"""``liveavatar make-tiny DIR``: a complete checkpoint set with the release's files, formats and key names
but tiny widths and seeded random weights, written by each model's own tiny writer.

DIR/Wan2.2-S2V-14B/ gets the sharded DiT (index + 2 shards + config.json recording the tiny sizes), the
T5 ``.pth`` with a working tokenizer folder, the VAE ``.pth`` and a wav2vec2 folder in Hugging Face
format; DIR/LiveAvatar/liveavatar.safetensors gets the LoRA. The engine loads it with the same code that
loads the real release. The DiT's text and audio widths match the tiny encoders' outputs.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from liveavatar.checkpoints.layout import (BASE_DIR_NAME, LORA_DIR_NAME, LORA_FILE, VAE_FILE, WAV2VEC2_DIR,
                                           CheckpointLayout)

TEXT_DIM = 48  # the tiny T5's width = the tiny DiT's text_dim
AUDIO_DIM = 32  # the tiny wav2vec2's width = the tiny DiT's audio_dim
LORA_RANK, LORA_ALPHA = 8, 4  # scale alpha/rank = 0.5, as the release's 64/128


def make_tiny_checkpoints(out_dir: str | Path, *, seed: int = 0) -> CheckpointLayout:
    """Write the tiny set under ``out_dir`` (each component with its own seed derived from ``seed``) and
    return its validated layout."""
    from liveavatar.models.audio_features import save_tiny_wav2vec2
    from liveavatar.models.text_encoder import save_tiny_text_encoder
    from liveavatar.models.transformer import TransformerConfig, save_tiny_lora, save_tiny_transformer
    from liveavatar.models.vae import save_tiny_vae

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
