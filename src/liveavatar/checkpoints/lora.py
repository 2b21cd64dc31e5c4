"""The Live-Avatar LoRA: reading the adapter file and merging it into the DiT weights.

The release's ``liveavatar.safetensors`` holds A [rank, in] / B [out, rank] pairs for the Linear layers
PEFT targets with ``q,k,v,o,ffn.0,ffn.2`` (448 modules at 14B, including the audio injectors' q/k/v/o),
keyed ``<module>.lora_A.default.weight`` with or without a ``base_model.model.`` prefix; ``.lora_A.weight``
(no adapter name) is accepted too. The merge is the reference's: W <- cast(fp32(W) + (B @ A) * alpha/rank),
computed in float32 on W's device.

Unlike the reference loader, which silently ignores keys it does not recognise, every key must be a LoRA
weight of a targeted module of this model, with consistent shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from liveavatar.checkpoints.safetensors_io import CheckpointError, read_header

LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
LORA_KEY_FORMAT = "{module}.lora_{which}.default.weight"
RELEASE_ALPHA_PER_RANK = 0.5  # lora_alpha 64 / lora_rank 128 in the training config
_PREFIX = "base_model.model."
_KEY_PATTERN = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight")


def lora_target_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """The Linear layers PEFT adapts: those whose name (in the DiT, where ``model`` is named ``prefix``)
    equals a target or ends with '.' + target."""
    named = ((".".join(part for part in (prefix, name) if part), module) for name, module in model.named_modules())
    return {name: module for name, module in named
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS)}


def _pair_keys(path: Path, keys: list[str]) -> dict[str, dict[str, str]]:
    """module path -> {"A": file key, "B": file key}."""
    pairs: dict[str, dict[str, str]] = {}
    foreign = []
    for key in keys:
        match = _KEY_PATTERN.fullmatch(key.removeprefix(_PREFIX))
        if match is None:
            foreign.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = key
    example = LORA_KEY_FORMAT.format(module="blocks.0.self_attn.q", which="A")
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights in this file (expected keys like {example!r}); "
                              f"pass the Live-Avatar liveavatar.safetensors")
    if foreign:
        raise CheckpointError(f"{path}: {len(foreign)} keys are not LoRA A/B weights (first: {foreign[0]!r}); "
                              f"pass the Live-Avatar liveavatar.safetensors")
    for module, pair in pairs.items():
        if len(pair) != 2:
            missing = "B" if "A" in pair else "A"
            raise CheckpointError(f"{path}: module {module!r} has no lora_{missing} weight; the file is incomplete")
    return pairs


def merge_lora(model: nn.Module, path: str | Path, *, alpha: float | None = None) -> int:
    """Merge the LoRA file at ``path`` into ``model`` in place; returns the number of merged modules.

    alpha: the explicit value, else the file's ``alpha`` metadata, else the release's ratio 0.5 * rank.
    """
    return lora_merge_for(model, path, alpha=alpha).merge(model)


def lora_merge_for(model: nn.Module, path: str | Path, *, alpha: float | None = None) -> "LoraMerge":
    """The checked merge of the LoRA file at ``path`` into ``model`` (``merge_lora``'s checks and alpha),
    reading only headers, so ``model`` may still be on the meta device; `LoraMerge.merge` applies it to
    the whole model or to one part at a time."""
    path = Path(path)
    header, metadata = read_header(path)
    pairs = _pair_keys(path, list(header))
    targets = lora_target_modules(model)
    unknown = [module for module in pairs if module not in targets]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA modules do not exist in this DiT (first: "
                              f"{unknown[0]!r}); the LoRA was made for another model")

    ranks = set()
    for module, pair in pairs.items():
        (a_rank, a_in), (b_out, b_rank) = header[pair["A"]][1], header[pair["B"]][1]
        layer = targets[module]
        if (a_in, b_out) != (layer.in_features, layer.out_features):
            raise CheckpointError(f"{path}: LoRA for {module!r} maps {a_in}->{b_out} features but the layer is "
                                  f"{layer.in_features}->{layer.out_features}; the LoRA was made for another model")
        if a_rank != b_rank:
            raise CheckpointError(f"{path}: {module!r} has lora_A rank {a_rank} but lora_B rank {b_rank}")
        ranks.add(a_rank)
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: LoRA modules have different ranks {sorted(ranks)}; expected one rank")
    rank = ranks.pop()
    if "rank" in metadata and int(metadata["rank"]) != rank:
        raise CheckpointError(f"{path}: the file says rank {metadata['rank']} but its tensors have rank {rank}")
    if alpha is None:
        alpha = float(metadata["alpha"]) if "alpha" in metadata else RELEASE_ALPHA_PER_RANK * rank
    return LoraMerge(path, pairs, alpha / rank)


@dataclass(frozen=True)
class LoraMerge:
    """A checked LoRA file: its A/B key pairs by module and the merge scale alpha / rank."""

    path: Path
    pairs: dict[str, dict[str, str]]
    scale: float

    def merge(self, module: nn.Module, prefix: str = "") -> int:
        """Merge the factors of the targeted layers inside ``module`` (named ``prefix`` in the DiT, whose
        weights must be loaded) in place, each on its weight's device; returns how many were merged."""
        targets = {name: layer for name, layer in lora_target_modules(module, prefix).items() if name in self.pairs}
        if not targets:
            return 0
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle, torch.no_grad():
                for name, layer in targets.items():
                    weight = layer.weight
                    down = handle.get_tensor(self.pairs[name]["A"]).to(weight.device, torch.float32)
                    up = handle.get_tensor(self.pairs[name]["B"]).to(weight.device, torch.float32)
                    weight.copy_(weight.float() + (up @ down) * self.scale)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{self.path}: cannot read the LoRA tensors ({error}); re-download the file") from None
        return len(targets)
