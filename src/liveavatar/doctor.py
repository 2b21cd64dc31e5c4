"""``liveavatar doctor``: what this machine and these checkpoints give ``generate``."""
from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from liveavatar import __version__
from liveavatar.checkpoints.layout import CheckpointLayout
from liveavatar.devices import dtype_name
from liveavatar.errors import CheckpointError
from liveavatar.options import DEFAULT_SIZE, DEFAULTS
from liveavatar.serve import ui_extra_status
from liveavatar.serve.cluster import cluster_extra_status

_PACKAGES = ("av", "soxr", "Pillow", "safetensors", "transformers", "huggingface_hub")
GiB = 1024**3


def report_lines(ckpt_dir: Path, lora: str | None) -> tuple[list[str], bool]:
    """Human-readable report lines and whether generate can run (checkpoints complete)."""
    import torch

    from liveavatar.models.checkpoint_check import check_transformer_checkpoint

    lines = [f"liveavatar {__version__}",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
             "packages: " + ", ".join(f"{name} {_version(name)}" for name in _PACKAGES)]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            capability = torch.cuda.get_device_capability(index)
            fp8 = "yes" if capability >= (8, 9) and hasattr(torch, "_scaled_mm") else "no (weight-only fp8)"
            lines.append(f"GPU {index}: {properties.name}, {total / GiB:.1f} GiB total, {free / GiB:.1f} GiB free, "
                         f"compute {capability[0]}.{capability[1]}, fp8 matmul: {fp8}")
        device = "cuda:0"
    else:
        lines.append("GPU: none visible to torch (CUDA not available); generate would run on the CPU, "
                     "which is only practical with tiny checkpoints")
        device = "cpu"

    layout = CheckpointLayout.discover(ckpt_dir, lora)
    problems = layout.problems()
    if not problems:
        try:
            check_transformer_checkpoint(layout.dit_dir, layout.lora)
        except CheckpointError as error:
            problems = [str(error)]
    lines.append(f"checkpoints: {layout.ckpt_dir}: " + ("complete" if not problems else f"{len(problems)} problem(s)"))
    lines.extend(f"  - {problem}" for problem in problems)
    lines.append(ui_extra_status()[1])
    lines.append(cluster_extra_status()[1])
    lines.append(f"LoRA: {layout.lora or 'not found'}" + (f" (from {lora})" if lora and str(layout.lora) != lora else ""))
    dtype = dtype_name(None, "cuda" if device.startswith("cuda") else "cpu")
    lines.append(f"generate would use: device {device}, {dtype}, --mode {DEFAULTS.mode}, "
                 f"--size {DEFAULT_SIZE} (an area; the aspect ratio follows the image), "
                 f"{DEFAULTS.infer_frames} frames per clip, {DEFAULTS.sample_steps} steps, "
                 f"seed {DEFAULTS.base_seed}, rope offset {DEFAULTS.ref_rope_offset}")
    return lines, not problems


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
