"""DeepSpeed-Ulysses attention: trade a sequence split for a head split with all-to-all, attend locally, trade back.

Each rank holds L = T / W tokens of every head. One all-to-all per tensor gives each rank H / W heads of all T
tokens; plain attention runs over the whole sequence for those heads (sdpa); a reverse all-to-all returns the
output to the sequence split. The all-to-all is its own autograd Function (its backward is the inverse
all-to-all), so gradients flow through unchanged attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longkit.attention.base import check_qkv
from longkit.attention.blockwise import blockwise_attention
from longkit.attention.masks import MaskSpec
from longkit.attention.sequence_parallel import SequenceParallelAttention, rank_and_size
from longkit.errors import MethodError
from longkit.registry import register


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Split ``x`` into W parts along ``scatter_dim``, send part j to rank j, concatenate what arrives along
    ``gather_dim`` in rank order."""
    _, size = rank_and_size(group)
    # (W, ...): the part for each rank, stacked so one all_to_all_single moves them all
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.args = (scatter_dim, gather_dim, group)
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group = ctx.args
        # The inverse all-to-all routes every gradient slice back to the rank that sent the value.
        return _all_to_all(grad, gather_dim, scatter_dim, group), None, None, None


def seq_to_heads(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(B, H, L, D) sequence-sharded -> (B, H / W, W L, D) head-sharded (ranks' tokens in rank order)."""
    return _AllToAll.apply(x, 1, 2, group)


def heads_to_seq(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(B, H / W, W L, D) head-sharded -> (B, H, L, D) sequence-sharded; inverse of :func:`seq_to_heads`."""
    return _AllToAll.apply(x, 2, 1, group)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    group: Any = None,
    *,
    doc_ids: torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """DeepSpeed-Ulysses sequence-parallel attention: exact attention of the whole sequence, differentiable.

    Each rank passes its contiguous shard (tokens ``[r L, (r + 1) L)``). All-to-alls give each rank H / W query
    heads of the whole sequence; torch's sdpa attends; a reverse all-to-all restores the sequence split.
    GQA: key/value heads are split too when W divides H_kv; when H_kv divides W instead, each key/value head
    is replicated W / H_kv times first (one per rank, the DeepSpeed / verl rule), costing that much more
    all-to-all volume for K and V. Collective: every rank of the group must call it with equal shapes.
    Based on Jacobs et al. 2023, DeepSpeed Ulysses (https://arxiv.org/abs/2309.14509).

    Parameters:
        q: (B, H, L, D) local queries, H a multiple of W. k: (B, H_kv, L, D). v: (B, H_kv, L, D_v); H_kv a
            multiple of W or a divisor of W; any float dtype.
        causal: causal attention over global positions (True) or full attention (False).
        scale: score scale, default ``D ** -0.5``.
        group: a ProcessGroup, or None for WORLD.
        doc_ids: (B, T) integer document ids of the whole sequence (T = W L, global order) for packed documents:
            each query attends causally within its document only (blockwise attention with tiles of
            ``block_q`` x ``block_k``, never a (T, T) mask); needs ``causal``. None: one document (sdpa).

    Returns ``out (B, H, L, D_v)`` in q's dtype.
    """
    _, H, H_kv, T, S, D = check_qkv(q, k, v)
    _, size = rank_and_size(group)
    if S != T:
        raise MethodError(f"ulysses attention: local key length S = {S} must equal the local query length T = {T}")
    if H % size:
        raise MethodError(f"ulysses attention: query heads H = {H} must be a multiple of the world size {size}")
    if H_kv % size:
        if size % H_kv:
            raise MethodError(
                f"ulysses attention: key/value heads H_kv = {H_kv} must be a multiple or a divisor of the world "
                f"size {size}"
            )
        # (B, W, L, D): each key/value head repeated W / H_kv times so every rank gets one; query head h then
        # meets expanded head h // (H / W), which is a copy of its original head h // (H / H_kv).
        k = k.repeat_interleave(size // H_kv, dim=1)
        v = v.repeat_interleave(size // H_kv, dim=1)
    if size == 1:
        qh, kh, vh = q, k, v
    else:
        # (B, H / W, T_total, D) and (B, H_kv / W, T_total, D)
        qh, kh, vh = (seq_to_heads(x, group) for x in (q, k, v))
    if doc_ids is None:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=bool(causal), scale=scale, enable_gqa=qh.shape[1] != kh.shape[1]
        )
    else:
        if not causal:
            raise MethodError("ulysses attention: parameter 'doc_ids' (packed documents) needs causal=True")
        if doc_ids.shape != (q.shape[0], T * size):
            raise MethodError(f"ulysses attention: parameter 'doc_ids' must be (B, T) = ({q.shape[0]}, {T * size}), "
                              f"the whole sequence; got {tuple(doc_ids.shape)}")
        # After the all-to-all each rank holds whole rows (for its heads): the single-process packed mask applies.
        out, _ = blockwise_attention(qh, kh, vh, MaskSpec(causal=True, doc_ids=doc_ids), scale,
                                     block_q=block_q, block_k=block_k)
    return out if size == 1 else heads_to_seq(out, group)


@register("attention", "ulysses")
@dataclass
class Ulysses(SequenceParallelAttention):
    """DeepSpeed-Ulysses sequence parallelism: all-to-all from a sequence split to a head split and back.

    Each rank runs the model on its contiguous shard (with the matching global ``position_ids``); attention
    swaps the sequence split for a head split, attends over the whole sequence with sdpa, and swaps back
    (forward and backward). Needs H and H_kv divisible by the world size (or H_kv dividing it: key/value heads
    are replicated). Use :func:`sequence_parallel` to shard inputs and gather logits. Without a process group
    (or with one rank) it is exact single-process blockwise attention, caches and padding included.
    Based on Jacobs et al. 2023, DeepSpeed Ulysses (https://arxiv.org/abs/2309.14509).

    Parameters:
        block_q: int >= 16, query rows per tile of the single-process path (default 128).
        block_k: int >= 16, keys per tile of the single-process path (default 128).
    """

    paper = (
        "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer "
        "Models (Jacobs et al. 2023) https://arxiv.org/abs/2309.14509"
    )
    #: How :func:`sequence_parallel` shards a sequence for this method.
    layout = "contiguous"

    def sharded_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float | None,
        group: Any, doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ulysses_attention(query, key, value, causal, scaling, group, doc_ids=doc_ids, block_q=self.block_q,
                                 block_k=self.block_k)
