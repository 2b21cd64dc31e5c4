"""Reading and writing (sharded) safetensors checkpoints.

Loading streams one tensor at a time from a memory-mapped file straight to its target device and dtype,
so host memory never holds more than one tensor of the model (the 14B DiT loads into a GPU without a
32 GB host copy). The checkpoint is validated before anything is read: every file exists and is complete,
and its keys and shapes equal the model's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from liveavatar.checkpoints.files import check_not_lfs_pointer
from liveavatar.errors import CheckpointError

_MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Tensor (dtype, shape) by key and the metadata of one safetensors file, from its header only.

    Raises CheckpointError naming the file when it is truncated or not a safetensors file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_bytes < 0 or header_bytes > min(size - 8, _MAX_HEADER_BYTES):
                check_not_lfs_pointer(path)
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes); re-download it")
            header = json.loads(handle.read(header_bytes))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder; pass the .safetensors file inside it") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_bytes = 0
    try:
        for key, info in header.items():
            tensors[key] = (info["dtype"], tuple(int(n) for n in info["shape"]))
            data_bytes = max(data_bytes, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r}); re-download the file") from None
    expected = 8 + header_bytes + data_bytes
    if size < expected:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} of {expected} bytes); re-download it")
    return tensors, metadata


def checkpoint_files(path: Path, stem: str = "diffusion_pytorch_model") -> dict[str, Path]:
    """Key -> file for a checkpoint: a ``{stem}.safetensors.index.json`` shard index, a single
    ``{stem}.safetensors``, or ``path`` itself when it is a ``.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        index = path / f"{stem}.safetensors.index.json"
        single = path / f"{stem}.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                check_not_lfs_pointer(index)
                raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'); re-download it") from None
            shards = {name: path / name for name in dict.fromkeys(weight_map.values())}
            for shard in shards.values():
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index.name} is missing; re-download it")
            return {key: shards[name] for key, name in weight_map.items()}
        if not single.is_file():
            raise CheckpointError(f"{path}: no {index.name} or {single.name} found; pass the model folder")
        files = [single]
    return {key: file for file in files for key in read_header(file)[0]}


def checkpoint_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor, read from the headers; a key the index maps to a file lacking it is an error."""
    headers = {file: read_header(file)[0] for file in dict.fromkeys(files.values())}
    shapes = {}
    for key, file in files.items():
        if key not in headers[file]:
            raise CheckpointError(f"{file}: tensor {key!r} listed in the index is not in this shard; re-download it")
        shapes[key] = headers[file][key][1]
    return shapes


def check_keys(expected: dict[str, tuple[int, ...]], files: dict[str, Path], source: str) -> None:
    """Strict check of a checkpoint's keys and shapes (from the headers of ``files``, key -> file) against
    a model's; a wrong shape is reported with the file that holds it."""
    found = checkpoint_shapes(files)
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise CheckpointError(f"{source}: checkpoint does not match the model: {', '.join(parts)}; "
                              f"is this the right checkpoint folder?")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(f"{files[key]}: tensor {key!r} has shape {list(found[key])}, the model expects "
                                  f"{list(shape)}; these weights are for another model size than the config in {source}")


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_path, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_path)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def load_into(module: nn.Module, files: dict[str, Path], *, device: torch.device | str,
              dtype: torch.dtype, source: str) -> None:
    """Fill ``module`` (typically built on the meta device) from a checkpoint, strictly.

    Each tensor is read from its memory-mapped file and placed on ``device`` in ``dtype``; with device
    "meta" only the keys and shapes are checked.
    """
    expected = {key: tuple(value.shape) for key, value in module.state_dict(keep_vars=True).items()}
    check_keys(expected, files, source)
    device = torch.device(device)
    if device.type == "meta":
        module.to(device=device, dtype=dtype)
        return
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in keys:
                    _assign(module, key, handle.get_tensor(key).to(device=device, dtype=dtype))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{file}: cannot read tensors ({error}); re-download the file") from None


def save_sharded(state_dict: dict[str, torch.Tensor], out_dir: Path, *, stem: str = "diffusion_pytorch_model",
                 num_shards: int = 2) -> None:
    """Write ``{stem}-0000k-of-0000n.safetensors`` shards of about equal size plus the index (or a single
    ``{stem}.safetensors`` when ``num_shards`` is 1)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    if num_shards == 1:
        save_file(tensors, str(out_dir / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    if not 1 < num_shards <= len(tensors):
        raise ValueError(f"num_shards must be between 1 and {len(tensors)}, got {num_shards}")
    total = sum(t.nbytes for t in tensors.values())
    target = math.ceil(total / num_shards)
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for index, (key, value) in enumerate(tensors.items()):
        remaining_keys = len(tensors) - index
        remaining_shards = num_shards - len(shards)
        if shards[-1] and remaining_shards and (filled >= target or remaining_keys <= remaining_shards):
            shards.append({})
            filled = 0
        shards[-1][key] = value
        filled += value.nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
