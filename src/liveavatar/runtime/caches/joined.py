"""A device KV set whose self-attention reads its keys and values as views of one buffer per layer.

The reference (``liveavatar/models/wan/causal_model_s2v.py``, the streaming self-attention) concatenates
the KV window with the freshly roped cond keys on every forward, and writes a block into its ring per
token. Here each layer's keys and values are one buffer holding the cond rows beside the ring:

    alone:   [ cond rows, right-aligned | ring ]   or   [ ring, filled from its end | cond rows, left-aligned ]
    a pair:  [ ring A, filled from its end | cond rows (shared) | ring B ]

so the attention's keys are one view of the buffer — the cond rows and the valid ring rows next to them —
whatever the window's fill. Softmax attention does not depend on the order of its keys: the reference puts
the cond rows last; ``[cond | ring]`` is the order the concatenating caches (`KVCache`, the host ones) use,
so it gives their sums exactly, and a ring before the cond rows differs from them by float rounding only.
An even denoising step's ring comes before the cond rows, an odd one's after them, paired or alone
(`build_caches`), so a step's keys keep one order whichever steps a pipeline rank holds.

* The cond values and the motion tokens' roped keys are copied in once per sink prefill (`sync_cond`, on
  the host side of a forward, outside any CUDA graph): the motion tokens' RoPE position never changes
  within a prefill. The reference frame's keys are re-roped into their rows on every forward, from the
  cond cache's un-roped keys, because their position rolls with the block (`prepare_block`'s ref_frame).
* A block whose tokens fill a whole slot (the ring holds whole blocks: the clip is a whole number of
  blocks) is written with one slot index (a device tensor, so a CUDA graph replayed for another slot reads
  the slot instead of baking it in) and the rows moved as 8-byte words; other blocks per token.

A copy of the cond rows costs K and V of every layer of the cond tokens (2.0 GiB at 704*384 in bf16) per
pair of sets (and per odd set). `build_caches` gives joined sets a `JoinedCondCache`, which the sink prefill
writes through into the sets' rows and which keeps only the reference frame's un-roped keys (0.4 GiB);
a plain `CondCache` (the fixtures' runner, the tests) is copied from by `sync_cond` instead.
`liveavatar.runtime.planner.memory` counts both.
"""
from __future__ import annotations

from typing import Sequence

import torch

from liveavatar.models.rope import apply_rotation
from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.storage import KVStorage


class JoinedKVCache(KVCache):
    """A `KVCache` in the run dtype on the device, holding the cond rows beside its ring: alone (the
    constructor: ``[cond | ring]``, or with ``ring_first`` ``[ring | cond]``) or sharing one copy of the
    rows with another set (`pair`)."""

    def __init__(self, *, num_layers: int, capacity: int, cond_capacity: int, num_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 ring_first: bool = False, _storage: KVStorage | None = None):
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity} tokens")
        self.shared = _storage is not None
        self.storage = _storage or KVStorage(num_layers, cond_capacity + capacity, num_heads, head_dim, dtype=dtype,
                                             fp8=False, device=device)
        # [cond | ring], or with ring_first [ring, filled from its end | cond]; a pair: [ring | cond | ring].
        self.reversed = ring_first
        self.cond_start = capacity if ring_first or self.shared else 0
        self.ring_start = 0 if ring_first else self.cond_start + cond_capacity
        self._capacity, self.cond_capacity = capacity, cond_capacity
        row_bytes = num_heads * head_dim * dtype.itemsize
        self._word = torch.int64 if row_bytes % 8 == 0 else dtype  # what a write moves per element
        self.write_index: torch.Tensor | None = None  # slots (or tokens) of the reserved block, on the device
        self._offsets: torch.Tensor | None = None
        self.slot_tokens = 1
        self.synced: dict = {}  # "source": (cond cache, its version) whose rows the buffer holds; a pair shares it
        self.reset()

    @classmethod
    def pair(cls, *, num_layers: int, capacity: int, cond_capacity: int, num_heads: int, head_dim: int,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
             ) -> tuple["JoinedKVCache", "JoinedKVCache"]:
        """Two KV sets sharing one copy of the cond rows: ``[ring A | cond | ring B]``, A's ring filled from
        its end (its first block next to the cond rows), B's from its start, so each set's keys stay one
        view. The shared rows hold what both need (the same cond values and motion keys); the reference
        frame's keys are re-roped by each forward before it attends."""
        storage = KVStorage(num_layers, 2 * capacity + cond_capacity, num_heads, head_dim, dtype=dtype, fp8=False,
                            device=device)
        dims = dict(num_layers=num_layers, capacity=capacity, cond_capacity=cond_capacity, num_heads=num_heads,
                    head_dim=head_dim, dtype=dtype, _storage=storage)
        first, second = cls(**dims, ring_first=True), cls(**dims, ring_first=False)
        second.synced = first.synced  # one copy of the rows: synced once per prefill
        return first, second

    capacity = property(lambda self: self._capacity)

    def reset(self) -> None:
        super().reset()
        self.synced.clear()
        self.mode: int | None = None  # slot size of this video's writes (a reversed ring keeps one)

    def reserve(self, start_token: int, tokens: int) -> None:
        position = self.place(start_token, tokens)
        slot = tokens if self.capacity % tokens == 0 and position % tokens == 0 else 1
        if self.reversed and self.mode not in (None, slot):
            # Slot writes keep a block's token order inside its reversed slot, per-token writes reverse it:
            # mixing them would overwrite the wrong tokens of a block.
            raise ValueError(f"a block of {tokens} tokens at ring position {position} breaks this KV set's "
                             f"{self.mode}-token slots; blocks of one size, aligned to the ring, are needed")
        self.mode = slot
        count, slots = tokens // slot, self.capacity // slot
        if self.write_index is None or (self.write_index.numel(), self.slot_tokens) != (count, slot):
            device = self.storage.tensors[0].device
            self._offsets = torch.arange(count, device=device)
            self.write_index = torch.empty(count, dtype=torch.long, device=device)
            self.slot_tokens = slot
        torch.add(self._offsets, position // slot, out=self.write_index).remainder_(slots)
        if self.reversed:  # ring position 0 is the row next to the cond rows
            self.write_index.neg_().add_(slots - 1)

    def _cond_rows(self, cond: CondCache) -> int:
        """First row of the cond rows: right-aligned before a forward ring, left-aligned after a reversed one
        (a shared copy must be exactly full)."""
        if cond.length > self.cond_capacity or (self.shared and cond.length != self.cond_capacity):
            raise ValueError(f"{cond.length} condition tokens do not fit a KV set sized for {self.cond_capacity}; "
                             f"size it with ClipGeometry(...).cond_tokens")
        return self.cond_start + (0 if self.reversed else self.cond_capacity - cond.length)

    def sync_cond(self, cond: CondCache, motion_rotation: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy a new prefill's cond values and roped motion keys into every layer's buffer, once per
        prefill (a `JoinedCondCache` has written them during the prefill already)."""
        if self.synced.get("source") == (cond, cond.version):
            return
        for layer in range(self.storage.tensors[0].shape[0]):
            cond_k, cond_v = cond.entries(layer)
            self.store_cond_rows(layer, cond, apply_rotation(cond_k[0, cond.ref_tokens:], *motion_rotation), cond_v[0])

    def store_cond_rows(self, layer: int, cond: CondCache, motion_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one layer's roped motion keys and cond values [tokens, heads, head_dim] of ``cond``'s prefill
        (the reference frame's keys are roped per forward)."""
        first = self._cond_rows(cond)
        self.storage.tensors[1][layer, first:first + cond.length].copy_(values)
        self.storage.tensors[0][layer, first + cond.ref_tokens:first + cond.length].copy_(motion_keys)
        self.synced["source"] = (cond, cond.version)

    def _ring(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        return tensor[layer, self.ring_start:self.ring_start + self.capacity]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.slot_tokens
        for buffer, new in zip(self.storage.tensors, (k, v)):
            ring = self._ring(buffer, layer).view(self.capacity // slot, -1).view(self._word)
            rows = new[0].to(buffer.dtype).reshape(-1, slot * new[0][0].numel())
            ring.index_copy_(0, self.write_index, rows.view(self._word))

    def attention_inputs(self, layer: int, k: torch.Tensor, v: torch.Tensor, cond: CondCache,
                         cond_rotation: tuple[torch.Tensor, torch.Tensor], rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the block's roped k, v [1, tokens, heads, head_dim] and re-rope the reference frame's keys
        into their rows; return the views of the buffer the attention reads (the cond rows and the window)."""
        self.write(layer, k, v)
        keys, values = self.storage.tensors[0][layer], self.storage.tensors[1][layer]
        first, ref = self._cond_rows(cond), cond.ref_tokens
        cos, sin = cond_rotation
        keys[first:first + ref].copy_(rope(cond.reference_keys(layer), cos[:ref], sin[:ref])[0])
        if self.reversed:
            start, end = self.cond_start - self.length, first + cond.length
        else:
            start, end = first, self.ring_start + self.length
        return keys[None, start:end], values[None, start:end]

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid ring rows [1, length, heads, head_dim] (in the buffer's order)."""
        start = self.capacity - self.length if self.reversed else 0
        return tuple(self._ring(t, layer)[start:start + self.length].unsqueeze(0) for t in self.storage.tensors[:2])

    def ring_entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        rings = [self._ring(t, layer) for t in self.storage.tensors[:2]]
        if not self.reversed:
            return tuple(rings)
        slot = self.slot_tokens
        return tuple(ring.view(self.capacity // slot, slot, *ring.shape[1:]).flip(0).flatten(0, 1) for ring in rings)


class JoinedCondCache(CondCache):
    """The cond cache of joined KV sets: the sink prefill writes its values and roped motion keys straight
    into the sets' buffers (once per shared buffer) and keeps only the reference frame's un-roped keys,
    which every forward re-ropes (the reference keeps all cond rows un-roped: ``cond_k``/``cond_v``)."""

    def __init__(self, kv_sets: Sequence[JoinedKVCache], *, num_layers: int, capacity: int, ref_capacity: int,
                 num_heads: int, head_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.buffers = list({id(kv.storage): kv for kv in kv_sets}.values())  # a pair's sets share one
        self.ref_keys = torch.zeros(num_layers, ref_capacity, num_heads, head_dim, dtype=dtype, device=device)
        self._capacity = capacity
        self.version = 0
        self.reset()

    capacity = property(lambda self: self._capacity)
    nbytes = property(lambda self: self.ref_keys.nbytes)
    address = property(lambda self: self.ref_keys.data_ptr())

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        if ref_tokens > self.ref_keys.shape[1]:
            raise ValueError(f"{ref_tokens} reference-frame tokens for latent size {latent_hw[0]}x{latent_hw[1]} do "
                             f"not fit a cond cache sized for {self.ref_keys.shape[1]}; size it with ClipGeometry")
        super().begin(positions, ref_tokens, latent_hw)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, roped_k: torch.Tensor) -> None:
        """Keep the reference frame's un-roped keys; store the motion tokens' keys as the prefill roped them
        (their position never changes within a prefill) and the values in the sets' rows."""
        self.ref_keys[layer, :self.ref_tokens].copy_(k[0, :self.ref_tokens])
        for kv in self.buffers:
            kv.store_cond_rows(layer, self, roped_k[0, self.ref_tokens:], v[0])

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("a joined cond cache keeps only the reference frame's keys: its other rows live in the "
                           "KV sets' buffers (reset the caches and prefill again)")

    def reference_keys(self, layer: int) -> torch.Tensor:
        return self.ref_keys[layer:layer + 1, :self.ref_tokens]
