"""Loading the DiT as the placement says, streamed from the checkpoint: never a full copy on the host."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from liveavatar.checkpoints.lora import merge_lora_part, plan_lora
from liveavatar.checkpoints.safetensors_io import TensorReader, check_checkpoint, checkpoint_files, load_module
from liveavatar.models.transformer import RUN_DTYPES, WEIGHTS_STEM, CausalS2VTransformer, TransformerConfig
from liveavatar.runtime.layer_streaming import LayerStreamer, place_dit
from liveavatar.runtime.placement import Placement


def load_placed_dit(ckpt_dir, placement: Placement, *, device: torch.device | str, dtype: torch.dtype,
                    lora=None, lora_alpha: float | None = None) -> tuple[nn.Module, LayerStreamer | None]:
    """The DiT from a checkpoint folder, placed (see `place_dit`), and its layer streamer (None when no
    layer streams).

    The model is built on the meta device and filled one unit at a time (a block with the audio injector
    after it, then the remaining modules), in `place_dit`'s order: each tensor of the unit is read from its
    shard and put on ``device`` in ``dtype`` (its host copy dropped at once), the unit's LoRA is applied in
    float32 on the device (`merge_lora_part`, what `merge_lora` applies to the whole model), the unit is
    converted to FP8 if planned and, if streamed, moved on into its pinned host buffer. So the host holds,
    beyond what the plan pins, one checkpoint tensor and one layer's LoRA factors at a time, and the device
    one unit in the run dtype beyond its plan. The checkpoint's keys and shapes and the LoRA are checked
    from their headers before any tensor is read.
    """
    if dtype not in RUN_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
    ckpt_dir = Path(ckpt_dir)
    with torch.device("meta"):
        model = CausalS2VTransformer(TransformerConfig.from_dir(ckpt_dir))
    files = checkpoint_files(ckpt_dir, WEIGHTS_STEM)
    check_checkpoint(model, files, str(ckpt_dir))
    lora_plan = None if lora is None else plan_lora(model, lora, alpha=lora_alpha)
    with TensorReader(files) as reader:
        def materialize(name: str, module: nn.Module) -> None:
            load_module(module, reader, prefix=name, device=device, dtype=dtype)
            if lora_plan is not None:
                merge_lora_part(lora_plan, module, name)

        streamer = place_dit(model, placement, device, materialize=materialize)
    return model.eval().requires_grad_(False), streamer
