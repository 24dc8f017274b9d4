"""ReRoPE and Leaky ReRoPE: relative positions clipped (or slowed) beyond a window, with log-n query scaling.

Keys closer than the window w keep their RoPE positions. For farther keys, ReRoPE puts every key at position
0 and the query at w (relative position exactly w); Leaky ReRoPE puts the key at ``j / k`` and the query at
``p / k + w - w / k`` (relative ``w + (d - w) / k``). Queries are scaled by ``max(1, log(p + 1) / log(L))``
(log-n, L the trained length). Both parts run blockwise, merged through their log-sum-exp
(:mod:`longkit.attention.position_remap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.position_remap import RemapAttention, log_n_factors, remapped_attention, remapped_reference
from longkit.errors import MethodError
from longkit.registry import param, register
from longkit.rope.remap import rerope_matrix


def _check(window: int, leak: float | None, trained: int | None) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MethodError(f"rerope attention: parameter 'window' must be an int >= 1 (got {window!r})")
    if leak is not None and not leak > 1:
        raise MethodError(f"rerope attention: parameter 'leak' must be > 1 (got {leak!r})")
    if trained is not None and (isinstance(trained, bool) or not isinstance(trained, int) or trained < 2):
        raise MethodError(f"rerope attention: parameter 'trained' must be an int >= 2 or None (got {trained!r})")


def _factors(T: int, S: int, trained: int | None) -> torch.Tensor | None:
    # (T,) log-n factor of the queries at positions S - T .. S - 1
    return None if trained is None else log_n_factors(torch.arange(S - T, S), trained)


def rerope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    *,
    leak: float | None = None,
    trained: int | None = None,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReRoPE (``leak`` None) or Leaky ReRoPE attention over RoPE-rotated q and k, blockwise, LSE-merged.

    Query i sits at position ``S - T + i`` and key j at position j. Keys at distance < w keep their rotations;
    farther keys are seen at relative position w (ReRoPE) or ``w + (d - w) / k`` (leaky). Memory
    O(T·D + tiles). Based on Su 2023, https://kexue.fm/archives/9708 (``bojone/rerope``).

    Parameters:
        q: (B, H, T, D) rotated at positions S - T .. S - 1. k: (B, H_kv, S, D) rotated at 0 .. S - 1.
        v: (B, H_kv, S, D_v). inv_freq: (rotary_dim / 2,) the model's RoPE inverse frequencies.
        window: int >= 1, w. leak: float > 1 (k) for Leaky ReRoPE, None for ReRoPE.
        trained: int >= 2, the trained length L of log-n scaling, or None for no scaling.
        dense: optional bool (B|1, 1|H, T, S) extra mask, True = visible. scale: score scale (default D ** -0.5).
        block_q, block_k: int >= 16, tile edges.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    _check(window, leak, trained)
    w = window
    if leak is None:
        far_q, far_k = (lambda p: torch.full_like(p, w)), torch.zeros_like
    else:
        far_q, far_k = (lambda p: p / leak + w - w / leak), (lambda j: j / leak)
    return remapped_attention(
        q, k, v, inv_freq, w, far_q, far_k, q_factor=_factors(q.shape[2], k.shape[2], trained), dense=dense,
        scale=scale, block_q=block_q, block_k=block_k,
    )


def rerope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    *,
    leak: float | None = None,
    trained: int | None = None,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (Leaky) ReRoPE from the explicit relative-position matrix of :func:`longkit.rope.relative_positions`
    and dense scores, O(T·S·D) memory (tests only). Same arguments and result as :func:`rerope_attention`."""
    _check(window, leak, trained)
    T, S = q.shape[2], k.shape[2]
    # (T, S) relative positions of the queries at S - T .. S - 1; -1 marks the future
    rel = rerope_matrix(S, window, leak)[S - T :]
    return remapped_reference(q, k, v, inv_freq, rel, q_factor=_factors(T, S, trained), dense=dense, scale=scale)


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

    def attend(self, q, k, v, inv_freq, trained, dense, scale):
        out, _ = rerope_attention(
            q, k, v, inv_freq, self.window, trained=trained if self.log_n else None, dense=dense, scale=scale,
            block_q=self.block_q, block_k=self.block_k,
        )
        return out


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

    def attend(self, q, k, v, inv_freq, trained, dense, scale):
        out, _ = rerope_attention(
            q, k, v, inv_freq, self.window, leak=self.leak, trained=trained if self.log_n else None, dense=dense,
            scale=scale, block_q=self.block_q, block_k=self.block_k,
        )
        return out
