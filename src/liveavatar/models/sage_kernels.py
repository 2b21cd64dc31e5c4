"""Triton kernels of the quantised self-attention (`liveavatar.models.quantised_attention` holds the method,
its PyTorch reference and the dispatch; this module needs Triton and is imported only where it runs).

Three passes over a call's tensors and the attention itself, all on the current stream (so a CUDA graph
captures them): Q and the smoothed K are quantised per block of tokens per head into [B, H, L, D]; V is
quantised to FP8 per channel and written transposed, [B, H, D, L_pad], so that both operands of each
``tl.dot`` are K-major, as Hopper's FP8 wgmma requires; the attention kernel runs one block of queries of
one head per program with an online softmax in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from liveavatar.models.sage_reference import (
    AMAX_FLOOR,
    BLOCK_M,
    BLOCK_N,
    FP8_MAX,
    INT8_MAX,
    LOG2E,
    P_SCALE,
)


@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """x (float32, |x| <= 448) cast to FP8 e4m3 with round-to-nearest-even. ``EMULATE`` (under Triton's CPU
    interpreter, whose cast mis-rounds values just under a power of two and ties) first rounds in float32
    onto e4m3's grid (3 mantissa bits, subnormal step 2^-9), so the cast itself is exact."""
    if EMULATE:
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = tl.exp2(tl.maximum(exponent - 3, -9).to(tl.float32))
        magnitude = ((tl.abs(x) / step + 8388608.0) - 8388608.0) * step  # 2^23: float32 rounds to an integer
        x = tl.where(x < 0, -magnitude, magnitude)
    return x.to(tl.float8e4nv)


@triton.jit
def _load_block(X, L, H, stride_b, stride_l, stride_h, BLOCK: tl.constexpr, D: tl.constexpr):
    """This program's block of tokens of one head from X [B, L, H, D] as float32 [BLOCK, D] (zeros past L),
    with its head index b * H + h, its token indices and their mask."""
    block, bh = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    inside = rows[:, None] < L
    x = tl.load(X + (bh // H) * stride_b + (bh % H) * stride_h + rows[:, None] * stride_l + tl.arange(0, D)[None, :],
                mask=inside, other=0.0).to(tl.float32)
    return x, bh, rows, inside


@triton.jit
def _quantise_blocks(X, MEAN, OUT, SCALE, L, H, stride_b, stride_l, stride_h, scale_factor,
                     BLOCK: tl.constexpr, D: tl.constexpr, SMOOTH: tl.constexpr, INT8: tl.constexpr,
                     QMAX: tl.constexpr, FLOOR: tl.constexpr, EMULATE: tl.constexpr):
    x, bh, rows, inside = _load_block(X, L, H, stride_b, stride_l, stride_h, BLOCK, D)
    cols = tl.arange(0, D)
    if SMOOTH:
        x = tl.where(inside, x - tl.load(MEAN + bh * D + cols)[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), FLOOR) / QMAX
    scaled = x / scale
    if INT8:
        quantised = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int8)
    else:
        quantised = _to_e4m3(scaled, EMULATE)
    tl.store(OUT + bh * L * D + rows[:, None] * D + cols[None, :], quantised, mask=inside)
    tl.store(SCALE + bh * ((L + BLOCK - 1) // BLOCK) + tl.program_id(0), scale * scale_factor)


@triton.jit
def _quantise_v(V, AMAX, OUT, L, H, stride_b, stride_l, stride_h, padded_l,
                BLOCK: tl.constexpr, D: tl.constexpr, VMAX: tl.constexpr, FLOOR: tl.constexpr, EMULATE: tl.constexpr):
    v, bh, rows, inside = _load_block(V, L, H, stride_b, stride_l, stride_h, BLOCK, D)
    cols = tl.arange(0, D)
    scale = tl.maximum(tl.load(AMAX + bh * D + cols), FLOOR) / VMAX
    tl.store(OUT + bh * D * padded_l + cols[None, :] * padded_l + rows[:, None],
             _to_e4m3(v / scale[None, :], EMULATE), mask=inside)


@triton.jit
def _key_block(acc, l_i, m_i, q, q_scale, K, VT, KS, j, Lk, padded_l, offs_n, offs_d,
               BLOCK_N: tl.constexpr, D: tl.constexpr, INT8: tl.constexpr, MASKED: tl.constexpr,
               PSCALE: tl.constexpr, EMULATE: tl.constexpr):
    keys = j * BLOCK_N + offs_n
    k_ptrs = K + keys[None, :] * D + offs_d[:, None]  # [D, BLOCK_N]: K^T, reduction dim contiguous
    v_ptrs = VT + offs_d[:, None] * padded_l + keys[None, :]  # [D, BLOCK_N]: V^T, keys contiguous
    if MASKED:
        k = tl.load(k_ptrs, mask=keys[None, :] < Lk, other=0.0)
        vt = tl.load(v_ptrs, mask=keys[None, :] < Lk, other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(v_ptrs)
    if INT8:
        s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, k)
    s = s * (q_scale * tl.load(KS + j))
    if MASKED:
        s = tl.where(keys[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # A fresh fp32 sum per key block, added to the running one: Hopper's FP8 MMA accumulates with fewer
    # mantissa bits, so long sums stay in fp32 (SageAttention2's two-level accumulation).
    pv = tl.dot(_to_e4m3(p * PSCALE, EMULATE), tl.trans(vt))
    return acc * alpha[:, None] + pv, l_i, m_new


@triton.jit
def _attention(Q, K, VT, QS, KS, VAMAX, OUT, Lq, Lk, H, padded_l, stride_ob, stride_ol, stride_oh,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, INT8: tl.constexpr,
               PSCALE: tl.constexpr, VMAX: tl.constexpr, FLOOR: tl.constexpr, EMULATE: tl.constexpr):
    start, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0.0)
    q_scale = tl.load(QS + bh * ((Lq + BLOCK_M - 1) // BLOCK_M) + start)
    k_base, v_base, ks_base = K + bh * Lk * D, VT + bh * D * padded_l, KS + bh * ((Lk + BLOCK_N - 1) // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full_blocks = Lk // BLOCK_N
    for j in range(0, full_blocks):
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, j, Lk, padded_l, offs_n,
                                   offs_d, BLOCK_N, D, INT8, False, PSCALE, EMULATE)
    if full_blocks * BLOCK_N < Lk:
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, full_blocks, Lk, padded_l,
                                   offs_n, offs_d, BLOCK_N, D, INT8, True, PSCALE, EMULATE)
    v_scale = tl.maximum(tl.load(VAMAX + bh * D + offs_d), FLOOR) / VMAX
    out = acc * (v_scale / PSCALE)[None, :] / l_i[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < Lq)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and pipelining of the attention kernel; ``block_n`` is also K's quantisation block."""

    block_n: int = BLOCK_N
    num_warps: int = 8
    num_stages: int = 3


DEFAULT_CONFIG = KernelConfig()


class Quantised(NamedTuple):
    """One call's quantised operands: Q and K [B, H, L, D] with their per-block scales [B, H, blocks], V
    transposed [B, H, D, L_pad] (FP8) with its per-channel absolute maxima [B, H, D]."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_amax: torch.Tensor


def _emulate() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, int8: bool,
             config: KernelConfig = DEFAULT_CONFIG) -> Quantised:
    """The three quantisation passes: q [B, Lq, H, D], k and v [B, Lk, H, D], last dim contiguous."""
    batch, lq, heads, dim = q.shape
    lk, block_n = k.shape[1], config.block_n
    qdtype, qmax = (torch.int8, INT8_MAX) if int8 else (torch.float8_e4m3fn, FP8_MAX)
    device, emulate = q.device, _emulate()
    q_blocks, k_blocks = triton.cdiv(lq, BLOCK_M), triton.cdiv(lk, block_n)
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # [B, H, D]
    v_amax = torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32).contiguous()
    quantised = Quantised(torch.empty(batch, heads, lq, dim, device=device, dtype=qdtype),
                          torch.empty(batch, heads, q_blocks, device=device, dtype=torch.float32),
                          torch.empty(batch, heads, lk, dim, device=device, dtype=qdtype),
                          torch.empty(batch, heads, k_blocks, device=device, dtype=torch.float32),
                          torch.empty(batch, heads, dim, k_blocks * block_n, device=device, dtype=torch.float8_e4m3fn),
                          v_amax)
    _quantise_blocks[(q_blocks, batch * heads)](
        q, k_mean, quantised.q, quantised.q_scale, lq, heads, q.stride(0), q.stride(1), q.stride(2),
        dim ** -0.5 * LOG2E, BLOCK=BLOCK_M, D=dim, SMOOTH=False, INT8=int8, QMAX=qmax, FLOOR=AMAX_FLOOR,
        EMULATE=emulate)
    _quantise_blocks[(k_blocks, batch * heads)](
        k, k_mean, quantised.k, quantised.k_scale, lk, heads, k.stride(0), k.stride(1), k.stride(2), 1.0,
        BLOCK=block_n, D=dim, SMOOTH=True, INT8=int8, QMAX=qmax, FLOOR=AMAX_FLOOR, EMULATE=emulate)
    _quantise_v[(k_blocks, batch * heads)](
        v, v_amax, quantised.v, lk, heads, v.stride(0), v.stride(1), v.stride(2), quantised.v.shape[-1],
        BLOCK=block_n, D=dim, VMAX=FP8_MAX, FLOOR=AMAX_FLOOR, EMULATE=emulate)
    return quantised


def attend(quantised: Quantised, out: torch.Tensor, config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """The attention kernel over quantised operands into ``out`` [B, Lq, H, D] (any float dtype)."""
    batch, heads, lq, dim = quantised.q.shape
    lk = quantised.k.shape[2]
    _attention[(triton.cdiv(lq, BLOCK_M), batch * heads)](
        quantised.q, quantised.k, quantised.v, quantised.q_scale, quantised.k_scale, quantised.v_amax, out, lq, lk,
        heads, quantised.v.shape[-1], out.stride(0), out.stride(1), out.stride(2), BLOCK_M=BLOCK_M,
        BLOCK_N=config.block_n, D=dim, INT8=quantised.q.dtype == torch.int8, PSCALE=P_SCALE, VMAX=FP8_MAX,
        FLOOR=AMAX_FLOOR, EMULATE=_emulate(), num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def quantised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, int8: bool,
                        config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous) -> [B, Lq, H, D] in q's dtype; the
    method of `liveavatar.models.sage_reference`."""
    return attend(quantise(q, k, v, int8, config), torch.empty_like(q), config)
