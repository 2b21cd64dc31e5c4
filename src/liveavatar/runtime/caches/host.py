"""KV sets and the cond cache in pinned host memory, reaching the attention through two GPU slots.

`CacheStreamer` owns two device slots. Each layer's window (the entries on the host that the coming block
does not overwrite) is copied into a slot one layer ahead of use on a side CUDA stream; the block's new
K/V are written into the slot (the attention sees them) and copied back to the host asynchronously. The
sink prefill writes the cond cache's K/V straight back to the host. Every copy is ordered by CUDA events:
a slot is refilled only after the work that read it and the copy back from it are done, and compute waits
for the copy that filled its slot. On the CPU the same logic runs with every copy immediate, so the CPU
tests check which layer sits in which slot and which entries are fetched (outputs bit-identical to the
resident caches).

The one ordering assumption: the KV sets are handed to the streamer in the order the denoising steps use
them (set i for step i, then set 0 of the next block), which is how the prefetch after a forward picks the
next set's first layers. A forward out of that order still works; its first layers are fetched on demand.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.storage import KVStorage, ring_spans
from liveavatar.runtime.transfer import Copier, PinnedArena


class HostKVCache(KVCache):
    """A `KVCache` kept in pinned host memory; the attention reads and writes it through the streamer's
    GPU slots."""

    def __init__(self, streamer: "CacheStreamer", *, num_layers: int, capacity: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype, fp8: bool = False):
        self.streamer = streamer
        self.storage = KVStorage(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=fp8,
                                 arena=streamer.arena)
        self.written_back = [None] * num_layers  # per layer: event of the last copy back to the host
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.length_before_block = 0
        self.block: tuple[int, int] | None = None  # (ring position, tokens) of the block in flight
        self.block_tokens = 0

    def reserve(self, start_token: int, tokens: int) -> None:
        self.length_before_block = self.length
        self.block, self.block_tokens = (self.place(start_token, tokens), tokens), tokens
        self.streamer.begin_forward(self)

    def needed(self) -> tuple[int, tuple]:
        """(tokens valid on the host, ring spans the coming block overwrites): what a layer's slot must
        hold before the block writes into it. Before this cache's forward starts, the coming block is
        predicted to follow the last one."""
        if self.block is not None:
            valid, (position, tokens) = self.length_before_block, self.block
        else:
            valid, tokens = self.length, self.block_tokens
            position = 0 if self.origin is None else (self.end - self.origin) % self.capacity
        spans = tuple((p, n) for p, _, n in ring_spans(position, tokens, self.capacity)) if tokens else ()
        return valid, spans

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.streamer.kv_slot(self, layer)
        spans = ring_spans(self.block[0], k.shape[1], self.capacity)
        for position, offset, length in spans:
            slot.store(None, position, k[0, offset:offset + length], v[0, offset:offset + length])
        pairs = [(host, device) for position, _, length in spans
                 for host, device in zip(self.storage.part(layer, position, position + length),
                                         slot.part(None, position, position + length))]
        self.written_back[layer] = self.streamer.write_back(pairs, from_slot=slot)

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streamer.kv_slot(self, layer).load(None, self.length)


class HostCondCache(CondCache):
    """A `CondCache` kept in pinned host memory: the sink prefill writes each layer's K/V straight back
    to the host; streaming calls read them through the streamer's GPU slots."""

    def __init__(self, streamer: "CacheStreamer", *, num_layers: int, capacity: int, num_heads: int,
                 head_dim: int, dtype: torch.dtype):
        self.streamer = streamer
        self.storage = KVStorage(num_layers, capacity, num_heads, head_dim, dtype=dtype, fp8=False,
                                 arena=streamer.arena)
        self.version = 0  # bumped by every prefill; slots holding an older version are refetched
        self.written_back = [None] * num_layers
        self.reset()

    def begin(self, positions: torch.Tensor, ref_tokens: int, latent_hw: tuple[int, int]) -> None:
        super().begin(positions, ref_tokens, latent_hw)
        self.streamer.begin_prefill()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, roped_k: torch.Tensor) -> None:
        pairs = list(zip(self.storage.part(layer, 0, self.length), (k[0], v[0])))
        self.written_back[layer] = self.streamer.write_back(pairs)

    def entries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streamer.cond_slot(layer).load(None, self.length)


class CacheStreamer:
    """Two GPU slots through which host-resident KV sets and the cond cache reach the attention.

    A slot belongs to one (KV set, layer) of a forward and holds that layer's KV window and/or its cond
    entries. Block pre-hooks mark the slot of the layer that just ran free and fill the other one for the
    layer after the running one; at the end of a forward, for the first layers of the next KV set. A
    missing or stale part (after a new sink prefill, or a block that does not follow the previous one) is
    fetched on demand.
    """

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.device = torch.device(device)
        self.copier = Copier(self.device)
        self.arena = PinnedArena(pin=self.copier.cuda)
        self.num_layers = len(model.blocks)
        self.kv_sets: list[HostKVCache] = []  # in step order (the ordering assumption above)
        self.cond: HostCondCache | None = None
        self.slots_kv: list[KVStorage | None] = [None, None]
        self.slots_cond: list[KVStorage | None] = [None, None]
        self.owner: list[tuple | None] = [None, None]  # (KV set or None, layer)
        self.kv_key: list[tuple | None] = [None, None]
        self.cond_key: list[tuple | None] = [None, None]
        self.ready: list[list] = [[], []]
        self.free = [None, None]
        self.back = [None, None]
        self.current: HostKVCache | None = None
        self.streaming = False
        self.active: int | None = None
        self.fetched_bytes = 0
        self.on_demand = 0  # fetches issued at the moment of use (no overlap with compute)
        self._hooks = [block.register_forward_pre_hook(self._enter_hook(i)) for i, block in enumerate(model.blocks)]
        self._hooks.append(model.head.register_forward_pre_hook(self._enter_hook(None)))

    def _enter_hook(self, layer: int | None) -> Callable:
        def hook(module, args):
            self.enter(layer)
        return hook

    def close(self) -> None:
        """Detach from the model (the caches it serves are being replaced)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- the caches it serves

    def add_kv_set(self, cache: HostKVCache) -> None:
        if any((other.storage.fp8, other.storage.dtype) != (cache.storage.fp8, cache.storage.dtype)
               for other in self.kv_sets):
            raise ValueError("all host KV sets of one streamer must share their storage dtype")
        self.kv_sets.append(cache)
        if self.slots_kv[0] is None or self.slots_kv[0].tokens < cache.capacity:
            s = cache.storage
            self.slots_kv = [KVStorage(None, cache.capacity, s.num_heads, s.head_dim, dtype=s.dtype, fp8=s.fp8,
                                       device=self.device) for _ in range(2)]
            self.kv_key = [None, None]

    def set_cond(self, cond: HostCondCache) -> None:
        self.cond = cond
        s = cond.storage
        self.slots_cond = [KVStorage(None, cond.capacity, s.num_heads, s.head_dim, dtype=s.dtype, fp8=False,
                                     device=self.device) for _ in range(2)]
        self.cond_key = [None, None]

    def reset(self) -> None:
        """A new video: every slot's content is stale."""
        self.owner, self.kv_key, self.cond_key = [None, None], [None, None], [None, None]
        self.current, self.streaming, self.active = None, False, None

    # -- forward boundaries

    def begin_forward(self, cache: HostKVCache) -> None:
        if self.current is not None and self.current is not cache:
            self.current.block = None
        self.current, self.streaming = cache, True

    def begin_prefill(self) -> None:
        if self.current is not None:
            self.current.block = None
        self.current, self.streaming = None, False

    # -- hooks: which layer runs

    def enter(self, layer: int | None) -> None:
        if layer == self.active:
            return
        previous, self.active = self.active, layer
        if not self.streaming:
            return
        if previous is not None and (self.current, previous) in self.owner:
            self.free[self.owner.index((self.current, previous))] = self.copier.marker()
        if layer is None:  # the forward is over: prepare the first two layers of the next one
            following = self._next_set(self.current)
            self._assign([(following, 0), (following, min(1, self.num_layers - 1))])
            if self.current is not None:
                # The next forward announces itself with reserve(); a sink prefill (which never
                # reserves, and with the cond cache on the GPU is not announced) must not fetch.
                self.current.block = None
                self.streaming = False
        else:
            self._assign([(self.current, layer), self._next_key(self.current, layer)])

    def _next_set(self, cache: HostKVCache | None) -> HostKVCache | None:
        if cache is None or cache not in self.kv_sets:
            return None
        return self.kv_sets[(self.kv_sets.index(cache) + 1) % len(self.kv_sets)]

    def _next_key(self, cache, layer: int) -> tuple:
        return (cache, layer + 1) if layer + 1 < self.num_layers else (self._next_set(cache), 0)

    # -- slots

    def _assign(self, targets: list[tuple]) -> None:
        for target in targets:
            if target in self.owner:
                continue
            slot = next(s for s in (0, 1) if self.owner[s] not in targets)
            self.owner[slot] = target
            self._fill(slot)

    def _slot(self, cache, layer: int) -> int:
        target = (cache, layer)
        if target not in self.owner:  # on demand: everything queued so far may still read either slot
            prefetched = self._next_key(self.current, layer)
            slot = self.owner.index(None) if None in self.owner else int(self.owner[0] == prefetched)
            self.free[slot] = self.copier.marker()
            self.owner[slot] = target
        slot = self.owner.index(target)
        if self._fill(slot):
            self.on_demand += 1
        for event in self.ready[slot]:
            self.copier.wait(event)
        self.ready[slot] = []
        return slot

    def _fill(self, slot: int) -> bool:
        """Fetch the parts of the slot's (set, layer) it does not hold yet; True if anything was fetched."""
        cache, layer = self.owner[slot]
        pairs, after = [], [self.free[slot], self.back[slot]]
        if cache is not None:
            needed = cache.needed()
            if self.kv_key[slot] != (cache, layer, needed):
                valid, overwritten = needed
                for start, end in _complement(valid, overwritten):
                    pairs += zip(self.slots_kv[slot].part(None, start, end), cache.storage.part(layer, start, end))
                after.append(cache.written_back[layer])
                self.kv_key[slot] = (cache, layer, needed)
        cond = self.cond
        if cond is not None and cond.length and self.cond_key[slot] != (layer, cond.version):
            pairs += zip(self.slots_cond[slot].part(None, 0, cond.length), cond.storage.part(layer, 0, cond.length))
            after.append(cond.written_back[layer])
            self.cond_key[slot] = (layer, cond.version)
        if pairs:
            self.ready[slot].append(self.copier.copy(pairs, after=after))
            self.fetched_bytes += sum(source.nbytes for _, source in pairs)
        return bool(pairs)

    def kv_slot(self, cache: HostKVCache, layer: int) -> KVStorage:
        return self.slots_kv[self._slot(cache, layer)]

    def cond_slot(self, layer: int) -> KVStorage:
        if not self.streaming:  # the first streaming call after a prefill, with the KV sets on the GPU
            self.streaming = True
        return self.slots_cond[self._slot(self.current, layer)]

    def write_back(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], from_slot: KVStorage | None = None):
        """Copy (host destination, device source) pairs back once the compute stream has produced them."""
        event = self.copier.copy(pairs, after=[self.copier.marker()], to_host=True)
        if from_slot is not None:
            self.back[self.slots_kv.index(from_slot)] = event
        return event


def _complement(valid: int, overwritten: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Intervals of [0, valid) outside the (position, length) spans."""
    intervals, start = [], 0
    for position, length in sorted(overwritten):
        if position > start:
            intervals.append((start, min(position, valid)))
        start = max(start, position + length)
    if start < valid:
        intervals.append((start, valid))
    return [(a, b) for a, b in intervals if a < b]
