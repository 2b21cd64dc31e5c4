"""The run device and dtype, resolved once, and the CUDA allocator's settings.

Names a user types (``cuda``, ``cuda:1``, ``cpu``; ``bfloat16``/``bf16``, ``float32``/``fp32``) become a
`torch.device` with an index and a `torch.dtype` here and nowhere else. torch is imported by the functions
that need it, so that validating settings (and ``liveavatar --help``) does not load it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from liveavatar.errors import InputError

if TYPE_CHECKING:
    import torch

# Spellings of the two run dtypes: bfloat16 (real runs, as the reference) and float32 (tests, fixtures).
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
               "float": "float32"}
ALLOCATOR_SETTING = "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Growable segments keep reserved GPU memory close to allocated (the planner budgets allocated bytes):
    without them a run reserved 78.5 GiB for 60.7 GiB allocated. CUDA reads this at its first allocation,
    so it is set before any model is placed; a value the user exported is kept."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_SETTING)


def _torch_dtypes() -> dict:
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}


def runs_on_cpu(device: str | None) -> bool:
    """Where a run goes: ``--device cpu``, or no ``--device`` on a machine without a CUDA GPU. One rule for a
    single process, spawned ranks and torchrun ranks alike."""
    if device is not None:
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The run device, with a CUDA index: torch.cuda's memory and device calls reject a bare "cuda". A device
    this machine lacks is refused here, which a dry run calls too."""
    import torch

    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"--device {device}: expected cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: PyTorch sees no CUDA GPU on this machine; leave --device out or "
                             f"give --device cpu to run on the CPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {device}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise InputError(f"--device {device}: expected cuda, cuda:N or cpu")
    return device


def dtype_name(dtype: str | torch.dtype | None, device_type: str) -> str:
    """``bfloat16`` or ``float32``: the given name or dtype, else the default of ``device_type`` (``cuda``:
    bfloat16 as the reference; anything else float32, which CPUs run faster and the fixtures are made in)."""
    if dtype is None:
        return "bfloat16" if device_type == "cuda" else "float32"
    if not isinstance(dtype, str):
        for name, value in _torch_dtypes().items():
            if value == dtype:
                return name
        raise InputError(f"dtype {dtype}: the engine runs in bfloat16 (as the reference) or float32")
    name = DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise InputError(f"dtype {dtype!r}: expected bfloat16 or float32")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    return _torch_dtypes()[dtype_name(dtype, device.type)]


def dtype_bytes(name: str) -> int:
    """Bytes per element of a run dtype given by name (the planner's unit)."""
    return {"bfloat16": 2, "float32": 4}[DTYPE_NAMES.get(str(name).lower(), name)]
