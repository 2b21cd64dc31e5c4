"""How a cache holds its keys and values: every storage variant in one class.

K and V [tokens, heads, head_dim] per layer, either in the run dtype or as e4m3 codes with one fp32
inverse scale per token (``fp8``). On the device the layers are one stacked tensor per kind; in host
memory (a `PinnedArena`) one tensor per layer, so no single pinned allocation is huge.

Why one scale per token (over all heads), not per (token, head), per (block, head) or per block: e4m3 is a
floating-point format, so a coarser scale only costs precision for values more than 2^14.8 below the
scale's amax (they fall into the subnormals); the mantissa error (2^-4) dominates otherwise. Measured on
the tiny model's 2-clip TPP loop against the fixtures' float32 results (B_loop_tpp, relative L2 error of
the 32 recorded velocities): per token 6.9e-4, per (token, head) 6.4e-4, per (block, head) 7.4e-4, per
block 7.9e-4. Per (token, head) would cost 40x the scale bytes (1.6 % of the codes at head_dim 128, 0.3 GiB
for four 704*384 KV sets) for 7 % less error; per block needs block-aligned writes, which the ring's
wrapping spans and the host slots' partial windows do not give. One scale per token is 0.04 %.
"""
from __future__ import annotations

import math

import torch

from liveavatar.runtime.fp8 import FP8_DTYPE, dequantize_rows, quantize_rows
from liveavatar.runtime.transfer import PinnedArena


def ring_spans(start: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """(ring position, offset in the block, length) of ``count`` tokens written from absolute ``start``."""
    position = start % capacity
    first = min(count, capacity - position)
    spans = [(position, 0, first)]
    if count > first:
        spans.append((0, first, count - first))
    return spans


class KVStorage:
    """K/V of ``tokens`` tokens (per layer when ``layers`` is given) on ``device`` or in ``arena``."""

    def __init__(self, layers: int | None, tokens: int, num_heads: int, head_dim: int, *, dtype: torch.dtype,
                 fp8: bool, device: torch.device | str | None = None, arena: PinnedArena | None = None):
        if tokens <= 0:
            raise ValueError(f"cache capacity must be positive, got {tokens} tokens")
        self.dtype, self.fp8, self.tokens = dtype, fp8, tokens
        self.num_heads, self.head_dim = num_heads, head_dim

        def zeros(shape, dtype_):
            if arena is None:
                return torch.zeros(shape if layers is None else (layers, *shape), dtype=dtype_, device=device)
            return [arena.zeros(shape, dtype_) for _ in range(layers)]

        self.tensors = [zeros(shape, dtype_) for shape, dtype_ in self.layout(tokens, num_heads, head_dim,
                                                                              dtype=dtype, fp8=fp8)]

    @staticmethod
    def layout(tokens: int, num_heads: int, head_dim: int, *, dtype: torch.dtype,
               fp8: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every stored tensor of one layer: K and V, then (FP8) their scales."""
        codes = ((tokens, num_heads, head_dim), FP8_DTYPE if fp8 else dtype)
        return [codes, codes] + ([((tokens,), torch.float32)] * 2 if fp8 else [])

    @classmethod
    def host_allocations(cls, layers: int, tokens: int, num_heads: int, head_dim: int, *, dtype: torch.dtype,
                         fp8: bool) -> list[int]:
        """Bytes of every tensor a host-memory storage takes from its arena, in the order it takes them."""
        return [math.prod(shape) * dtype_.itemsize
                for shape, dtype_ in cls.layout(tokens, num_heads, head_dim, dtype=dtype, fp8=fp8)
                for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(sum(t.nbytes for t in entry) if isinstance(entry, list) else entry.nbytes
                   for entry in self.tensors)

    def part(self, layer: int | None, start: int, end: int) -> list[torch.Tensor]:
        """Every stored tensor of tokens start:end (of ``layer``; None for a single-layer storage)."""
        return [t[layer][start:end] if layer is not None else t[start:end] for t in self.tensors]

    def _encoded(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        if self.fp8:
            (k_codes, k_scale), (v_codes, v_scale) = quantize_rows(k), quantize_rows(v)
            return [k_codes, v_codes, k_scale, v_scale]
        return [k, v]

    def store(self, layer: int | None, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [tokens, heads, head_dim] at ``position``."""
        for destination, value in zip(self.part(layer, position, position + k.shape[0]), self._encoded(k, v)):
            destination.copy_(value)

    def store_at(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [tokens, heads, head_dim] at the token positions ``index`` (a device tensor, so a
        captured graph reads the positions instead of baking them in)."""
        for destination, value in zip(self.tensors, self._encoded(k, v)):
            if value.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel: move the codes as bytes
                destination, value = destination.view(torch.uint8), value.view(torch.uint8)
            destination[layer].index_copy_(0, index, value)

    def load(self, layer: int | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` tokens as k, v [1, count, heads, head_dim] in the run dtype."""
        parts = self.part(layer, 0, count)
        if self.fp8:
            k, v = dequantize_rows(parts[0], parts[2], self.dtype), dequantize_rows(parts[1], parts[3], self.dtype)
        else:
            k, v = parts
        return k.unsqueeze(0), v.unsqueeze(0)
