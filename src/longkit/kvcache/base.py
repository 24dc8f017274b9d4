"""KV-cache methods: a method provides the cache object of a generation and/or hooks that compress it.

Methods register under kind ``kv``. The seam asks the last method that returns one for a fresh cache
(:meth:`KVMethod.make_cache`); :func:`cache_nbytes` reports the exact bytes a cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.methods import Method, Undo


@dataclass
class KVMethod(Method):
    """Base of KV-cache methods: override :meth:`make_cache` and/or :meth:`apply` (forward hooks)."""

    def apply(self, model: Any) -> Undo:
        return lambda: None


def cache_nbytes(cache: Any) -> int:
    """Exact bytes of the tensors a cache holds (a cache may define ``nbytes()`` for packed storage)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
