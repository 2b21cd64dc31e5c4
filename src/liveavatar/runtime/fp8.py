"""FP8 (e4m3) linears for the DiT, applied after the LoRA merge (the reference's
``liveavatar/utils/fp8_linear.py``, applied by ``causal_s2v_pipeline.py`` when ``--fp8`` is given).

The reference scheme: every `nn.Linear` of the DiT except the 7 whose names contain one of
`KEEP_BF16_PATTERNS` becomes an FP8 linear (460 at 14B). Weights are quantised once per tensor:
amax = max|W| in fp32, s = min(448 / max(amax, 1e-12), 448), codes = e4m3(clamp(W·s, ±448)), and the
stored scale is 1/s. Two kernels use the same stored codes:

* "scaled_mm" (W8A8, the reference's kernel, needs FP8 tensor cores, sm_89+): the input is flattened
  to [M, I], quantised per tensor with the same formula on every call, multiplied with
  `torch._scaled_mm` (fast accumulation, bias fused, bf16 output) and cast back to the input dtype;
* "scaled_mm_rows": the same GEMM with one activation scale per row (token) instead of one per tensor
  (the weight keeps its per-tensor scale, broadcast per output channel). A row's amax is a reduction
  over one row, which Inductor fuses into the kernel that produces the row (a norm, a modulation, a
  GELU), so no extra pass over the input remains; per-tensor needs a full reduction first and a second
  pass to quantise. Deviation from the reference: a row's scale is ≥ the tensor's (its amax ≤ the
  tensor's), so rows below the tensor's max keep more of their precision; values are never clipped
  differently (both map their amax to 448);
* "weight_only": the weight is dequantised per call (codes · scale formed in fp32, rounded to the input
  dtype) and multiplied with a regular matmul. Works on any device, including CPU; the transient
  dequantised weight is the price for FP8 storage without FP8 tensor cores.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Linears whose module name contains one of these stay in bf16 (substring match, as the reference).
KEEP_BF16_PATTERNS = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head.head",
    "casual_audio_encoder.encoder.final_linear",
)
FP8_KERNELS = ("scaled_mm", "scaled_mm_rows", "weight_only")


def scale_for_amax(amax: torch.Tensor) -> torch.Tensor:
    """The reference's e4m3 scale for an fp32 amax: 448 / amax, capped at 448 (tiny tensors are not blown up)."""
    return (FP8_MAX / amax.clamp(min=1e-12)).clamp(max=FP8_MAX)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor, as the maxima of its rows reduced once more: the same value (a max is
    exact in any order), but Inductor makes it a row reduction and a small one. Taken whole, inside the DiT
    block's compiled regions, the o projection's amax became one persistent reduction at 104 µs a call on
    an H200; by rows 17 µs, and a 704*384 FP8 block went from 0.718 to 0.700 s (benchmarks/RESULTS.md).
    Where a layer norm feeds it, Inductor then fuses the two differently, so compiled codes may differ from
    the whole-tensor form's by a rounding of the norm (`benchmarks/fp8_amax_forms.py`)."""
    magnitude = x.detach().abs()
    return magnitude.amax(dim=-1).amax() if x.dim() > 1 else magnitude.amax()


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 0-d inverse scale) with x ≈ codes · inverse_scale; the scale math is fp32."""
    amax = tensor_amax(x).float()  # the max of bf16 values is exact in bf16
    scale = scale_for_amax(amax)
    codes = x.detach().to(torch.float32, copy=True).mul_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale.reciprocal()


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_tensor` of every row of x [M, I]: codes and fp32 inverse scales [M, 1]."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = scale_for_amax(amax)
    codes = (x.detach().float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale.reciprocal()


_fused_quantizer = None


def _quantize_activation(x: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_tensor` for the per-call inputs of the W8A8 kernel. Inside a compiled region
    (`liveavatar.runtime.compile`) it is traced with the region, so Inductor fuses it with the op that
    produces the input. Otherwise, on CUDA it is compiled on its own into one fused kernel as the
    reference does (eager, it costs ~6 passes over the input per linear, more than FP8 saves); where
    compilation is unavailable it stays eager."""
    global _fused_quantizer
    if per_row:  # a row reduction: fused into its producer when compiled, one kernel eager
        return quantize_per_row(x)
    if torch.compiler.is_compiling() or not x.is_cuda or _fused_quantizer is False:
        return quantize_per_tensor(x)
    if _fused_quantizer is None:
        _fused_quantizer = torch.compile(quantize_per_tensor, dynamic=True)
        try:
            return _fused_quantizer(x)
        except Exception as error:  # no triton / no compiler on this machine
            warnings.warn(f"FP8 activation quantiser runs eagerly (torch.compile failed: {error})")
            _fused_quantizer = False
            return quantize_per_tensor(x)
    return _fused_quantizer(x)


def fp8_kernel_for(device: torch.device | str) -> str:
    """The fastest kernel the device runs: "scaled_mm" on CUDA GPUs with FP8 tensor cores (sm_89+)."""
    device = torch.device(device)
    if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) >= (8, 9):
            return "scaled_mm"
    return "weight_only"


def keeps_bf16(module_name: str) -> bool:
    return any(pattern in module_name for pattern in KEEP_BF16_PATTERNS)


class FP8Linear(nn.Module):
    """A linear layer holding per-tensor e4m3 weight codes (`weight_fp8`) and their inverse scale."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, kernel: str,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if kernel not in FP8_KERNELS:
            raise ValueError(f"FP8 kernel must be one of {', '.join(FP8_KERNELS)}; got {kernel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: str) -> "FP8Linear":
        """Quantise `linear` on its own device; its bf16 weight is not referenced afterwards."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, kernel=kernel,
                    device="meta", bias_dtype=linear.weight.dtype)
        layer.weight_fp8, layer.weight_scale = quantize_per_tensor(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "weight_only":
            return self._forward_scaled_mm(x)
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # The product is formed in fp32 so the scale is not rounded to bf16 first.
        return (self.weight_fp8.float() * self.weight_scale).to(dtype)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).contiguous()
        per_row = self.kernel == "scaled_mm_rows"
        codes, inverse_scale = _quantize_activation(x2d, per_row)
        # Row-wise scaling takes the weight's scale per output channel ([1, O]).
        weight_scale = self.weight_scale.expand(1, self.out_features).contiguous() if per_row else self.weight_scale
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        out = torch._scaled_mm(codes, self.weight_fp8.t(), scale_a=inverse_scale, scale_b=weight_scale,
                               bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


def convert_to_fp8(module: nn.Module, *, kernel: str, prefix: str = "") -> int:
    """Replace every eligible `nn.Linear` inside `module` by an `FP8Linear`, in place; returns the count.

    `prefix` is the module's own name inside the DiT (e.g. "blocks.3"), so the keep-in-bf16 rule sees
    full names when a loader converts block by block to keep only one block in bf16 at a time.
    """
    converted = 0
    for name, child in list(module.named_modules()):
        for child_name, grandchild in list(child.named_children()):
            full_name = ".".join(part for part in (prefix, name, child_name) if part)
            if type(grandchild) is nn.Linear and not keeps_bf16(full_name):
                setattr(child, child_name, FP8Linear.from_linear(grandchild, kernel=kernel))
                converted += 1
    return converted


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 codes of x [..., tokens, heads, head_dim] and the fp32 inverse scale per token,
    with the same formula as `quantize_per_tensor` applied to each token's heads x head_dim values."""
    amax = x.detach().abs().amax(dim=(-2, -1)).float()
    scale = scale_for_amax(amax)
    codes = (x.float() * scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale.reciprocal()


def dequantize_rows(codes: torch.Tensor, inverse_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * inverse_scale[..., None, None]).to(dtype)
