"""KV-cache room: eviction, merging and quantisation methods, registered under kind ``kv``."""

from longkit.kvcache.base import KVMethod, cache_nbytes

__all__ = ["KVMethod", "cache_nbytes"]
