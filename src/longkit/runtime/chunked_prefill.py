"""Chunked prefill: feed a long prompt through the model N tokens at a time into the KV cache.

Activations (attention scores, MLP intermediates) then scale with the chunk, not the prompt; the KV cache
still grows with the prompt unless a KV-cache method bounds it between chunks (its hooks see every chunk).
"""

from __future__ import annotations

from typing import Any

import torch

from longkit.errors import MethodError


def chunked_prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    chunk_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
) -> Any:
    """Prefill ``input_ids`` (B, T) into ``cache`` in chunks of ``chunk_size`` tokens; return the last output.

    The last chunk's output carries the logits of its last ``logits_to_keep`` positions and the filled cache
    (``out.cache``). With ``chunk_size=None`` (or >= T) this is one ordinary forward. Logits equal one full
    forward up to float rounding, except for methods that depend on the current length by design
    (dynamic NTK recomputes its base from the longest position seen so far).
    Based on Agrawal et al. 2023, SARATHI: chunked prefills (https://arxiv.org/abs/2308.16369).

    Parameters
    ----------
    chunk_size: tokens per forward, >= 1, or None for a single forward.
    attention_mask: (B, T) padding mask (1 = token), or None.
    logits_to_keep: positions of the last chunk whose logits are computed (0 = all of them).
    """
    if input_ids.dim() != 2:
        raise MethodError(f"parameter 'input_ids' must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise MethodError(f"parameter 'chunk_size' must be an int >= 1 or None (got {chunk_size!r})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise MethodError(
            f"parameter 'attention_mask' must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    step = T if chunk_size is None else min(chunk_size, T)
    out = None
    for start in range(0, T, step):
        end = min(start + step, T)
        # The model needs the mask of everything cached so far plus this chunk.
        mask = None if attention_mask is None else attention_mask[:, :end]
        out = model(
            input_ids=input_ids[:, start:end],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep if end == T else 1,
        )
        cache = out.cache
    return out
