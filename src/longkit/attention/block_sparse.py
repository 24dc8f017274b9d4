"""MInference block-sparse: top-k key blocks per query block, chosen from mean-pooled queries and keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.attention.base import check_qkv
from longkit.attention.naive import masked_reference
from longkit.attention.sparse import (
    SparseAttention,
    block_means,
    blocks_from_flags,
    check_sparse,
    expand_blocks,
    gathered_attention,
    mask_from_blocks,
)
from longkit.registry import param, register


def block_sparse_select(q: torch.Tensor, k: torch.Tensor, top_k: int, block_size: int) -> torch.Tensor:
    """Which key blocks each query block attends: bool (B, H, ceil(T / block_size), ceil(S / block_size)).

    Query and key blocks are mean-pooled; the pooled scores rank the causally reachable key blocks and the
    ``top_k`` best are kept. The blocks holding the tile's own positions are always kept (they count towards
    ``top_k``), so every query sees at least itself.
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, k)
    nq, nk = -(-T // block_size), -(-S // block_size)
    # (B, H_kv, group · nq, D) pooled queries against (B, H_kv, nk, D) pooled keys: GQA without repeating K
    qp = block_means(q, block_size).reshape(B, H_kv, -1, D)
    scores = torch.matmul(qp, block_means(k, block_size).transpose(-1, -2)).view(B, H, nq, nk)
    # (nq, 1) first and last position of each query block; (1, nk) block ids
    first = (torch.arange(nq, device=q.device) * block_size + (S - T))[:, None]
    last = torch.clamp(first + block_size - 1, max=S - 1)
    blk = torch.arange(nk, device=q.device)[None, :]
    own = (blk >= first // block_size) & (blk <= last // block_size)
    reachable = blk * block_size <= last
    scores = scores.masked_fill(own, float("inf")).masked_fill(~reachable, float("-inf"))
    top = scores.topk(min(top_k, nk), dim=-1)
    selected = torch.zeros(B, H, nq, nk, dtype=torch.bool, device=q.device)
    return selected.scatter_(-1, top.indices, top.values > float("-inf"))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    block_size: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    reference: bool = False,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over the selected (query block, key block) tiles.

    Fast path: per query block the selected key blocks are gathered and attended together (O(T · top_k ·
    block_size)); ``reference=True`` expands the selection to a (T, S) mask for the reference attention.
    Based on https://arxiv.org/abs/2407.02490 (MInference, block-sparse head).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        selected: bool (B, H, ceil(T / block_size), ceil(S / block_size)), e.g. from :func:`block_sparse_select`.
        block_size: int >= 1. dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    _, _, _, T, S, _ = check_sparse(BlockSparse, q, k, v, dense, block_size=block_size)
    if reference:
        visible = mask_from_blocks(selected, T, S, block_size, block_size)
        return masked_reference(q, k, v, visible, dense=dense, scale=scale, block_q=block_size)
    idx = expand_blocks(blocks_from_flags(selected), block_size, S)
    return gathered_attention(q, k, v, idx, block_q=block_size, dense=dense, scale=scale, need_lse=need_lse)


@register("attention", "block_sparse")
@dataclass
class BlockSparse(SparseAttention):
    """MInference block-sparse: each query block attends its top-k key blocks by mean-pooled scores.

    Queries and keys are averaged per block of ``block_size``; the pooled score q̄·k̄ ranks the causally
    reachable key blocks per head and the ``top_k`` best (the query block's own block always among them) are
    attended exactly. Prefill costs O(T · top_k · block_size); decoding (one query) is dense.
    Based on https://arxiv.org/abs/2407.02490 (Jiang et al. 2024, MInference 1.0).

    Parameters:
        block_size: int >= 16, block edge of queries and keys (default 64, as MInference).
        top_k: int >= 1, key blocks per query block, including its own (default 100).
        skip_layers, skip_last: int >= 0, leading / trailing layers kept dense (default 0, 0).
    """

    paper = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
        "(Jiang et al. 2024) https://arxiv.org/abs/2407.02490"
    )
    block_size: int = param(64, ge=16, help="block edge of queries and keys")
    top_k: int = param(100, ge=1, help="key blocks per query block, its own included")

    def attend(self, module, q, k, v, dense, scale):
        selected = block_sparse_select(q, k, self.top_k, self.block_size)
        out, _ = block_sparse_attention(q, k, v, selected, self.block_size, dense=dense, scale=scale, need_lse=False)
        return out
