"""Attention caches of the causal DiT.

``KVCache``: one per denoising step ("timestep forcing": step i of a block attends to the K/V that earlier
blocks produced at step i). A ring buffer of ``cache_frames`` latent frames of RoPE-applied keys and raw
values per layer; a block's tokens are written at (absolute token index mod capacity), so positions never
wrap — they are baked into the keys.

``CondCache``: shared by all steps. The un-roped keys and the values of the condition tokens (reference
frame + frame-packed motion) per layer, written by the sink prefill, plus their RoPE positions; the keys
are roped on every streaming call because the reference frame's position rolls with the block.

Both are sized from the real token counts of the run, never from fixed buffer sizes.
"""
from __future__ import annotations

import torch


class _LayerKV:
    """Keys ``k`` and values ``v`` [layers, capacity, heads, head_dim], allocated once for the run."""

    kind = "KV"

    def __init__(self, *, num_layers: int, capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if capacity <= 0:
            raise ValueError(f"{self.kind} cache capacity must be positive, got {capacity} tokens")
        shape = (num_layers, capacity, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVCache(_LayerKV):
    """Per-layer ring buffer ``k``/``v`` [layers, capacity, heads, head_dim] for one denoising step."""

    def __init__(self, **sizes):
        super().__init__(**sizes)
        self.end = 0  # absolute token index just past the furthest token written so far

    def reset(self) -> None:
        """Forget every block (a new video starts); the memory is reused."""
        self.end = 0

    def reserve(self, start_token: int, tokens: int) -> None:
        """Announce a block of ``tokens`` tokens starting at absolute token ``start_token``."""
        if tokens > self.capacity:
            raise ValueError(f"a block of {tokens} tokens does not fit a KV cache of {self.capacity} tokens; "
                             f"make the cache at least one block long")
        if start_token < 0:
            raise ValueError(f"start token must be >= 0, got {start_token}")
        self.end = max(self.end, start_token + tokens)

    def write(self, layer: int, start_token: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's roped keys and values [1, tokens, heads, head_dim] at its ring position."""
        position = start_token % self.capacity
        first = min(k.shape[1], self.capacity - position)
        self.k[layer, position:position + first] = k[0, :first]
        self.v[layer, position:position + first] = v[0, :first]
        rest = k.shape[1] - first
        if rest:
            self.k[layer, :rest] = k[0, first:]
            self.v[layer, :rest] = v[0, first:]

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid entry of this layer, [1, n, heads, head_dim]: the tokens written so far in the first
        clip, the whole buffer once it has wrapped."""
        filled = min(self.end, self.capacity)
        return self.k[layer, :filled].unsqueeze(0), self.v[layer, :filled].unsqueeze(0)


class CondCache(_LayerKV):
    """Un-roped condition-token keys ``k`` and values ``v`` [layers, capacity, heads, head_dim], the
    number of valid tokens ``length``, their sink RoPE ``positions`` [length, 3] (frame, row, column),
    how many of them belong to the reference frame (``ref_tokens``, at the front) and the latent size
    (``latent_hw``) they were made for."""

    kind = "cond"

    def __init__(self, **sizes):
        super().__init__(**sizes)
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.ref_tokens = 0
        self.latent_hw: tuple[int, int] | None = None

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        """Start a prefill of ``len(positions)`` condition tokens (replacing any earlier one)."""
        tokens = check_cond_capacity(positions.shape[0], self.capacity, latent_hw)
        self.length = tokens
        self.positions = positions
        self.ref_tokens = ref_tokens
        self.latent_hw = latent_hw

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's un-roped keys and values [1, length, heads, head_dim]."""
        self.k[layer, :self.length] = k[0]
        self.v[layer, :self.length] = v[0]

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's un-roped keys and values, [1, length, heads, head_dim]."""
        return self.k[layer, :self.length].unsqueeze(0), self.v[layer, :self.length].unsqueeze(0)


def check_cond_capacity(tokens: int, capacity: int, latent_hw: tuple[int, int]) -> int:
    """``tokens`` if a cond cache of ``capacity`` holds them, else the error that says how to size it."""
    if tokens > capacity:
        raise ValueError(f"{tokens} condition tokens for latent size {latent_hw[0]}x{latent_hw[1]} do not fit "
                         f"a cond cache of {capacity}; create it with cond_tokens=config.cond_tokens(latent_h, latent_w)")
    return tokens
