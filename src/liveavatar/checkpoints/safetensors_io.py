"""Reading and writing (sharded) safetensors checkpoints.

Loading streams one tensor at a time from its file straight to its target device and dtype, so host
memory never holds more than one tensor of the model (the 14B DiT loads into a GPU without a 32 GB host
copy). Each tensor is read with a plain positioned read into a fresh host tensor (`TensorReader`), not
through safetensors' memory map: the pages of a mapped shard that a load has touched stay in the
process's resident memory until the whole map goes (up to a 10 GB shard), while read pages sit in the
page cache, which the kernel reclaims. The checkpoint is validated before anything is read: every file
exists and is complete, and its keys and shapes equal the model's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from liveavatar.checkpoints.files import check_not_lfs_pointer
from liveavatar.errors import CheckpointError

_MAX_HEADER_BYTES = 100_000_000
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Tensor (dtype, shape) by key and the metadata of one safetensors file, from its header only.

    Raises CheckpointError naming the file when it is truncated or not a safetensors file.
    """
    entries, metadata, _ = _read_entries(path)
    return {key: (dtype, shape) for key, (dtype, shape, _) in entries.items()}, metadata


def _read_entries(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], tuple[int, int]]], dict[str, str], int]:
    """(dtype, shape, (begin, end) data offsets) by key, the metadata, and where the data starts."""
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
    entries = {}
    data_bytes = 0
    try:
        for key, info in header.items():
            begin, end = (int(n) for n in info["data_offsets"])
            entries[key] = (info["dtype"], tuple(int(n) for n in info["shape"]), (begin, end))
            data_bytes = max(data_bytes, end)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r}); re-download the file") from None
    expected = 8 + header_bytes + data_bytes
    if size < expected:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} of {expected} bytes); re-download it")
    return entries, metadata, 8 + header_bytes


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


class TensorReader:
    """Single tensors of a checkpoint (key -> file, as `checkpoint_files` gives), each read into a fresh host
    tensor of exactly its bytes. Use it as a context manager (files are opened on first use)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._entries: dict[Path, tuple[dict, int]] = {}
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` in its stored dtype, on the CPU, owning its memory."""
        file = self.files[key]
        if file not in self._entries:
            entries, _, data_start = _read_entries(file)
            self._entries[file] = entries, data_start
        entries, data_start = self._entries[file]
        dtype, shape, (begin, end) = entries[key]
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, which this loader does not read")
        data = torch.empty(end - begin, dtype=torch.uint8)
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = open(file, "rb")
            handle.seek(data_start + begin)
            view, done = memoryview(data.numpy()), 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise OSError(f"the file ends {len(view) - done} bytes early")
                done += count
        except OSError as error:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({error}); re-download the file") from None
        return data.view(DTYPES[dtype]).reshape(shape)


def check_checkpoint(module: nn.Module, files: dict[str, Path], source: str) -> None:
    """Strict check of a checkpoint's keys and shapes (from the headers) against ``module``'s."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict(keep_vars=True).items()}
    check_keys(expected, files, source)


def load_module(module: nn.Module, reader: TensorReader, *, prefix: str = "", device: torch.device | str,
                dtype: torch.dtype) -> None:
    """Fill ``module`` (named ``prefix`` in the checkpoint, typically on the meta device) one tensor at a
    time: each is read, placed on ``device`` in ``dtype`` and its host copy dropped before the next."""
    for name in module.state_dict(keep_vars=True):
        owner_path, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        tensor = reader.read(f"{prefix}.{name}" if prefix else name).to(device=device, dtype=dtype)
        if attribute in owner._parameters:
            owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attribute] = tensor


def load_into(module: nn.Module, files: dict[str, Path], *, device: torch.device | str,
              dtype: torch.dtype, source: str) -> None:
    """Fill ``module`` (typically built on the meta device) from a checkpoint, strictly.

    Each tensor is read from its file and placed on ``device`` in ``dtype``; with device "meta" only the
    keys and shapes are checked.
    """
    check_checkpoint(module, files, source)
    if torch.device(device).type == "meta":
        module.to(device=device, dtype=dtype)
        return
    with TensorReader(files) as reader:
        load_module(module, reader, device=device, dtype=dtype)


def shard_layout(sizes: dict[str, int], *, stem: str = "diffusion_pytorch_model",
                 num_shards: int = 2) -> dict:
    """The shard index (``{"metadata": {"total_size"}, "weight_map": key -> file}``) that splits tensors of
    ``sizes`` bytes, in order, into ``{stem}-0000k-of-0000n.safetensors`` shards of about equal size."""
    if not 1 < num_shards <= len(sizes):
        raise ValueError(f"num_shards must be between 2 and {len(sizes)}, got {num_shards}")
    total = sum(sizes.values())
    target = math.ceil(total / num_shards)
    shards: list[list[str]] = [[]]
    filled = 0
    for index, (key, nbytes) in enumerate(sizes.items()):
        remaining_keys = len(sizes) - index
        remaining_shards = num_shards - len(shards)
        if shards[-1] and remaining_shards and (filled >= target or remaining_keys <= remaining_shards):
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += nbytes
    weight_map = {key: f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
                  for number, keys in enumerate(shards, start=1) for key in keys}
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


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
    index = shard_layout({key: t.nbytes for key, t in tensors.items()}, stem=stem, num_shards=num_shards)
    for name in dict.fromkeys(index["weight_map"].values()):
        shard = {key: tensors[key] for key, file in index["weight_map"].items() if file == name}
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
