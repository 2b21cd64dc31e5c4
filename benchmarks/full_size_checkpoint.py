"""A full-size checkpoint in the release's layout with random weights, written once, for load benchmarks.

    from full_size_checkpoint import checkpoint_folder, write_checkpoint

The DiT as 4 bf16 shards + index + config.json (32.6 GB at 14B) and a rank-128 LoRA (1.3 GB), written
tensor by tensor from a pool of random numbers (scaled as the bench's random weights); a marker file makes
later runs reuse them. The write is not synced: the kernel writes the pages back while they serve the
loads from the page cache (the write rate reported is into the page cache; the probe's is the disk's).
`checkpoint_folder` probes the disk first (write rate with fsync, cold read rate after
POSIX_FADV_DONTNEED) and falls back to /dev/shm when the disk lacks the space or is too slow.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

GiB = 1 << 30
CHECKPOINT_MARKER = "desktop_fit_checkpoint.json"
LORA_RANK, LORA_ALPHA = 128, 64.0




def _random_pool(elements: int, seed: int):
    import torch

    return torch.randn(elements, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _tensor_from_pool(pool, key: str, shape: tuple[int, ...], dim: int, offset: int):
    """bf16 values of ``shape`` cut from the random pool, scaled as the bench's random weights are."""
    import torch

    count = math.prod(shape)
    if len(shape) <= 1 and not key.endswith("bias"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if count <= len(pool):
        start = offset % (len(pool) - count + 1)
        values = pool[start:start + count]
    else:
        values = pool.repeat(-(-count // len(pool)))[:count]
    scale = 0.02 if key.endswith("bias") else (dim if "modulation" in key else math.prod(shape[1:])) ** -0.5
    return (values * scale).reshape(shape)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make, metadata: dict) -> int:
    """Write a bf16 safetensors file tensor by tensor (``make(key, shape)`` gives each); returns its bytes.
    Written under a temporary name and renamed, so no partial file has the final name."""
    import torch

    header, offset = {"__metadata__": metadata}, 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for key, shape in shapes.items():
            handle.write(make(key, shape).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, path)
    return 8 + len(raw) + offset


def write_checkpoint(folder: Path, config_name: str, seed: int = 0) -> dict:
    """The DiT (release layout: 4 shards + index + config.json) and the LoRA under ``folder``, written once."""
    import torch

    from liveavatar.checkpoints.lora import LORA_KEY_FORMAT, lora_target_modules
    from liveavatar.checkpoints.safetensors_io import shard_layout
    from liveavatar.models.transformer import CONFIG_NAME, WEIGHTS_STEM, CausalS2VTransformer, TransformerConfig

    config = TransformerConfig.tiny() if config_name == "tiny" else TransformerConfig.full_14b()
    dit, lora = folder / "Wan2.2-S2V-14B", folder / "LiveAvatar" / "liveavatar.safetensors"
    marker = folder / CHECKPOINT_MARKER
    fingerprint = {"config": config.to_json_dict(), "lora_rank": LORA_RANK, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return {**json.loads(marker.read_text())["written"], "reused": True, "dit": str(dit), "lora": str(lora)}
    with torch.device("meta"):
        model = CausalS2VTransformer(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    pool = _random_pool(1 << 26 if config_name != "tiny" else 1 << 16, seed)
    start, written = time.perf_counter(), 0
    index = shard_layout({key: 2 * math.prod(shape) for key, shape in shapes.items()}, stem=WEIGHTS_STEM,
                         num_shards=4)
    dit.mkdir(parents=True, exist_ok=True)
    offsets = {key: i * 7919 for i, key in enumerate(shapes)}  # different slices of the pool per tensor
    for name in dict.fromkeys(index["weight_map"].values()):
        keys = {key: shapes[key] for key, file in index["weight_map"].items() if file == name}
        written += write_safetensors(dit / name, keys, lambda k, s: _tensor_from_pool(pool, k, s, config.dim,
                                                                                       offsets[k]),
                                     {"format": "pt"})
    (dit / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dit / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    lora.parent.mkdir(parents=True, exist_ok=True)
    factors = {}
    for module, layer in lora_target_modules(model).items():
        factors[LORA_KEY_FORMAT.format(module=module, which="A")] = (LORA_RANK, layer.in_features)
        factors[LORA_KEY_FORMAT.format(module=module, which="B")] = (layer.out_features, LORA_RANK)
    written += write_safetensors(lora, factors, lambda k, s: _tensor_from_pool(pool, k, s, config.dim, len(k)),
                                 {"format": "pt", "rank": str(LORA_RANK), "alpha": str(LORA_ALPHA)})
    seconds = time.perf_counter() - start
    summary = {"bytes": written, "seconds": seconds, "gbps": written / seconds / 1e9}
    marker.write_text(json.dumps({"fingerprint": fingerprint, "written": summary}) + "\n")
    return {**summary, "reused": False, "dit": str(dit), "lora": str(lora)}


def disk_probe(folder: Path, nbytes: int) -> dict:
    """Write rate (with fsync) and cold read rate (after POSIX_FADV_DONTNEED) of ``nbytes`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.bin"
    block = os.urandom(1 << 20) * 16
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(nbytes // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - start
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        while handle.read(1 << 24):
            pass
        read_s = time.perf_counter() - start
    path.unlink()
    return {"write_gbps": nbytes / write_s / 1e9, "cold_read_gbps": nbytes / read_s / 1e9, "probe_bytes": nbytes}


def checkpoint_folder(requested: Path, needed: int, min_write_gbps: float) -> tuple[Path, str, dict]:
    """Where to write: ``requested`` unless its disk lacks the space or is too slow, then /dev/shm."""
    requested.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm") / requested.name
    for folder in (requested, shm):
        if (folder / CHECKPOINT_MARKER).is_file():
            return folder, f"{folder} (reused)", {}
    free = shutil.disk_usage(requested).free
    probe = disk_probe(requested, min(GiB, max(needed // 4, 16 << 20)))
    if free >= needed * 1.05 and probe["write_gbps"] >= min_write_gbps:
        return requested, f"{requested} (disk)", probe
    if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free >= needed * 1.05:
        why = (f"{requested}: {free / GiB:.1f} GiB free" if free < needed * 1.05 else
               f"{requested}: writes at {probe['write_gbps']:.2f} GB/s < {min_write_gbps}")
        return shm, f"/dev/shm ({why})", probe
    raise SystemExit(f"--dir {requested}: needs {needed / GiB:.1f} GiB free ({free / GiB:.1f} GiB) and /dev/shm "
                     f"has no room either; pass --dir on a larger disk")
