"""The machine a plan is made for: a GPU's peak rates and memory (presets, or the detected card), and
the host memory available to the run (the machine's, or its cgroup's when that limits it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Hardware:
    """Peak rates of a GPU and its host link; the speed model applies its efficiencies to them."""

    name: str
    bf16_flops: float
    fp8_flops: float | None  # None: no FP8 tensor cores (FP8 weights run weight-only)
    hbm_bytes_per_s: float
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    memory_bytes: int | None = None

    @property
    def has_fp8_matmul(self) -> bool:
        return self.fp8_flops is not None


HARDWARE_PRESETS = {
    "h100": Hardware("NVIDIA H100 80GB HBM3", 989e12, 1979e12, 3.35e12, 50e9, 50e9, 81559 * MiB),
    "h200": Hardware("NVIDIA H200", 989e12, 1979e12, 4.8e12, 50e9, 50e9, 143771 * MiB),
    "a100": Hardware("NVIDIA A100 80GB", 312e12, None, 2.0e12, 25e9, 25e9, 81920 * MiB),
    "rtx4090": Hardware("RTX 4090-class (24 GB, ~25 GB/s host link, ~330 TFLOP/s FP8)",
                        165e12, 330e12, 1.0e12, 25e9, 25e9, 24564 * MiB),
    # Dense tensor rates with float32 accumulation (as for the 4090): 46 of the 4090's 128 SMs.
    "rtx4070": Hardware("RTX 4070-class (12 GB, ~25 GB/s host link, ~117 TFLOP/s FP8)",
                        58.3e12, 116.6e12, 0.504e12, 25e9, 25e9, 12282 * MiB),
}
_DEVICE_NAME_PRESETS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("4090", "rtx4090"),
                        ("4070", "rtx4070"))

# A CPU run: nothing crosses a host link (the rates only keep the speed model finite).
CPU_HARDWARE = Hardware("CPU (no GPU)", 1e12, None, 5e10, 1e15, 1e15)


def detect_hardware(device_index: int | None = None) -> Hardware | None:
    """The preset matching the current CUDA GPU (its name and total memory), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device_index is None else device_index
    properties = torch.cuda.get_device_properties(index)
    for needle, key in _DEVICE_NAME_PRESETS:
        if needle in properties.name:
            return replace(HARDWARE_PRESETS[key], name=properties.name, memory_bytes=properties.total_memory)
    fp8 = torch.cuda.get_device_capability(index) >= (8, 9)
    generic = HARDWARE_PRESETS["h100" if fp8 else "a100"]
    return replace(generic, name=f"{properties.name} (rates of {generic.name})", memory_bytes=properties.total_memory)


def available_host_memory() -> int | None:
    """Bytes of RAM this process can still take: the machine's MemAvailable, or less when the process's
    memory cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) leaves less; None when unknown (not Linux)."""
    available = meminfo_bytes("MemAvailable")
    if available is None:
        return None
    limit = _cgroup_headroom()
    return available if limit is None else min(available, limit)


def meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo in bytes (MemAvailable, MemTotal, ...), None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup, its page cache counted as free (the kernel
    reclaims it before it fails an allocation); None without a limit."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = [line.rstrip("\n").split(":", 2) for line in handle]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":  # v2
            folder = f"/sys/fs/cgroup{path}".rstrip("/")
            files = ("memory.max", "memory.current", "memory.stat", "file")
        elif "memory" in controllers.split(","):  # v1
            folder = f"/sys/fs/cgroup/memory{path}".rstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_cache")
        else:
            continue
        try:
            with open(f"{folder}/{files[0]}") as handle:
                limit = handle.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                continue
            with open(f"{folder}/{files[1]}") as handle:
                usage = int(handle.read())
            with open(f"{folder}/{files[2]}") as handle:
                cache = next((int(value) for key, value in (line.split() for line in handle) if key == files[3]), 0)
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - usage + cache)
    return None
