"""The attention caches of the causal DiT, on the device.

``KVCache``: one per denoising step ("timestep forcing": step i of a block attends to the K/V that earlier
blocks produced at step i, the reference's kv_cache list indexed by the timestep). A ring buffer of one
clip's tokens per layer holding RoPE-applied keys and raw values; a block's tokens are written at
((absolute token index - the first token written since the reset) mod capacity), so positions never
wrap (they are baked into the keys) and the valid entries are always the ring's first ``length`` tokens,
even for a video whose first block starts past token 0. Its attention inputs are the window concatenated
with the roped cond keys on every forward: the form for FP8 KV sets (dequantised on load) and, through
`HostKVCache`, for host-resident ones. `liveavatar.runtime.caches.joined.JoinedKVCache` is the device form
without the concatenation.

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
        self.write_index: torch.Tensor | None = None  # ring positions of the reserved block, on the device
        self._offsets: torch.Tensor | None = None
        self.reset()

    capacity = property(lambda self: self.storage.tokens)
    nbytes = property(lambda self: self.storage.nbytes)

    def reset(self) -> None:
        """Forget every block (a new video starts); the memory is reused."""
        self.origin: int | None = None  # absolute index of the first token written since the reset
        self.end = 0  # absolute token index just past the furthest token written so far
        self.length = 0  # valid entries (the ring's first ``length`` positions), what the attention reads

    def place(self, start_token: int, tokens: int) -> int:
        """Account a block of ``tokens`` tokens from absolute token ``start_token``; returns its ring
        position. Blocks follow each other from the first one written: one that starts before it or past
        the end (leaving unwritten tokens inside the window) is refused."""
        check_block(tokens, self.capacity, start_token)
        if self.origin is None:
            self.origin = self.end = start_token
        elif not self.origin <= start_token <= self.end:
            raise ValueError(f"a block at token {start_token} does not follow the KV cache's blocks "
                             f"(tokens {self.origin}..{self.end} written); reset the cache for a new video")
        self.end = max(self.end, start_token + tokens)
        self.length = min(self.end - self.origin, self.capacity)
        return (start_token - self.origin) % self.capacity

    def reserve(self, start_token: int, tokens: int) -> None:
        """Announce a block of ``tokens`` tokens starting at absolute token ``start_token``."""
        position = self.place(start_token, tokens)
        if self.write_index is None or self.write_index.numel() != tokens:
            device = self.storage.tensors[0].device
            self._offsets = torch.arange(tokens, device=device)
            self.write_index = torch.empty(tokens, dtype=torch.long, device=device)
        torch.add(self._offsets, position, out=self.write_index).remainder_(self.capacity)

    def sync_cond(self, cond: "CondCache", motion_rotation: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Nothing to do: this cache reads the cond cache's rows on every forward."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the reserved block's roped keys and values [1, tokens, heads, head_dim] at its ring position."""
        self.storage.store_at(layer, self.write_index, k[0], v[0])

    def attention_inputs(self, layer: int, k: torch.Tensor, v: torch.Tensor, cond: "CondCache",
                         cond_rotation: tuple[torch.Tensor, torch.Tensor], rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's roped k, v [1, tokens, heads, head_dim]; return the self-attention's keys and
        values: the cond rows (keys roped by ``cond_rotation`` with ``rope``), then the window. The reference
        puts the cond rows last; softmax does not depend on the order, and this is the order of a
        `JoinedKVCache` whose ring follows its cond rows."""
        self.write(layer, k, v)
        window_k, window_v = self.window(layer)
        cond_k, cond_v = cond.entries(layer)
        return (torch.cat([rope(cond_k, *cond_rotation), window_k], dim=1),
                torch.cat([cond_v, window_v], dim=1))

    def ring_entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ring position's stored keys and values [capacity, heads, head_dim], in ring order."""
        return tuple(self.storage.part(layer, 0, self.capacity)[:2])

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
        self.version = 0  # bumped by every prefill: caches holding copies of the rows refresh them
        self.reset()

    capacity = property(lambda self: self.storage.tokens)
    nbytes = property(lambda self: self.storage.nbytes)
    address = property(lambda self: self.storage.tensors[0].data_ptr(), doc="Where its rows are (a graph's key).")

    def reset(self) -> None:
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.ref_tokens = 0
        self.latent_hw: tuple[int, int] | None = None

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        """Start a prefill of ``len(positions)`` condition tokens (replacing any earlier one)."""
        self.length = check_cond_capacity(positions.shape[0], self.capacity, latent_hw)
        self.positions, self.ref_tokens, self.latent_hw = positions, ref_tokens, latent_hw
        self.version += 1

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, roped_k: torch.Tensor) -> None:
        """Store one layer's un-roped keys and values [1, length, heads, head_dim] (``roped_k``, the keys roped
        at the sink positions, is for a store that keeps roped rows)."""
        self.storage.store(layer, 0, k[0], v[0])

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's un-roped keys and values, [1, length, heads, head_dim]."""
        return self.storage.load(layer, self.length)

    def reference_keys(self, layer: int) -> torch.Tensor:
        """This layer's un-roped keys of the reference frame's tokens, [1, ref_tokens, heads, head_dim]."""
        return self.entries(layer)[0][:, :self.ref_tokens]
