"""The Live-Avatar LoRA: reading the adapter file and merging it into the DiT weights.

The release's ``liveavatar.safetensors`` holds A [rank, in] / B [out, rank] pairs for the Linear layers
PEFT targets with ``q,k,v,o,ffn.0,ffn.2`` (448 modules at 14B, including the audio injectors' q/k/v/o),
keyed ``<module>.lora_A.default.weight`` with or without a ``base_model.model.`` prefix; ``.lora_A.weight``
(no adapter name) is accepted too. The merge is the reference's (``WanS2V.add_lora_to_model``: PEFT
``get_peft_model``, ``load_state_dict(strict=False)``, ``merge_and_unload``): W <- cast(fp32(W) + (B @ A) *
alpha/rank), computed in float32 on W's device.

Scale: the reference always merges with the training config's lora_alpha 64 for lora_rank 128
(``s2v_causal_sft.yaml``) and never reads the file's metadata, so alpha is rank/2 unless given; a file
whose metadata states another alpha is refused rather than merged at a scale nobody chose.

Other tensors: ``load_state_dict`` also copies every file tensor named like a parameter of the
PEFT-wrapped model into the base weights before the merge (a targeted layer's own weight is
``<module>.base_layer.weight`` there). Those full weights are applied the same way and counted in the
plan's ``notice``. Unlike the reference loader, which silently ignores keys it does not recognise, every
other key is an error, and every target module must have both factors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from liveavatar.checkpoints.safetensors_io import read_header
from liveavatar.errors import CheckpointError

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


@dataclass(frozen=True)
class LoraPlan:
    """What merging a LoRA file into a model will do, worked out from the file's header alone."""

    path: Path
    pairs: dict[str, dict[str, str]]  # target module -> {"A": file key, "B": file key}
    full_weights: dict[str, str]      # model state key -> file key of a tensor that replaces it
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def notice(self) -> str | None:
        """A line for the user when the file also replaces base weights (None when it holds only the LoRA)."""
        if not self.full_weights:
            return None
        return (f"{self.path}: besides the LoRA the file holds {len(self.full_weights)} full weights, which "
                f"replace the base model's as in the reference (first: {next(iter(self.full_weights))!r})")


def plan_lora(model: nn.Module, path: str | Path, *, alpha: float | None = None) -> LoraPlan:
    """Check the LoRA file at ``path`` against ``model`` (built on any device, "meta" included) without
    reading a tensor: every key a factor of a target module or a weight of the model, every target covered
    with consistent shapes, one rank. ``alpha``: the explicit value, else rank/2 (the reference's)."""
    path = Path(path)
    header, metadata = read_header(path)
    targets = lora_target_modules(model)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    pairs, full_weights = _sort_keys(path, header, shapes, targets)
    unknown = [module for module in pairs if module not in targets]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA modules do not exist in this DiT (first: "
                              f"{unknown[0]!r}); the LoRA was made for another model")
    missing = [module for module in targets if module not in pairs]
    if missing:
        raise CheckpointError(f"{path}: the LoRA covers {len(pairs)} of the {len(targets)} target modules of this "
                              f"DiT (first missing: {missing[0]!r}); the file is incomplete or for another model")

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
    for key, file_key in full_weights.items():
        if header[file_key][1] != shapes[key]:
            raise CheckpointError(f"{path}: full weight {file_key!r} has shape {list(header[file_key][1])}, the "
                                  f"model's {key!r} is {list(shapes[key])}; the file was made for another model")
    return LoraPlan(path, pairs, full_weights, rank, _alpha(path, metadata, rank) if alpha is None else alpha)


def merge_lora(model: nn.Module, path: str | Path, *, alpha: float | None = None) -> LoraPlan:
    """Merge the LoRA file at ``path`` into ``model`` in place (checked first by ``plan_lora``); returns the
    plan, whose ``notice`` the caller shows when the file also replaced base weights."""
    plan = plan_lora(model, path, alpha=alpha)
    merge_lora_part(plan, model)
    return plan


def merge_lora_part(plan: LoraPlan, module: nn.Module, prefix: str = "") -> None:
    """Apply a checked plan to ``module``, the part of the DiT named ``prefix`` ("" for the whole model),
    whose weights are loaded: its full weights are replaced, then its targeted layers merged, each on its
    weight's device. Applying it part by part (a block at a time while loading) gives the same weights as
    applying it to the whole model: every weight's replacement and delta are its own."""
    inside = f"{prefix}." if prefix else ""
    state = module.state_dict()
    replaced = {key.removeprefix(inside): file_key for key, file_key in plan.full_weights.items()
                if key.startswith(inside)}
    targets = {name: layer for name, layer in lora_target_modules(module, prefix).items() if name in plan.pairs}
    if not replaced and not targets:
        return
    try:
        with safe_open(str(plan.path), framework="pt", device="cpu") as handle, torch.no_grad():
            # The reference loads every tensor first and merges afterwards: a replaced weight gets the delta.
            for key, file_key in replaced.items():
                state[key].copy_(handle.get_tensor(file_key))
            for name, layer in targets.items():
                weight = layer.weight
                down = handle.get_tensor(plan.pairs[name]["A"]).to(weight.device, torch.float32)
                up = handle.get_tensor(plan.pairs[name]["B"]).to(weight.device, torch.float32)
                weight.copy_(weight.float() + (up @ down) * plan.scale)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{plan.path}: cannot read the LoRA tensors ({error}); re-download the file") from None


def _sort_keys(path: Path, header: dict, shapes: dict[str, tuple[int, ...]],
               targets: dict[str, nn.Linear]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(module -> {"A", "B"} file keys, model state key -> file key of a full weight)."""
    # The names the reference's load_state_dict matches: a wrapped target's own tensors sit under base_layer.
    peft_names = {}
    for key in shapes:
        owner, _, name = key.rpartition(".")
        peft_names[f"{owner}.base_layer.{name}" if owner in targets else key] = key
    pairs: dict[str, dict[str, str]] = {}
    full_weights: dict[str, str] = {}
    foreign = []
    for file_key in header:
        key = file_key.removeprefix(_PREFIX)
        match = _KEY_PATTERN.fullmatch(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["which"]] = file_key
        elif key in peft_names:
            full_weights[peft_names[key]] = file_key
        else:
            foreign.append(file_key)
    example = LORA_KEY_FORMAT.format(module="blocks.0.self_attn.q", which="A")
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights in this file (expected keys like {example!r}); "
                              f"pass the Live-Avatar liveavatar.safetensors")
    if foreign:
        raise CheckpointError(f"{path}: {len(foreign)} keys are not LoRA A/B weights (first: {foreign[0]!r}) nor "
                              f"weights of this DiT; pass the Live-Avatar liveavatar.safetensors")
    for module, pair in pairs.items():
        if len(pair) != 2:
            missing = "B" if "A" in pair else "A"
            raise CheckpointError(f"{path}: module {module!r} has no lora_{missing} weight; the file is incomplete")
    return pairs, full_weights


def _alpha(path: Path, metadata: dict[str, str], rank: int) -> float:
    release = RELEASE_ALPHA_PER_RANK * rank
    stated = metadata.get("alpha")
    if stated is None:
        return release
    try:
        agrees = float(stated) == release
    except ValueError:
        raise CheckpointError(f"{path}: the metadata's alpha {stated!r} is not a number; pass lora_alpha "
                              f"(--lora_alpha) to choose the scale") from None
    if not agrees:
        raise CheckpointError(f"{path}: the file's metadata says alpha {stated} for rank {rank}; the reference ignores "
                              f"it and merges with alpha {release:g} (rank/2). Pass lora_alpha (--lora_alpha) "
                              f"{release:g} to merge as the reference does, or {stated} to use the file's value")
    return release
