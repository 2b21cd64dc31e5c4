"""The quantisation of the opt-in quantised self-attention (``--attention int8|fp8``): SageAttention2's
method (Zhang et al., 2025, "SageAttention2: Efficient Attention with Thorough Outlier Smoothing and
Per-thread INT4 Quantization"), at per-block granularity.

- K is smoothed: its per-head mean over the tokens is subtracted. Exact for softmax (it shifts every score
  of a query by the same amount) and it removes the channel-wise bias that otherwise sets K's scales.
- Q and K are quantised per block of tokens per head (`BLOCK_M` queries, `BLOCK_N` keys; one scale each),
  to INT8 (``int8``) or FP8 e4m3 (``fp8``); the softmax scale is folded into Q's scales. Q·Kᵀ runs on
  INT8 (exact int32 sums) or FP8 tensor cores.
- P·V runs in FP8: V is quantised per channel (per head, over all tokens), P (in [0, 1] after the online
  softmax's exponent) is multiplied by `P_SCALE` before its FP8 cast; the row sums use the unquantised P;
  every key block's product is added to an fp32 accumulator.

`reference_attention` is the same computation in plain PyTorch, key block by key block as the kernel
(`liveavatar.models.sage_kernels`) does: for the CPU, the tests and checking the kernel.
"""
from __future__ import annotations

import math

import torch

BLOCK_M = 128  # queries per Q scale (and per kernel program)
BLOCK_N = 128  # keys per K scale (and per step of the kernel's loop): the fastest of the tilings measured on an H100
INT8_MAX = 127.0
FP8_MAX = 448.0  # e4m3's largest finite value
P_SCALE = FP8_MAX  # P in [0, 1] is scaled onto e4m3's range before its cast (SageAttention2)
LOG2E = 1.4426950408889634  # the kernel's softmax uses exp2
AMAX_FLOOR = 1e-12  # an all-zero block gets a finite scale


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _quantise_blocks(x: torch.Tensor, block: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] float32 -> its quantised values (as float32) and one scale per ``block`` tokens
    [B, H, ceil(L / block)]."""
    batch, heads, length, dim = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, (-length) % block)).view(batch, heads, -1, block, dim)
    scale = padded.abs().amax(dim=(-1, -2)).clamp_min(AMAX_FLOOR) / (INT8_MAX if mode == "int8" else FP8_MAX)
    scaled = padded / scale[..., None, None]
    quantised = _round_half_away(scaled) if mode == "int8" else scaled.to(torch.float8_e4m3fn).float()
    return quantised.view(batch, heads, -1, dim)[:, :, :length], scale


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, *,
                        block_n: int = BLOCK_N) -> torch.Tensor:
    """The quantised attention in PyTorch: q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D] in
    q's dtype (see the module docstring); ``block_n`` keys per K scale and per step."""
    if mode not in ("int8", "fp8"):
        raise ValueError(f"reference_attention quantises int8 or fp8, not {mode!r}")
    dtype = q.dtype
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    k = k - k.mean(dim=2, keepdim=True)
    q_quant, q_scale = _quantise_blocks(q, BLOCK_M, mode)
    k_quant, k_scale = _quantise_blocks(k, block_n, mode)
    v_scale = v.abs().amax(dim=2).clamp_min(AMAX_FLOOR) / FP8_MAX  # [B, H, D]
    v_quant = (v / v_scale[:, :, None]).to(torch.float8_e4m3fn).float()
    row_scale = q_scale.repeat_interleave(BLOCK_M, dim=-1)[..., :q.shape[2], None] * (q.shape[-1] ** -0.5 * LOG2E)
    running_max = q.new_full(q.shape[:3], -math.inf)
    row_sum = q.new_zeros(q.shape[:3])
    acc = torch.zeros_like(q)
    for block, start in enumerate(range(0, k.shape[2], block_n)):
        keys = slice(start, start + block_n)
        scores = (q_quant @ k_quant[:, :, keys].transpose(-1, -2)) * (row_scale * k_scale[..., block, None, None])
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        p = torch.exp2(scores - new_max[..., None])
        alpha = torch.exp2(running_max - new_max)
        row_sum = row_sum * alpha + p.sum(dim=-1)
        p_quant = (p * P_SCALE).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + p_quant @ v_quant[:, :, keys]
        running_max = new_max
    out = acc * (v_scale[:, :, None] / P_SCALE) / row_sum[..., None]
    return out.transpose(1, 2).to(dtype)
