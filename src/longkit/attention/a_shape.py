"""MInference A-shape: attention sinks plus a local window, a static sparse pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.attention.naive import masked_reference
from longkit.attention.sparse import (
    SparseAttention,
    check_sparse,
    gathered_attention,
    tile_firsts,
)
from longkit.registry import param, register


def a_shape_mask(T: int, S: int, sinks: int, window: int, block_q: int, device=None) -> torch.Tensor:
    """(1, 1, T, S) bool: key j visible to a query whose tile starts at position f when ``j < sinks`` or
    ``j >= f - window`` (with the own tile added by the reference, and causality)."""
    first = tile_firsts(T, S, block_q, device).repeat_interleave(block_q)[:T, None]
    j = torch.arange(S, device=device)[None, :]
    return ((j < sinks) | (j >= first - window))[None, None]


def a_shape_indices(T: int, S: int, sinks: int, window: int, block_q: int, device=None) -> torch.Tensor:
    """(1, 1, ceil(T / block_q), sinks + window) earlier key indices per query tile, -1 = padding.

    A tile sees the sink columns and the ``window`` keys before its first query; sinks inside that range are
    dropped so no key is gathered twice.
    """
    # A window or sink count past S gathers nothing more.
    sinks, window = min(sinks, S), min(window, S)
    # (nq, 1) first position of each tile
    first = tile_firsts(T, S, block_q, device)[:, None]
    span = first - window + torch.arange(window, device=device)[None, :]
    span = torch.where(span >= 0, span, torch.full_like(span, -1))
    sink = torch.arange(sinks, device=device)[None, :].expand(first.shape[0], -1)
    sink = torch.where(sink < first - window, sink, torch.full_like(sink, -1))
    return torch.cat([sink, span], dim=1)[None, None]


def a_shape_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: int = 128,
    window: int = 1024,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 64,
    reference: bool = False,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A-shape sparse attention: each query tile sees the first ``sinks`` keys, the ``window`` keys before the tile
    and its own tile causally (MInference applies the pattern per 64-query block too).

    Fast path: per query tile, the sink columns and the window range are gathered (O(T · (sinks + window)));
    ``reference=True`` builds the (T, S) mask and calls the reference attention instead.
    Based on https://arxiv.org/abs/2407.02490 (MInference, A-shape head).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        sinks: int >= 0. window: int >= 1, keys before the tile. block_q: int >= 1, query rows per tile.
        dense: optional bool (B|1, H|1, T, S) extra mask (padding). scale: default D ** -0.5.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    _, _, _, T, S, _ = check_sparse(AShape, q, k, v, dense, sinks=sinks, window=window, block_q=block_q)
    if reference:
        mask = a_shape_mask(T, S, sinks, window, block_q, q.device)
        return masked_reference(q, k, v, mask, dense=dense, scale=scale, block_q=block_q)
    # One selection for every head: gathered once per key head.
    idx = a_shape_indices(T, S, sinks, window, block_q, q.device)
    return gathered_attention(q, k, v, idx, block_q=block_q, dense=dense, scale=scale, need_lse=need_lse)


@register("attention", "a_shape")
@dataclass
class AShape(SparseAttention):
    """MInference A-shape: every query sees the sink tokens and a local window (static sparse prefill).

    The first ``sinks`` keys, the ``window`` keys before each tile of ``block_q`` queries and the tile itself
    (causally) are attended; everything between is skipped, so prefill costs O(T · (sinks + window + block_q)).
    Decoding (one query) is dense.
    Based on https://arxiv.org/abs/2407.02490 (Jiang et al. 2024, MInference 1.0).

    Parameters:
        sinks: int >= 0, initial keys always visible (default 128).
        window: int >= 1, local keys before each query tile (default 1024).
        block_q: int >= 16, query rows per tile of the gathered fast path (default 64).
        skip_layers, skip_last: int >= 0, leading / trailing layers kept dense (default 0, 0).
    """

    paper = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
        "(Jiang et al. 2024) https://arxiv.org/abs/2407.02490"
    )
    sinks: int = param(128, ge=0, help="initial keys always visible")
    window: int = param(1024, ge=1, help="local keys before each query tile")
    block_q: int = param(64, ge=16, help="query rows per tile")

    def attend(self, module, q, k, v, dense, scale):
        out, _ = a_shape_attention(
            q, k, v, self.sinks, self.window, dense=dense, scale=scale, block_q=self.block_q, need_lse=False
        )
        return out
