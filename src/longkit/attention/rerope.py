"""ReRoPE and Leaky ReRoPE: relative positions clipped (or slowed) beyond a window, with log-n query scaling.

Keys closer than the window w keep their RoPE positions. For farther keys, ReRoPE puts every key at position
0 and the query at w (relative position exactly w); Leaky ReRoPE puts the key at ``j / k`` and the query at
``p / k + w - w / k`` (relative ``w + (d - w) / k``). Queries are scaled by ``max(1, log(p + 1) / log(L))``
(log-n, L the trained length). Both parts run blockwise, merged through their log-sum-exp
(:mod:`longkit.attention.position_remap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import check_args
from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.logn import LogN, log_n_factors
from longkit.attention.position_remap import RemapAttention, remapped_attention
from longkit.registry import param, register


def rerope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    *,
    leak: float | None = None,
    trained: int | None = None,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReRoPE (``leak`` None, :class:`ReRoPE`) or Leaky ReRoPE (:class:`LeakyReRoPE`) over RoPE-rotated q and k.

    Keys at distance < w keep their rotations; farther keys are seen at relative position w (ReRoPE) or
    ``w + (d - w) / k`` (leaky). window: int >= 1, w. leak: float > 1 (k) for Leaky ReRoPE, None for ReRoPE.
    trained: int >= 2, the trained length L of log-n scaling, or None for no scaling. The tensors, the keyword
    arguments (dense, scale, block_q, block_k, fused) and the result ``(out, lse)`` are as
    :func:`remapped_attention`'s. Based on Su 2023, https://kexue.fm/archives/9708 (``bojone/rerope``).
    """
    check_args(LeakyReRoPE, "rerope", window=window, **({} if leak is None else {"leak": leak}))
    if trained is not None:
        check_args(LogN, "rerope", trained=trained)
    w = window
    if leak is None:
        far_q, far_k = (lambda p: torch.full_like(p, w)), torch.zeros_like
    else:
        far_q, far_k = (lambda p: p / leak + w - w / leak), (lambda j: j / leak)
    T, S = q.shape[2], k.shape[2]
    # (T,) log-n factor of the queries at positions S - T .. S - 1
    factor = None if trained is None else log_n_factors(torch.arange(S - T, S), trained)
    return remapped_attention(q, k, v, inv_freq, w, far_q, far_k, q_factor=factor, **kw)


@register("attention", "rerope")
@dataclass
class ReRoPE(RemapAttention):
    """ReRoPE: relative positions clipped at a window, ``min(i - j, w)``, with log-n query scaling (training-free).

    Keys at distance < w attend with their normal RoPE positions, farther keys at relative position exactly w
    (query re-rotated to w, key to 0); queries are scaled by ``max(1, log(p + 1) / log(L))``. Blockwise with
    LSE merging, with the model's own RoPE, in prefill and cached decoding. Based on Su 2023, Rectified
    Rotary Position Embeddings, https://kexue.fm/archives/9708 (``bojone/rerope``).

    Parameters:
        window: int >= 1, w (default 512, ``rerope_patch.py``'s value for a 4K model).
        log_n: bool, scale queries by log-n against the model's trained length (default True, as the reference).
        block_q, block_k: int >= 16, tile edges of the blockwise passes.
    """

    paper = "Rectified Rotary Position Embeddings (Su 2023) https://kexue.fm/archives/9708"
    window: int = param(512, ge=1, help="window w: farther keys are seen at relative position w")
    log_n: bool = param(True, help="scale queries by max(1, log(p + 1) / log(trained length))")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    def attend(self, q, k, v, inv_freq, trained, **kw):
        leak, trained = getattr(self, "leak", None), trained if self.log_n else None
        return rerope_attention(q, k, v, inv_freq, self.window, leak=leak, trained=trained, **kw)


@register("attention", "leaky_rerope")
@dataclass
class LeakyReRoPE(RemapAttention):
    """Leaky ReRoPE: exact positions inside a window, slope 1/k beyond it, with log-n query scaling.

    Keys at distance < w keep their RoPE positions; farther keys are seen at ``w + (d - w) / k`` (query at
    ``p / k + w - w / k``, key at ``j / k``); queries are scaled by ``max(1, log(p + 1) / log(L))``.
    Blockwise with LSE merging. Based on Su 2023, https://kexue.fm/archives/9708 (``bojone/rerope``,
    ``leaky_rerope_patch.py``).

    Parameters:
        window: int >= 1, w (default 512).
        leak: float > 1, k (default 16, the reference's ``scaling_factor``).
        log_n: bool, scale queries by log-n against the model's trained length (default True).
        block_q, block_k: int >= 16, tile edges of the blockwise passes.
    """

    paper = "Rectified Rotary Position Embeddings (Su 2023) https://kexue.fm/archives/9708"
    window: int = param(512, ge=1, help="window w: exact positions below it")
    leak: float = param(16.0, gt=1.0, help="slope divisor k beyond the window")
    log_n: bool = param(True, help="scale queries by max(1, log(p + 1) / log(trained length))")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    attend = ReRoPE.attend
