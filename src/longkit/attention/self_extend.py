"""Self-Extend: grouped positions beyond a neighbour window, with the model's own RoPE, blockwise.

Keys closer than the window W keep their RoPE positions (the neighbour part). For farther keys the query is
re-rotated to ``p // G + W - W // G`` and the key to ``j // G`` (the grouped part). Both parts run blockwise
and are merged through their log-sum-exp (:mod:`longkit.attention.position_remap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.position_remap import RemapAttention, remapped_attention, remapped_reference
from longkit.errors import MethodError
from longkit.registry import param, register
from longkit.rope.remap import self_extend_matrix


def _check(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MethodError(f"self_extend attention: parameter '{name}' must be an int >= {lo} (got {value!r})")
    return value


def self_extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    group_size: int,
    window: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Extend attention over RoPE-rotated q and k, blockwise: neighbour part + grouped part, LSE-merged.

    Query i sits at position ``S - T + i`` and key j at position j (a cache holds the keys in order).
    Neighbour part: keys at distance < W with their own rotations. Grouped part: keys at distance >= W, query
    re-rotated to ``p // G + W - W // G`` and key to ``j // G``. Memory O(T·D + tiles), never O(T·S).
    Based on https://arxiv.org/abs/2401.01325 (Jin et al. 2024).

    Parameters:
        q: (B, H, T, D) rotated at positions S - T .. S - 1. k: (B, H_kv, S, D) rotated at 0 .. S - 1.
        v: (B, H_kv, S, D_v). inv_freq: (rotary_dim / 2,) the model's RoPE inverse frequencies.
        group_size: int >= 1, G. window: int >= 1, W.
        dense: optional bool (B|1, 1|H, T, S) extra mask (padding), True = visible.
        scale: score scale (default D ** -0.5). block_q, block_k: int >= 16, tile edges.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    G = _check("group_size", group_size, 1)
    W = _check("window", window, 1)
    return remapped_attention(
        q, k, v, inv_freq, W, lambda p: p // G + W - W // G, lambda j: j // G, dense=dense, scale=scale,
        block_q=block_q, block_k=block_k,
    )


def self_extend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    group_size: int,
    window: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Self-Extend from the explicit relative-position matrix of :func:`longkit.rope.relative_positions`
    (``self_extend``) and dense scores, O(T·S·D) memory (tests only). Same arguments and result as
    :func:`self_extend_attention`."""
    G = _check("group_size", group_size, 1)
    W = _check("window", window, 1)
    T, S = q.shape[2], k.shape[2]
    # (T, S) relative positions of the queries at S - T .. S - 1; -1 marks the future
    rel = self_extend_matrix(S, G, W)[S - T :]
    return remapped_reference(q, k, v, inv_freq, rel, dense=dense, scale=scale)


@register("attention", "self_extend")
@dataclass
class SelfExtend(RemapAttention):
    """Self-Extend: exact positions inside a neighbour window, floor-grouped positions beyond it (training-free).

    Keys at distance < W attend with their normal RoPE positions; farther keys with the query at
    ``p // G + W - W // G`` and the key at ``j // G``, so distances stay within about ``W + (T - W) / G``.
    Works with the model's own RoPE (q and k are re-rotated), blockwise with LSE merging, in prefill and in
    cached decoding. Based on https://arxiv.org/abs/2401.01325 (Jin et al. 2024, ``datamllab/LongLM``).

    Parameters:
        group_size: int >= 1, G (default 8, the LongLM code default).
        window: int >= 1, neighbour window W (default 512, the low end of the paper's 512-1536). With an 8K
            trained model the paper's rule ``W + (N - W) / G < (1/2 .. 2/3) L`` then allows N = 29K..40K tokens.
        block_q, block_k: int >= 16, tile edges of the blockwise passes.
    """

    paper = "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning (Jin et al. 2024) https://arxiv.org/abs/2401.01325"
    group_size: int = param(8, ge=1, help="group size G: positions beyond the window are floor(p / G)")
    window: int = param(512, ge=1, help="neighbour window W: keys closer than W keep exact positions")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    def attend(self, q, k, v, inv_freq, trained, dense, scale):
        out, _ = self_extend_attention(
            q, k, v, inv_freq, self.group_size, self.window, dense=dense, scale=scale, block_q=self.block_q,
            block_k=self.block_k,
        )
        return out
