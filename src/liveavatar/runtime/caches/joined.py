"""A device KV set whose self-attention reads its keys and values as views of one buffer per layer.

The reference (``liveavatar/models/wan/causal_model_s2v.py``, the streaming self-attention) concatenates
the KV window with the freshly roped cond keys on every forward, and writes a block into its ring per
token. Here each layer's keys and values are one buffer of ``cond_capacity + capacity`` rows:

    [ unused | cond rows (the sink's ``length``, right-aligned) | ring: block slots ]

so the attention's keys are ``buffer[cond_capacity - cond.length : cond_capacity + self.length]`` — a view,
whatever the window's fill. Softmax attention does not depend on the order of its keys; the reference puts
the cond rows last, this layout first, and the concatenating caches (`KVCache`, the host ones) use this
order too, so every placement of a run sees the same keys in the same order.

* The cond values and the motion tokens' roped keys are copied in once per sink prefill (`sync_cond`, on
  the host side of a forward, outside any CUDA graph): the motion tokens' RoPE position never changes
  within a prefill. The reference frame's keys are re-roped into their rows on every forward, from the
  cond cache's un-roped keys, because their position rolls with the block (`prepare_block`'s ref_frame).
* A block whose tokens fill a whole slot (the ring holds whole blocks: the clip is a whole number of
  blocks) is written with one slot index (a device tensor, so a CUDA graph replayed for another slot reads
  the slot instead of baking it in) and the rows moved as 8-byte words; other blocks per token.

The cond rows cost one copy (K and V, every layer) per KV set on top of the cond cache:
`liveavatar.runtime.planner.memory` counts them.
"""
from __future__ import annotations

import torch

from liveavatar.models.rope import apply_rotation
from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.storage import KVStorage


class JoinedKVCache(KVCache):
    """A `KVCache` in the run dtype on the device, holding a copy of the cond rows in front of its ring."""

    def __init__(self, *, num_layers: int, capacity: int, cond_capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity} tokens")
        self.storage = KVStorage(num_layers, cond_capacity + capacity, num_heads, head_dim, dtype=dtype, fp8=False,
                                 device=device)
        self._capacity, self.cond_capacity = capacity, cond_capacity
        row_bytes = num_heads * head_dim * dtype.itemsize
        self._word = torch.int64 if row_bytes % 8 == 0 else dtype  # what a write moves per element
        self.write_index: torch.Tensor | None = None  # slots (or tokens) of the reserved block, on the device
        self._offsets: torch.Tensor | None = None
        self.slot_tokens = 1
        self.cond_source: tuple | None = None  # (cond cache, its version) whose rows this buffer holds
        self.reset()

    capacity = property(lambda self: self._capacity)

    def reset(self) -> None:
        super().reset()
        self.cond_source = None

    def reserve(self, start_token: int, tokens: int) -> None:
        position = self.place(start_token, tokens)
        slot = tokens if self.capacity % tokens == 0 and position % tokens == 0 else 1
        count = tokens // slot
        if self.write_index is None or (self.write_index.numel(), self.slot_tokens) != (count, slot):
            device = self.storage.tensors[0].device
            self._offsets = torch.arange(count, device=device)
            self.write_index = torch.empty(count, dtype=torch.long, device=device)
            self.slot_tokens = slot
        slots = self.capacity // slot
        torch.add(self._offsets, position // slot, out=self.write_index).remainder_(slots)

    def sync_cond(self, cond: CondCache, motion_rotation: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy a new prefill's cond values and roped motion keys into every layer's buffer (once per
        prefill; the reference frame's keys are roped per forward)."""
        if self.cond_source == (cond, cond.version):
            return
        if cond.length > self.cond_capacity:
            raise ValueError(f"{cond.length} condition tokens do not fit a KV set sized for {self.cond_capacity}; "
                             f"size it with ClipGeometry(...).cond_tokens")
        first, motion = self.cond_capacity - cond.length, self.cond_capacity - cond.length + cond.ref_tokens
        keys, values = self.storage.tensors[:2]
        for layer in range(keys.shape[0]):
            cond_k, cond_v = cond.entries(layer)
            values[layer, first:self.cond_capacity].copy_(cond_v[0])
            keys[layer, motion:self.cond_capacity].copy_(apply_rotation(cond_k[0, cond.ref_tokens:], *motion_rotation))
        self.cond_source = (cond, cond.version)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.slot_tokens
        for buffer, new in zip(self.storage.tensors, (k, v)):
            ring = buffer[layer, self.cond_capacity:].view(self.capacity // slot, -1).view(self._word)
            ring.index_copy_(0, self.write_index, new[0].to(buffer.dtype).reshape(-1, slot * new[0][0].numel()).view(self._word))

    def attention_inputs(self, layer: int, k: torch.Tensor, v: torch.Tensor, cond: CondCache,
                         cond_rotation: tuple[torch.Tensor, torch.Tensor], rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's roped k, v [1, tokens, heads, head_dim] and re-rope the reference frame's keys
        into their rows; return the views of the buffer the attention reads (cond rows, then the window)."""
        self.write(layer, k, v)
        keys, values = self.storage.tensors[0][layer], self.storage.tensors[1][layer]
        first, ref = self.cond_capacity - cond.length, cond.ref_tokens
        cos, sin = cond_rotation
        keys[first:first + ref].copy_(rope(cond.entries(layer)[0][:, :ref], cos[:ref], sin[:ref])[0])
        end = self.cond_capacity + self.length
        return keys[None, first:end], values[None, first:end]

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.cond_capacity
        return tuple(t[layer, start:start + self.length].unsqueeze(0) for t in self.storage.tensors[:2])

    def ring_entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[layer, self.cond_capacity:] for t in self.storage.tensors[:2])
