"""Attention for the DiT: the one kernel call, and the q/k-normalised cross-attention layer shared by the
text cross-attention and the audio injectors.

Every attention in the model goes through ``attention()``, so a faster kernel plugs in here only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention without mask, scale 1/sqrt(head_dim).

    q [B, Lq, heads, D], k and v [B, Lk, heads, D] -> [B, Lq, heads, D]. PyTorch picks cuDNN / flash /
    memory-efficient kernels on GPU and the math kernel on CPU.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    """RMS norm over the full width (all heads together): normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class AttentionProjections(nn.Module):
    """The q, k, v, o linears and the RMS norms of q and k, under the release's parameter names."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


def context_kv(layer: "CrossAttention", context: torch.Tensor, run: Callable = nn.Module.__call__
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, Lc, heads, D] of a context [B, Lc, dim]; ``run(module, x)`` calls a submodule
    (with its hooks by default)."""
    k = run(layer.norm_k, run(layer.k, context)).unflatten(-1, (layer.num_heads, -1))
    return k, run(layer.v, context).unflatten(-1, (layer.num_heads, -1))


class CrossAttention(AttentionProjections):
    """Queries from the hidden states, keys/values from a context; q and k RMS-normalised (the forward
    is `liveavatar.models.regions`' cross-attention)."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (cacheable while it is unchanged), see `context_kv`."""
        return context_kv(self, context)
