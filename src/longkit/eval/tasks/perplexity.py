"""Perplexity versus context length over a text, by sliding windows; chunked against the cache of a KV method."""

from __future__ import annotations

import time
from typing import Any

import torch

from longkit.errors import EvalError
from longkit.eval.backends.base import NLLRequest
from longkit.eval.haystack import ppl_text
from longkit.eval.prompt import chat_frame, encode
from longkit.eval.tasks.base import Task, TaskContext, register_task

#: Tokens per forward when a KV method's cache is scored (``--ppl-chunk``).
DEFAULT_PPL_CHUNK = 512
#: ``ppl_protocol`` of a record scored by one full forward (no KV method).
FULL = "full"


@register_task
class Perplexity(Task):
    """Perplexity at context length L by sliding windows (the convention of Position Interpolation / YaRN).

    Sample s is the window of L tokens starting at token s*L/2 of the text (BOS first when the tokenizer
    adds one). Only the last L/2 tokens of each window are scored, so every scored token sees between L/2
    and L-1 tokens of context. Reported per length: PPL = exp(sum NLL / number of scored tokens), pooled
    over all windows (token-weighted). Text: Python's documentation topics by default, or ``--ppl-text FILE``.
    Based on Chen et al. 2023 (https://arxiv.org/abs/2306.15595) and Peng et al. 2023 (YaRN).

    Protocols (the record's ``ppl_protocol``). Without a KV method: ``full``, one forward over the window. With a
    KV method that provides its own cache (eviction, merging, quantisation): ``chunked:C``, the window is fed
    teacher-forced ``C`` tokens at a time into that cache, so every chunk attends to the cache as the method left
    it after the chunks before (a single forward would never see a compressed cache: the methods compress after
    attention). ``C = 1`` is token-by-token decoding, the streaming protocol of StreamingLLM / H2O.
    Based on Xiao et al. 2024, StreamingLLM (https://arxiv.org/abs/2309.17453) and Zhang et al. 2023, H2O
    (https://arxiv.org/abs/2306.14048).
    """

    name = "perplexity"
    # A text window has no question: retrieval has nothing to query with.
    has_question = False
    scored = False
    uses_depth = False

    def window(self, ctx: TaskContext, length: int, sample: int) -> tuple[list[int], int]:
        """(input ids of the window, index of the first scored target token)."""
        ids = ctx.cache.get("ppl_ids")
        if ids is None:
            ids = ctx.cache["ppl_ids"] = encode(ctx.tokenizer, ppl_text(ctx.ppl_text or None))
        head, _ = chat_frame(ctx.tokenizer, chat=False)
        body = length - len(head)
        stride = body // 2
        start = sample * stride
        if start + body > len(ids):
            raise EvalError(
                f"the perplexity text has {len(ids)} tokens; window {sample} at length {length} needs "
                f"{start + body}; use fewer samples, a shorter length or a longer --ppl-text"
            )
        return head + ids[start : start + body], len(head) + body - stride

    def preflight(self, ctx: TaskContext, lengths: list[int], depths: list[float], samples: int) -> None:
        """The text is read and long enough for the last window at the longest length (windows only grow)."""
        self.window(ctx, max(lengths), samples - 1)

    def request(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> tuple[NLLRequest, int]:
        ids, first_target = self.window(ctx, length, sample)
        return NLLRequest(ids, first_target, self.name), len(ids)

    def fields(self, n_tokens: int, result: dict[str, Any]) -> dict[str, Any]:
        return {"n_tokens": n_tokens, "score": None, "decode_s": 0.0, "new_tokens": 0, **result}

    @staticmethod
    def nll(
        model: Any, ids: list[int], first_target: int, applied: Any = None, chunk: int = DEFAULT_PPL_CHUNK
    ) -> dict[str, Any]:
        """The record fields of one window: ``nll_sum``, ``n_targets``, ``prefill_s``, ``peak_mem_bytes``,
        ``kv_bytes``, ``kv_kept`` and ``ppl_protocol`` (see the class docstring for the protocols).

        ``applied`` is the :class:`~longkit.seam.Applied` combination on ``model`` (None = the bare model);
        ``chunk`` (tokens per forward under a KV method) must be in [1, len(ids) - 1].
        """
        cache = kv_cache(applied)
        if cache is None:
            from longkit.runtime.generate import window_nll

            nll, n_targets, seconds, peak = window_nll(model, ids, first_target)
            return {
                "nll_sum": nll,
                "n_targets": n_targets,
                "prefill_s": seconds,
                "peak_mem_bytes": peak,
                "kv_bytes": 0,
                "kv_kept": None,
                "ppl_protocol": FULL,
            }
        check_chunk(chunk, len(ids))
        method = getattr(cache, "method", None)
        if chunk == 1 and getattr(method, "decode_every", None) == 0:
            # Token by token every forward is a decoding step, which such a method never compresses: the number
            # would be the uncompressed model's under the method's name.
            raise EvalError(
                f"parameter 'ppl_chunk' must be >= 2 tokens with kv method '{applied.spec.kv.name}' (got 1): it "
                "compresses only after multi-token forwards (decode_every=0), so token-by-token scoring would never "
                "compress; use ppl_chunk >= 2, or decode_every >= 1 where the method has it"
            )
        return chunked_window_nll(model, ids, first_target, cache, chunk)


def check_chunk(chunk: Any, n_tokens: int | None = None) -> None:
    """``chunk`` must be an int >= 1 and, for a window of ``n_tokens``, split it into at least two forwards."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise EvalError(f"parameter 'ppl_chunk' must be an int >= 1 tokens (got {chunk!r})")
    if n_tokens is not None and chunk >= n_tokens:
        raise EvalError(
            f"parameter 'ppl_chunk' must be in [1, {n_tokens - 1}] tokens for a perplexity window of {n_tokens} "
            f"tokens (got {chunk}): a chunk of the whole window is one forward, which a KV method never compresses"
        )


def kv_cache(applied: Any) -> Any | None:
    """A fresh cache of the applied combination's KV method, or None when one full forward is exact.

    None without a KV method, and when the KV method leaves transformers' plain cache (nothing to compress).
    """
    if applied is None or getattr(applied.spec, "kv", None) is None:
        return None
    from transformers import DynamicCache

    cache = applied.new_cache()
    return None if type(cache) is DynamicCache else cache


def _kept_fraction(cache: Any) -> float | None:
    """Mean over layers, sequences and kv heads of the tokens stored / real tokens seen (evicting caches only)."""
    from longkit.kvcache.cache import CompressedCache

    if not isinstance(cache, CompressedCache) or cache.real_seen is None:
        return None
    seen = float(cache.real_seen.float().mean())
    stored = torch.stack([t.float().mean() for t in cache.stored_tokens()])
    return float(stored.mean()) / seen if seen else None


@torch.inference_mode()
def chunked_window_nll(model: Any, ids: list[int], first_target: int, cache: Any, chunk: int) -> dict[str, Any]:
    """Summed NLL of tokens ``first_target..T-1``, feeding ``ids`` ``chunk`` tokens at a time into ``cache``.

    Each forward appends its chunk to the cache (the KV method compresses it as it dictates, through its hooks),
    and the chunk's own hidden states give the NLL of the tokens they predict: teacher forcing, the method's cache
    as the only memory of earlier chunks. The LM head runs only on the positions whose next token is scored.
    """
    from longkit.kvcache import cache_nbytes
    from longkit.runtime.generate import PeakMemory, _sync

    device = next(model.parameters()).device
    T = len(ids)
    # (1, T)
    tokens = torch.tensor([ids], device=device)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = 0.0
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for start in range(0, T, chunk):
            end = min(start + chunk, T)
            out = decoder(input_ids=tokens[:, start:end], cache=cache, use_cache=True)
            cache = out.cache
            # position p predicts token p+1; the scored targets first_target..T-1 come from positions
            # first_target-1..T-2, of which this chunk holds lo..hi-1
            lo, hi = max(start, first_target - 1), min(end, T - 1)
            if lo >= hi:
                continue
            # (hi - lo, V)
            logits = head(out.last_hidden_state[0, lo - start : hi - start]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            total += float(torch.nn.functional.cross_entropy(logits, tokens[0, lo + 1 : hi + 1], reduction="sum"))
        _sync(device)
        seconds = time.perf_counter() - t0
    return {
        "nll_sum": total,
        "n_targets": T - first_target,
        "prefill_s": seconds,
        "peak_mem_bytes": mem.peak_bytes,
        "kv_bytes": cache_nbytes(cache),
        "kv_kept": _kept_fraction(cache),
        "ppl_protocol": f"chunked:{chunk}",
    }
