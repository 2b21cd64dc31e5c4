"""The DiT's attention caches: storage variants, device and host caches, and the factory."""
from liveavatar.runtime.caches.cache_set import CacheSet, build_caches
from liveavatar.runtime.caches.device import CondCache, KVCache
from liveavatar.runtime.caches.host import CacheStreamer, HostCondCache, HostKVCache

__all__ = ["CacheSet", "build_caches", "CondCache", "KVCache", "CacheStreamer", "HostCondCache", "HostKVCache"]
