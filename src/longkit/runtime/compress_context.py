"""Query-agnostic use: compress a context once, then ask many questions against copies of the compressed cache."""

from __future__ import annotations

from typing import Any

import torch

from longkit.errors import MethodError
from longkit.kvcache.cache import CompressedCache
from longkit.runtime.chunked_prefill import chunked_prefill
from longkit.seam import apply


@torch.inference_mode()
def compress_context(
    model: Any,
    input_ids: torch.Tensor,
    method: Any,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> Any:
    """Prefill ``input_ids`` (B, T) with ``method`` (a kv method, name or ``"name:key=value"``); return its cache.

    The returned :class:`~longkit.kvcache.cache.CompressedCache` has compression switched off, so questions
    appended to it (under ``longkit.apply(model, kv=cache.method)``, each on ``cache.copy()``) are not compressed.
    Query-aware scorers see the context's own last tokens as their observation window. ``chunk_size`` prefills
    in chunks, compressing between them.
    """


    with apply(model, kv=method) as applied:
        kv = applied.spec.kv
        tokens = getattr(kv, "tokens", None)  # eviction budgets only (KIVI has none of its own)
        if tokens is not None and tokens > input_ids.shape[1]:
            raise MethodError(
                f"kv method '{kv.name}': parameter 'tokens' must be <= the context length {input_ids.shape[1]} "
                f"(got {tokens})"
            )
        cache = applied.new_cache()
        if not isinstance(cache, CompressedCache):
            raise MethodError(f"kv method '{kv.name}' does not provide a compressing cache")
        chunked_prefill(model, input_ids, cache, chunk_size, attention_mask=attention_mask)
    cache.compressing = False
    return cache
