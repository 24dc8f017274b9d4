"""MoBA: Mixture of Block Attention: each query attends its top-k key blocks by a gate on block means."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longkit.attention.reference import check_qkv
from longkit.attention.sparse import (
    SparseAttention,
    block_means,
    blocks_from_flags,
    check_dense,
    check_int,
    expand_blocks,
    gathered_attention,
    masked_reference,
    positions,
)
from longkit.registry import param, register


def moba_select(q: torch.Tensor, k: torch.Tensor, top_k: int, block_size: int) -> torch.Tensor:
    """The key blocks each query attends: long (B, H, T, min(top_k, n_blocks)), -1 = none.

    Gate ``s_ij = q_i · mean(K_block j)`` over the complete blocks before the query's own block; the own block
    is always chosen (it counts towards ``top_k``) and later blocks never. Based on ``moba_naive.py`` of
    https://github.com/MoonshotAI/MoBA (gate on block means, current chunk forced, future chunks masked).
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, k)
    nk = -(-S // block_size)
    # (B, H_kv, group · T, D) @ (B, H_kv, D, nk) -> (B, H, T, nk): GQA without repeating K
    gate = torch.matmul(q.float().reshape(B, H_kv, -1, D), block_means(k, block_size).transpose(-1, -2))
    gate = gate.view(B, H, T, nk)
    # (T, 1) own block of each query, (1, nk) block ids
    own = (positions(T, S, q.device) // block_size)[:, None]
    blk = torch.arange(nk, device=q.device)[None, :]
    gate = gate.masked_fill(blk == own, float("inf")).masked_fill(blk > own, float("-inf"))
    top = gate.topk(min(top_k, nk), dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, torch.full_like(top.indices, -1))


def moba_mask(sel: torch.Tensor, S: int, block_size: int) -> torch.Tensor:
    """(B, H, T, S) causal token mask of a per-query block selection (B, H, T, k)."""
    B, H, T, _ = sel.shape
    nk = -(-S // block_size)
    # (B, H, T, nk + 1): the last column collects the -1 padding
    flags = torch.zeros(B, H, T, nk + 1, dtype=torch.bool, device=sel.device)
    flags.scatter_(3, torch.where(sel >= 0, sel, torch.full_like(sel, nk)), True)
    cols = torch.arange(S, device=sel.device) // block_size
    causal = torch.arange(S, device=sel.device)[None, :] <= positions(T, S, sel.device)[:, None]
    return flags[..., cols] & causal


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    block_size: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 64,
    reference: bool = False,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention of each query over its selected key blocks.

    Fast path: per tile of ``block_q`` queries, the union of their selected blocks is gathered and each query
    is masked to its own choice (MoBA's kernel instead regroups queries per block and merges with the LSE);
    ``reference=True`` builds the (T, S) mask for the reference attention.
    Based on https://arxiv.org/abs/2502.13189 (Lu et al. 2025, MoBA).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        sel: long (B, H, T, k) block ids from :func:`moba_select`, -1 = none. block_size: int >= 1.
        dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        block_q: int >= 1, query rows per tile of the fast path.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    check_int("moba", "block_size", block_size, 1)
    check_int("moba", "block_q", block_q, 1)
    B, H, _, T, S, _ = check_qkv(q, k, v)
    check_dense("moba", dense, B, H, T, S)
    if reference:
        return masked_reference(q, k, v, moba_mask(sel, S, block_size), dense=dense, scale=scale, block_q=block_q)
    nq, nk = -(-T // block_q), -(-S // block_size)
    # (B, H, nq · block_q, k): padded rows choose nothing
    sel_p = F.pad(sel, (0, 0, 0, nq * block_q - T), value=-1)
    # (B, H, nq, nk): the union of the tile's choices, through a flat scatter with a dump slot for -1
    tile = (torch.arange(nq * block_q, device=q.device) // block_q)[None, None, :, None] * nk
    flat = torch.where(sel_p >= 0, tile + sel_p, torch.full_like(sel_p, nq * nk))
    union = torch.zeros(B, H, nq * nk + 1, dtype=torch.bool, device=q.device).scatter_(2, flat.flatten(2), True)
    blocks = blocks_from_flags(union[:, :, :-1].view(B, H, nq, nk))
    idx = expand_blocks(blocks, block_size, S)
    sel_t = sel_p.view(B, H, nq, block_q, -1)

    def visible(t0: int, t1: int) -> torch.Tensor:
        # (B, H, c, block_q, U): does the row choose the tile's u-th block; then per key of the block
        chosen = (sel_t[:, :, t0:t1, :, None, :] == blocks[:, :, t0:t1, None, :, None]).any(-1)
        return chosen.repeat_interleave(block_size, dim=-1)

    return gathered_attention(
        q, k, v, idx, block_q=block_q, visible=visible, dense=dense, scale=scale, need_lse=need_lse
    )


@register("attention", "moba")
@dataclass
class MoBA(SparseAttention):
    """MoBA (Mixture of Block Attention): each query attends its top-k key blocks, chosen by a parameter-free gate.

    Keys are split into blocks of ``block_size``; the gate scores each complete past block by ``q · mean(K_block)``
    and every query attends its own block (causally) plus the best ``top_k - 1`` others. Training-free use at
    inference here (the paper also trains with it). The fast path also shows every query its own tile of
    ``block_q`` rows, which lies inside its own block when ``block_q`` divides ``block_size`` and the prompt starts
    at a block edge (a plain prefill). Prefill costs O(T · top_k · block_size); decoding is dense.
    Based on https://arxiv.org/abs/2502.13189 (Lu et al. 2025, MoBA).

    Parameters:
        block_size: int >= 16, keys per block (default 512).
        top_k: int >= 1, blocks per query including its own (default 3, the paper's 8K setting).
        block_q: int >= 16, query rows per tile of the gathered fast path (default 64).
    """

    paper = "MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al. 2025) https://arxiv.org/abs/2502.13189"
    block_size: int = param(512, ge=16, help="keys per block")
    top_k: int = param(3, ge=1, help="blocks per query, its own included")
    block_q: int = param(64, ge=16, help="query rows per tile")

    def attend(self, module, q, k, v, dense, scale):
        sel = moba_select(q, k, self.top_k, self.block_size)
        out, _ = moba_attention(
            q, k, v, sel, self.block_size, dense=dense, scale=scale, block_q=self.block_q, need_lse=False
        )
        return out
