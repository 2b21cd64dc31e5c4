"""One factory for every cache a run needs, built from the placement: nothing else decides where a cache
lives or how it stores its entries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from liveavatar.geometry import ClipGeometry
from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.host import CacheStreamer, HostCondCache, HostKVCache
from liveavatar.runtime.caches.joined import JoinedCondCache, JoinedKVCache
from liveavatar.runtime.placement import Placement


@dataclass
class CacheSet:
    """The KV sets (one per denoising step this process runs) and the cond cache for one clip size,
    allocated once and `reset` for every video; ``streamer`` serves the host-resident ones."""

    kv_sets: dict[int, KVCache]
    cond: CondCache
    streamer: CacheStreamer | None
    kv_tokens: int
    cond_tokens: int

    def serves(self, geometry: ClipGeometry, steps: Sequence[int]) -> bool:
        """True if these caches have the sizes a run of ``geometry`` over ``steps`` needs."""
        return (self.kv_tokens, self.cond_tokens, tuple(self.kv_sets)) == \
            (geometry.kv_tokens, geometry.cond_tokens, tuple(steps))

    def reset(self) -> None:
        for cache in self.kv_sets.values():
            cache.reset()
        self.cond.reset()
        if self.streamer is not None:
            self.streamer.reset()

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()

    @property
    def nbytes(self) -> int:
        storages = {id(cache.storage): cache.nbytes for cache in self.kv_sets.values()}  # a pair shares one
        return sum(storages.values()) + self.cond.nbytes


def build_caches(model: nn.Module, placement: Placement, geometry: ClipGeometry, steps: Sequence[int], *,
                 device: torch.device | str, dtype: torch.dtype) -> CacheSet:
    """The caches ``placement`` asks for: KV sets in the run dtype or FP8, on the device or in pinned host
    memory, and the cond cache on the device or the host, for the denoising ``steps`` given in order. With
    both on the device in the run dtype (`Placement.joins_cond`), the KV sets hold copies of the cond rows
    beside their rings, one per pair of consecutive steps, so the attention reads views instead of
    concatenating (`JoinedKVCache`)."""
    c = model.config
    dims = dict(num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.head_dim)
    on_host = "host" in (placement.kv_location, placement.cond_location)
    streamer = CacheStreamer(model, device) if on_host else None
    fp8 = placement.kv_dtype == "fp8"
    steps = list(steps)
    kv_sets = {}
    if placement.joins_cond:
        # Consecutive steps in pairs sharing a copy of the cond rows, a last odd one alone. An even step's
        # ring always comes before the cond rows, an odd step's after them, paired or not: a step's keys
        # are in the same order whichever steps a process (a pipeline rank) holds, so its sums are too.
        joined = dict(capacity=geometry.kv_tokens, cond_capacity=geometry.cond_tokens, device=device, dtype=dtype,
                      **dims)
        for index in range(0, len(steps), 2):
            pair = sorted(steps[index:index + 2], key=lambda step: step % 2)  # the even step first
            made = JoinedKVCache.pair(**joined) if len(pair) == 2 else [JoinedKVCache(**joined,
                                                                                       ring_first=pair[0] % 2 == 0)]
            kv_sets.update(zip(pair, made))
        kv_sets = {step: kv_sets[step] for step in steps}
    for step in steps:
        if placement.kv_location == "host":
            kv_sets[step] = HostKVCache(streamer, capacity=geometry.kv_tokens, dtype=dtype, fp8=fp8, **dims)
            streamer.add_kv_set(kv_sets[step])
        elif not placement.joins_cond:
            kv_sets[step] = KVCache(capacity=geometry.kv_tokens, device=device, dtype=dtype, fp8=fp8, **dims)
    if placement.joins_cond:
        cond = JoinedCondCache(list(kv_sets.values()), capacity=geometry.cond_tokens,
                               ref_capacity=geometry.frame_tokens, device=device, dtype=dtype, **dims)
    elif placement.cond_location == "host":
        cond = HostCondCache(streamer, capacity=geometry.cond_tokens, dtype=dtype, **dims)
        streamer.set_cond(cond)
    else:
        cond = CondCache(capacity=geometry.cond_tokens, device=device, dtype=dtype, **dims)
    return CacheSet(kv_sets, cond, streamer, geometry.kv_tokens, geometry.cond_tokens)
