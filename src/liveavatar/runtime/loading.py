"""Loading the DiT as the placement says: weights read, LoRA merged, FP8-converted and placed."""
from __future__ import annotations

import torch
from torch import nn

from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.runtime.layer_streaming import LayerStreamer, place_dit
from liveavatar.runtime.placement import Placement


def load_placed_dit(ckpt_dir, placement: Placement, *, device: torch.device | str, dtype: torch.dtype,
                    lora=None, lora_alpha: float | None = None) -> tuple[nn.Module, LayerStreamer | None]:
    """The DiT from a checkpoint folder, placed (see `place_dit`), and its layer streamer (None when no
    layer streams). With every block resident in bf16 the weights stream straight to the device;
    otherwise they are read and LoRA-merged on the host (one bf16 copy of the DiT in RAM, 32.6 GB at 14B)
    and then placed unit by unit, so the device never holds more than one block beyond the plan.
    """
    direct = placement.weight_dtype == "bf16" and not placement.streams_layers
    model = CausalS2VTransformer.from_pretrained(ckpt_dir, device=device if direct else "cpu", dtype=dtype,
                                                 lora=lora, lora_alpha=lora_alpha)
    streamer = None if direct else place_dit(model, placement, device)
    return model, streamer
