"""The blocks' self-attention as a run asks for it (``--attention``): ``bf16``, the default, is the reference's
exact attention (SDPA); ``int8`` and ``fp8`` quantise it with SageAttention2's method
(`liveavatar.models.sage_reference`), run by the Triton kernel of `liveavatar.models.sage_kernels` as the custom
op ``liveavatar::quantised_attention`` (opaque to torch.compile, capturable in CUDA graphs), or by its PyTorch
reference. Where the kernel cannot run (the CPU, GPUs without FP8 tensor cores, no Triton),
`resolve_self_attention` falls back to the bf16 attention with one notice.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from liveavatar.models.attention import attention
from liveavatar.models.sage_reference import reference_attention
from liveavatar.options import DEFAULTS, attention_mode

DEFAULT_ATTENTION = DEFAULTS.attention
KERNEL_HEAD_DIMS = (32, 64, 128)  # powers of two (tl.arange), multiples of 32 (the INT8/FP8 MMA's K)
FP8_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) on; INT8 Q·Kᵀ alone needs sm_80


@torch.library.custom_op("liveavatar::quantised_attention", mutates_args=())
def _kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, int8: bool) -> torch.Tensor:
    from liveavatar.models import sage_kernels

    # The kernel reads rows of head_dim contiguous elements (any other strides are arguments).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return sage_kernels.quantised_attention(q, k, v, int8)


@_kernel_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, int8: bool) -> torch.Tensor:
    return torch.empty_like(q)


def kernel_problem(device: torch.device | str, head_dim: int | None = None) -> str | None:
    """Why the quantised kernel cannot run on ``device`` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the quantised attention kernel needs an NVIDIA GPU with FP8 tensor cores; this run is on {device.type}"
    if torch.version.hip is not None:
        return "the quantised attention kernel is written for NVIDIA GPUs (FP8 e4m3fn, wgmma); this is ROCm"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}: the FP8 P·V needs "
                f"FP8 tensor cores (sm_89+: L4, L40, RTX 40xx, H100, H200, B200)")
    from torch.utils._triton import has_triton

    if not has_triton():
        return "Triton is not installed (the quantised attention kernel is a Triton kernel)"
    if head_dim is not None and head_dim not in KERNEL_HEAD_DIMS:
        return f"head dim {head_dim} (the kernel handles {KERNEL_HEAD_DIMS})"
    return None


@dataclass(frozen=True)
class SelfAttention:
    """The self-attention a run uses: ``mode`` as asked, ``runs`` what runs here (``mode`` or ``bf16``),
    ``reason`` why they differ, ``implementation`` ``sdpa`` (PyTorch's fused bf16 kernels), ``triton`` (the
    quantised kernel) or ``reference`` (the PyTorch form of it, for checks on the CPU)."""

    mode: str = DEFAULT_ATTENTION
    runs: str = DEFAULT_ATTENTION
    implementation: str = "sdpa"
    reason: str = ""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.implementation == "triton":
            return _kernel_attention(q, k, v, self.runs == "int8")
        if self.implementation == "reference":
            return reference_attention(q, k, v, self.runs)
        return attention(q, k, v)

    @property
    def name(self) -> str:
        if self.runs == "bf16":
            return "bf16" if self.mode == "bf16" else f"bf16 ({self.mode} asked: {self.reason})"
        qk = "INT8" if self.runs == "int8" else "FP8"
        where = "PyTorch reference" if self.implementation == "reference" else "Triton kernel"
        return f"{self.runs} ({qk} Q·Kᵀ with K smoothing, FP8 P·V; {where})"


def choose_self_attention(mode: str, device: torch.device | str, *, head_dim: int | None = None,
                          reference: bool = False) -> SelfAttention:
    """The self-attention for ``mode`` on ``device``: the quantised kernel where it runs, else bf16 (the
    reason in ``reason``); ``reference`` runs the quantised modes in PyTorch instead (anywhere; slow)."""
    mode = attention_mode(mode)
    if mode == "bf16":
        return SelfAttention()
    if reference:
        return SelfAttention(mode, mode, "reference")
    problem = kernel_problem(device, head_dim)
    if problem is not None:
        return SelfAttention(mode, "bf16", "sdpa", problem)
    return SelfAttention(mode, mode, "triton")


def resolve_self_attention(mode: str, device: torch.device | str, *, head_dim: int | None = None,
                           reference: bool = False) -> SelfAttention:
    """`choose_self_attention`, with one notice when it falls back to bf16 (what a run calls once per mode)."""
    choice = choose_self_attention(mode, device, head_dim=head_dim, reference=reference)
    if choice.reason:
        warnings.warn(f"--attention {mode}: {choice.reason}; the self-attention runs in bf16", stacklevel=2)
    return choice
