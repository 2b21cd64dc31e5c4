"""The DiT's attention caches: storage variants, device caches (concatenating or joined with the cond rows),
host caches, and the factory."""
from liveavatar.runtime.caches.cache_set import CacheSet, build_caches
from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.host import CacheStreamer, HostCondCache, HostKVCache
from liveavatar.runtime.caches.joined import JoinedCondCache, JoinedKVCache

__all__ = ["CacheSet", "build_caches", "CondCache", "KVCache", "JoinedCondCache", "JoinedKVCache", "CacheStreamer", "HostCondCache", "HostKVCache"]
