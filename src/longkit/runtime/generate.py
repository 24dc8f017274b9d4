"""Greedy generation and windowed NLL, with the cost of each call measured (time, memory, KV bytes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from longkit.kvcache import cache_nbytes
from longkit.runtime.chunked_prefill import chunked_prefill


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere): hands the heap's free pages back to the system."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def settle_memory() -> None:
    """Return the heap's free pages to the system before a measurement, so that the resident set at entry is what is
    live. Without it a request reuses the pages the previous one freed (glibc keeps them resident below any allocation
    that outlived it) and its peak reads ~0 above its entry level: the memory grid recorded 0-250 MiB for InfLLM
    samples after the first, which peaked at 840 MiB. ``malloc_trim`` costs under 1 ms; a full garbage collection
    (~150 ms with transformers loaded) is not run: longkit's generation paths leave no reference cycles behind (a
    collection after them finds nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the resident set sampled every 5 ms on CPU.

    Entry returns the heap's free pages first (:func:`settle_memory`) so the level at entry is live memory only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        settle_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_bytes = self._peak - self._base


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    kv_bytes: int
    peak_mem_bytes: int | None
    #: Bytes the cache keeps on the compute device after the prefill, where it says (InfLLM: initial and recent
    #: tokens, not its offloaded blocks); None for a cache that keeps everything there (then ``kv_bytes``).
    working_set_bytes: int | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(
    model: Any, input_ids: list[int], max_new_tokens: int, cache: Any, eos_ids: set[int], prefill_chunk: int | None = None,
    last_token_alone: bool = False,
) -> Generation:
    """Prefill ``input_ids`` into ``cache`` (in chunks of ``prefill_chunk`` tokens if set), then greedy-decode.

    ``last_token_alone``: prefill all but the last prompt token, then run that token in a forward of its own (the
    method's :attr:`~longkit.methods.Method.prefill_last_token_alone`); counted in the prefill time."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    tokens: list[int] = []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        if last_token_alone and ids.shape[1] > 1:
            out = chunked_prefill(model, ids[:, :-1], cache, prefill_chunk)
            out = model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True, logits_to_keep=1)
        else:
            out = chunked_prefill(model, ids, cache, prefill_chunk)
        # With cache=None the model made its own; keep whichever cache it filled.
        cache = out.cache
        _sync(device)
        t1 = time.perf_counter()
        kv_bytes = cache_nbytes(cache)
        working = getattr(cache, "working_set_nbytes", None)
        working_set = working() if callable(working) else None
        for _ in range(max_new_tokens):
            # (B=1, 1, V) -> next token id
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            if nxt in eos_ids or len(tokens) == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        _sync(device)
        t2 = time.perf_counter()
    return Generation(tokens, t1 - t0, t2 - t1, kv_bytes, mem.peak_bytes, working_set)


@torch.inference_mode()
def window_nll(model: Any, input_ids: list[int], first_target: int, chunk: int = 1024) -> tuple[float, int, float, int | None]:
    """Summed NLL of tokens ``first_target..T-1`` given their left context: (nll_sum, n_targets, seconds, peak).

    The LM head runs over ``chunk`` positions at a time, so (T, vocab) logits are never held at once.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        # (1, T, hidden): the decoder's final (normed) hidden states
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        total = 0.0
        # position t predicts token t+1; targets first_target..T-1 come from positions first_target-1..T-2
        for s in range(first_target - 1, len(input_ids) - 1, chunk):
            e = min(s + chunk, len(input_ids) - 1)
            logits = head(hidden[:, s:e]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, s + 1 : e + 1], reduction="sum"))
        _sync(device)
        seconds = time.perf_counter() - t0
    return total, len(input_ids) - first_target, seconds, mem.peak_bytes
