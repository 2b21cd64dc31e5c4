"""The attention caches of the causal DiT, on the device.

``KVCache``: one per denoising step ("timestep forcing": step i of a block attends to the K/V that earlier
blocks produced at step i, the reference's kv_cache list indexed by the timestep). A ring buffer of one
clip's tokens per layer holding RoPE-applied keys and raw values; a block's tokens are written at
(absolute token index mod capacity), so positions never wrap: they are baked into the keys.

``CondCache``: shared by all steps (the reference's crossattn/cond cache of the sink). The un-roped keys and
the values of the condition tokens (reference frame + frame-packed motion) per layer, written by the sink
prefill, plus their RoPE positions; the keys are roped on every streaming call because the reference
frame's position rolls with the block.

Both are sized from the real token counts of the run, never from fixed buffer sizes, and are allocated
once and `reset` for every new video.
"""
from __future__ import annotations

import torch

from liveavatar.runtime.caches.storage import KVStorage


def check_block(tokens: int, capacity: int, start_token: int) -> None:
    if tokens > capacity:
        raise ValueError(f"a block of {tokens} tokens does not fit a KV cache of {capacity} tokens; "
                         f"make the cache at least one block long")
    if start_token < 0:
        raise ValueError(f"start token must be >= 0, got {start_token}")


def check_cond_capacity(tokens: int, capacity: int, latent_hw: tuple[int, int]) -> int:
    """``tokens`` if a cond cache of ``capacity`` holds them, else the error that says how to size it."""
    if tokens > capacity:
        raise ValueError(f"{tokens} condition tokens for latent size {latent_hw[0]}x{latent_hw[1]} do not fit "
                         f"a cond cache of {capacity}; size it with ClipGeometry(...).cond_tokens")
    return tokens


class KVCache:
    """Per-layer ring buffer of one denoising step, in the run dtype or FP8 (e4m3 + a scale per token)."""

    def __init__(self, *, num_layers: int, capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, fp8: bool = False):
        self.storage = KVStorage(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=fp8, device=device)
        self.end = 0  # absolute token index just past the furthest token written so far
        self.length = 0  # valid entries, what the attention reads
        self.write_index: torch.Tensor | None = None  # ring positions of the reserved block, on the device
        self._offsets: torch.Tensor | None = None

    capacity = property(lambda self: self.storage.tokens)
    nbytes = property(lambda self: self.storage.nbytes)

    def reset(self) -> None:
        """Forget every block (a new video starts); the memory is reused."""
        self.end = self.length = 0

    def reserve(self, start_token: int, tokens: int) -> None:
        """Announce a block of ``tokens`` tokens starting at absolute token ``start_token``."""
        check_block(tokens, self.capacity, start_token)
        self.end = max(self.end, start_token + tokens)
        self.length = min(self.end, self.capacity)
        if self.write_index is None or self.write_index.numel() != tokens:
            device = self.storage.tensors[0].device
            self._offsets = torch.arange(tokens, device=device)
            self.write_index = torch.empty(tokens, dtype=torch.long, device=device)
        torch.add(self._offsets, start_token % self.capacity, out=self.write_index).remainder_(self.capacity)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the reserved block's roped keys and values [1, tokens, heads, head_dim] at its ring position."""
        self.storage.store_at(layer, self.write_index, k[0], v[0])

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid entry of this layer, [1, n, heads, head_dim]: the tokens written so far in the first
        clip, the whole buffer once it has wrapped."""
        return self.storage.load(layer, self.length)


class CondCache:
    """Un-roped condition-token keys and values [layers, capacity, heads, head_dim], the number of valid
    tokens ``length``, their sink RoPE ``positions`` [length, 3] (frame, row, column), how many of them
    belong to the reference frame (``ref_tokens``, at the front) and the latent size (``latent_hw``)."""

    def __init__(self, *, num_layers: int, capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.storage = KVStorage(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=False, device=device)
        self.reset()

    capacity = property(lambda self: self.storage.tokens)
    nbytes = property(lambda self: self.storage.nbytes)

    def reset(self) -> None:
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.ref_tokens = 0
        self.latent_hw: tuple[int, int] | None = None

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        """Start a prefill of ``len(positions)`` condition tokens (replacing any earlier one)."""
        self.length = check_cond_capacity(positions.shape[0], self.capacity, latent_hw)
        self.positions, self.ref_tokens, self.latent_hw = positions, ref_tokens, latent_hw

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's un-roped keys and values [1, length, heads, head_dim]."""
        self.storage.store(layer, 0, k[0], v[0])

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's un-roped keys and values, [1, length, heads, head_dim]."""
        return self.storage.load(layer, self.length)
