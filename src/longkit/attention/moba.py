"""MoBA: Mixture of Block Attention: each query attends its top-k key blocks by a gate on block means."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longkit.attention.base import check_qkv
from longkit.attention.lse import fused_cpu_kernel, merge_partials, require_fused_cpu_kernel
from longkit.attention.naive import masked_reference
from longkit.attention.sparse import (
    SparseAttention,
    block_means,
    blocks_from_flags,
    check_sparse,
    expand_blocks,
    gathered_attention,
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


def moba_grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather-free CPU path of :func:`moba_attention`, as MoBA's own kernel: queries regrouped per block.

    Every query attends its own block causally: whole blocks of queries against their block's keys in one
    fused call. Then, per head and selected past block, the queries that chose it (gathered rows, a small
    set) attend that block's keys (a contiguous slice, no gather), and the parts are merged by log-sum-exp.
    Queries of a chunk may start inside a block (``S - T`` not at a block edge): that block's earlier keys are
    then seen in full. Runs torch's fused CPU flash kernel (which returns the log-sum-exp).

    Returns ``(out (B, H, T, D_v) float32, lse (B, H, T) float32)``.
    """
    kernel = require_fused_cpu_kernel("moba", q, k, v)
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    group, Dv, bs = H // H_kv, v.shape[-1], block_size
    P0 = S - T
    # Own blocks: rows in the block of the first query (from P0, causal with offset P0 - j0 · bs), then the
    # rows of whole blocks, all heads in one call each.
    j0 = P0 // bs
    n0 = min(T, (j0 + 1) * bs - P0)
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # (B, H, n0, D) against keys j0 · bs .. P0 + n0 - 1: the keys before P0 are seen by every row (a full part)
    k0, v0 = kr[:, :, j0 * bs : P0 + n0], vr[:, :, j0 * bs : P0 + n0]
    off = P0 - j0 * bs
    o, lse0 = kernel(q[:, :, :n0], k0[:, :, off:], v0[:, :, off:], 0.0, True, scale=scale)
    out0, lse0 = o.float(), lse0.float()
    if off > 0:
        o, part = kernel(q[:, :, :n0], k0[:, :, :off], v0[:, :, :off], 0.0, False, scale=scale)
        out0, lse0 = merge_partials(out0, lse0, o, part)
    outs, lses = [out0], [lse0]
    rest = T - n0
    if rest > 0:
        nb = -(-rest // bs)
        pad = nb * bs - rest

        def blocks(x: torch.Tensor, rows: int) -> torch.Tensor:
            # (B, H, rest, X) from block j0 + 1 on -> (B · nb, H, bs, X); padded rows / keys come after every real
            # query of their block, so causality hides them
            xp = F.pad(x[:, :, rows:], (0, 0, 0, pad))
            return xp.view(B, H, nb, bs, x.shape[-1]).transpose(1, 2).reshape(B * nb, H, bs, x.shape[-1])

        o, part = kernel(blocks(q, n0), blocks(kr, P0 + n0), blocks(vr, P0 + n0), 0.0, True, scale=scale)
        outs.append(o.view(B, nb, H, bs, Dv).transpose(1, 2).reshape(B, H, nb * bs, Dv)[:, :, :rest].float())
        lses.append(part.view(B, nb, H, bs).transpose(1, 2).reshape(B, H, nb * bs)[:, :, :rest].float())
    out, lse = torch.cat(outs, 2).contiguous(), torch.cat(lses, 2).contiguous()

    # Past blocks: (query, block) pairs of every selection other than the own block, grouped by block.
    own = (positions(T, S, q.device) // bs)[:, None]
    for b in range(B):
        for h in range(H):
            chosen = sel[b, h]
            rows, slot = ((chosen >= 0) & (chosen < own)).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            ids = chosen[rows, slot]
            order = ids.argsort(stable=True)
            rows, ids = rows[order], ids[order]
            uniq, counts = torch.unique_consecutive(ids, return_counts=True)
            hk, start = h // group, 0
            for j, n in zip(uniq.tolist(), counts.tolist(), strict=True):
                r = rows[start : start + n]
                start += n
                o, part = kernel(
                    q[b, h, r].view(1, 1, n, D),
                    k[b, hk, j * bs : (j + 1) * bs].view(1, 1, -1, D),
                    v[b, hk, j * bs : (j + 1) * bs].view(1, 1, -1, Dv),
                    0.0,
                    False,
                    scale=scale,
                )
                merged, merged_lse = merge_partials(out[b, h, r], lse[b, h, r], o.view(n, Dv), part.view(n))
                out[b, h, r], lse[b, h, r] = merged, merged_lse
    return out, lse


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
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact causal attention of each query over its selected key blocks.

    Every query also sees its own tile of ``block_q`` rows (inside its own block when tiles do not straddle
    blocks). Fast paths: on CPU without gradients or a padding mask, when ``block_q`` divides ``block_size`` and
    the queries start at a tile edge, :func:`moba_grouped_attention` (queries regrouped per block, as MoBA's
    kernel); otherwise, per tile of ``block_q`` queries, the union of their selected blocks is gathered and each
    query is masked to its own choice. ``reference=True`` builds the (T, S) mask for the reference attention.
    Based on https://arxiv.org/abs/2502.13189 (Lu et al. 2025, MoBA).

    Parameters:
        q: (B, H, T, D) at positions S - T .. S - 1. k: (B, H_kv, S, D). v: (B, H_kv, S, D_v).
        sel: long (B, H, T, k) block ids from :func:`moba_select`, -1 = none. block_size: int >= 1.
        dense: optional bool (B|1, H|1, T, S) extra mask. scale: default D ** -0.5.
        block_q: int >= 1, query rows per tile of the fast path.
        need_lse: False lets the fast path use torch's fused sdpa (lse is then None).
        fused: False forces the gathered path where the grouped one applies (tests compare both).

    Returns ``(out (B, H, T, D_v), lse (B, H, T) float32 or None)``.
    """
    B, H, _, T, S, D = check_sparse(MoBA, q, k, v, dense, block_size=block_size, block_q=block_q)
    if reference:
        return masked_reference(q, k, v, moba_mask(sel, S, block_size), dense=dense, scale=scale, block_q=block_q)
    # Every query tile inside one block: the own tile then lies in the own block the grouped path attends.
    tiles_in_blocks = block_size % block_q == 0 and (S - T) % block_q == 0
    if fused and tiles_in_blocks and dense is None and fused_cpu_kernel(q, k, v) is not None:
        out, lse = moba_grouped_attention(q, k, v, sel, block_size, D**-0.5 if scale is None else float(scale))
        return out.to(q.dtype), lse if need_lse else None
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
        skip_layers, skip_last: int >= 0, leading / trailing layers kept dense (default 0, 0).
    """

    paper = "MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al. 2025) https://arxiv.org/abs/2502.13189"
    block_size: int = param(512, ge=16, help="keys per block")
    top_k: int = param(3, ge=1, help="blocks per query, its own included")
    block_q: int = param(64, ge=16, help="query rows per tile")

    def attend(self, module, q, k, v, dense, scale):
        sel = moba_select(q, k, self.top_k, self.block_size)
        out, _ = moba_attention(
            q, k, v, sel, self.block_size, dense=dense, scale=scale, block_q=self.block_q, need_lse=False,
            fused=self.fused_cpu,
        )
        return out
