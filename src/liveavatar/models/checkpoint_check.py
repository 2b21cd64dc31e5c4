"""Will the DiT checkpoint and the LoRA load? Answered from config.json and the safetensors headers alone,
without reading a weight, so that ``--dry-run``, ``doctor`` and the check before loading refuse what
loading would refuse tens of GB later: a config whose sizes do not fit the shards, dim/heads that do not
split, a LoRA made for another model size or covering only part of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from liveavatar.checkpoints.lora import LoraPlan, plan_lora
from liveavatar.checkpoints.safetensors_io import checkpoint_files, load_into
from liveavatar.models.transformer import WEIGHTS_STEM, CausalS2VTransformer, TransformerConfig


@dataclass(frozen=True)
class CheckedTransformer:
    config: TransformerConfig
    lora: LoraPlan | None  # its ``notice`` says when the LoRA file also replaces base weights


def check_transformer_checkpoint(ckpt_dir: str | Path, lora: str | Path | None = None, *,
                                 lora_alpha: float | None = None) -> CheckedTransformer:
    """Build the DiT that ``ckpt_dir``'s config.json describes on the meta device and compare every
    parameter with the shard headers, then the LoRA's factors with the layers they adapt. Raises
    CheckpointError with one line naming the file, the key and both shapes."""
    ckpt_dir = Path(ckpt_dir)
    config = TransformerConfig.from_dir(ckpt_dir)
    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    # onto the meta device: keys and shapes are compared, nothing is read
    load_into(model, checkpoint_files(ckpt_dir, WEIGHTS_STEM), device="meta", dtype=torch.bfloat16,
              source=str(ckpt_dir))
    plan = plan_lora(model, lora, alpha=lora_alpha) if lora is not None else None
    return CheckedTransformer(config, plan)
