"""Greedy generation under a parallel-window memory method (PCW, NBCE), with its cost measured.

The method reads the windows and the task tokens (:meth:`~longkit.memory.windows.ParallelWindows.start`, the
prefill) and ranks each next token; the loop picks the arg-max, stops at EOS or ``max_new_tokens``, and feeds the
token back (:meth:`~longkit.memory.windows.ParallelWindows.step`). Cost: prefill and decode seconds, peak memory
above the level at entry, the bytes of every cache after the prefill (PCW: the joint cache; NBCE: one cache per
window plus the context-free prompt's), and the token positions run through the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longkit.kvcache import cache_nbytes
from longkit.memory.windows import ParallelWindows, WindowedPrompt
from longkit.runtime.generate import PeakMemory, _sync


@dataclass
class WindowedGeneration:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    kv_bytes: int
    peak_mem_bytes: int | None
    #: Token positions run through the model (prompt and fed-back tokens, summed over the windows' prompts).
    tokens_processed: int
    #: Context tokens of each window, in document order.
    window_sizes: list[int]


@torch.inference_mode()
def parallel_generate(model: Any, method: ParallelWindows, prompt: WindowedPrompt, max_new_tokens: int,
                      eos_ids: set[int], new_cache: Callable[[], Any]) -> WindowedGeneration:
    """Greedy decoding of ``prompt`` under ``method`` (applied to ``model``); ``new_cache`` makes a fresh KV cache."""
    device = next(model.parameters()).device
    tokens: list[int] = []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        state = method.start(model, prompt, max_new_tokens, new_cache)
        _sync(device)
        t1 = time.perf_counter()
        kv_bytes = sum(cache_nbytes(c) for c in state.caches)
        for _ in range(max_new_tokens):
            nxt = int(state.scores.argmax())
            tokens.append(nxt)
            if nxt in eos_ids or len(tokens) == max_new_tokens:
                break
            method.step(model, state, nxt)
        _sync(device)
        t2 = time.perf_counter()
    return WindowedGeneration(tokens, t1 - t0, t2 - t1, kv_bytes, mem.peak_bytes, state.processed,
                              [e - s for s, e in state.windows])
