"""KV-cache room: eviction, merging and quantisation methods, registered under kind ``kv``.

API in one screen (details in :mod:`longkit.kvcache.base`, :mod:`~longkit.kvcache.storage`,
:mod:`~longkit.kvcache.cache` and :mod:`~longkit.kvcache.hook`)::

    with longkit.apply(model, kv="snapkv:ratio=0.25") as applied:       # installs the attention hook
        cache = applied.new_cache()                                     # a CompressedCache (real, ragged memory)
        model.generate(ids, cache=cache, max_new_tokens=32)             # compressed after the prompt
        cache_nbytes(cache)                                             # exact bytes held

    ctx = longkit.runtime.compress_context(model, context_ids, "knorm:ratio=0.25")   # compress once ...
    with longkit.apply(model, kv=ctx.method):                          # ... then ask many questions
        model.generate(full_ids, cache=ctx.copy())                      #     (full_ids = context + question)

An eviction method is a :class:`CompressionMethod`: ``score(ctx) -> (B, H_kv, S)`` from a :class:`ScoreContext`
(+inf = always keep), a budget (``ratio`` / ``tokens`` / ``threshold``, per layer or per head: ``adakv`` wraps any
scorer), and ``decode_every`` for periodic eviction while decoding.
"""

from longkit.kvcache import (  # noqa: F401  (registration)
    adakv,
    cam,
    duo_attention,
    expected_attention,
    h2o,
    knorm,
    pyramidkv,
    random,
    scissorhands,
    snapkv,
    streaming_llm,
    tova,
)
from longkit.kvcache.base import CompressionMethod, Decision, KVMethod, ScoreContext, cache_nbytes
from longkit.kvcache.cache import CompressedCache
from longkit.kvcache.kivi import KIVI, KIVICache
from longkit.kvcache.storage import RaggedLayer

__all__ = [
    "CompressedCache",
    "CompressionMethod",
    "Decision",
    "KIVI",
    "KIVICache",
    "KVMethod",
    "RaggedLayer",
    "ScoreContext",
    "cache_nbytes",
]
