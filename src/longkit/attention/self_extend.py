"""Self-Extend: grouped positions beyond a neighbour window, with the model's own RoPE, blockwise.

Keys closer than the window W keep their RoPE positions (the neighbour part). For farther keys the query is
re-rotated to ``p // G + W - W // G`` and the key to ``j // G`` (the grouped part). Both parts run blockwise
and are merged through their log-sum-exp (:mod:`longkit.attention.position_remap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import check_args
from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.position_remap import RemapAttention, remapped_attention
from longkit.registry import param, register


def self_extend_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, group_size: int, window: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Extend (:class:`SelfExtend`) over RoPE-rotated q and k: neighbour part + grouped part, LSE-merged.

    group_size: int >= 1, G. window: int >= 1, W. The tensors, the keyword arguments (dense, scale, block_q,
    block_k, fused) and the result ``(out (B, H, T, D_v), lse (B, H, T))`` are as :func:`remapped_attention`'s.
    Memory O(T·D + tiles), never O(T·S). Based on https://arxiv.org/abs/2401.01325 (Jin et al. 2024).
    """
    check_args(SelfExtend, group_size=group_size, window=window)
    G, W = group_size, window
    return remapped_attention(q, k, v, inv_freq, W, lambda p: p // G + W - W // G, lambda j: j // G, **kw)


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

    def attend(self, q, k, v, inv_freq, trained, **kw):
        return self_extend_attention(q, k, v, inv_freq, self.group_size, self.window, **kw)
