"""Ring attention with zigzag load balancing: exact attention over a sequence sharded across ranks.

Every rank keeps its queries and passes its key/value block to the next rank W - 1 times
(``batch_isend_irecv``, overlapped with compute); each step's partial attention is merged by log-sum-exp
(:func:`longkit.attention.lse.merge_partials_`). With the zigzag layout (rank r holds chunks r and 2W-1-r of 2W)
every step after the first is exactly half a block of causal work on every rank. The backward runs the same
ring again and sends the key/value gradient accumulators around with the blocks, so each block's dK / dV
comes home after W hops. Tiles are computed by the blockwise (FlashAttention) kernel in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longkit.attention.base import check_args, check_qkv
from longkit.attention.blockwise import Blockwise, LSEAttention, _backward, _forward, _plan
from longkit.attention.lse import merge_partials_
from longkit.attention.masks import MaskSpec
from longkit.attention.sequence_parallel import SequenceParallelAttention, rank_and_size, shard_index
from longkit.errors import MethodError
from longkit.registry import register

# Point-to-point tags keep the key/value ring and the gradient ring apart when both are in flight (gloo).
_TAG_KV, _TAG_GRAD = 0, 1


class _Ring:
    """Send tensors to the next rank and receive the previous rank's, asynchronously."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.size = rank_and_size(group)

    def start(self, tensors: tuple[torch.Tensor, ...], tag: int) -> _Pending:
        if self.size == 1:
            return _Pending(tensors, [])
        nxt, prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        tensors = tuple(t.contiguous() for t in tensors)
        recv = tuple(torch.empty_like(t) for t in tensors)
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=nxt, tag=tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, group=self.group, group_peer=prev, tag=tag) for r in recv]
        return _Pending(recv, dist.batch_isend_irecv(ops))


class _Pending:
    def __init__(self, tensors: tuple[torch.Tensor, ...], requests: list) -> None:
        self.tensors, self.requests = tensors, requests

    def wait(self) -> tuple[torch.Tensor, ...]:
        for r in self.requests:
            r.wait()
        return self.tensors


def _step_kind(causal: bool, step: int, rank: int, size: int) -> str:
    """Which part of a step's work is visible under the zigzag layout.

    At step s rank r holds the key/value block of rank src = (r - s) mod W, i.e. chunks src and 2W-1-src.
    "all": every query sees every key (non-causal). "diag": step 0, the own block, causal in local order.
    "first_keys": src < r, all queries see chunk src and none see chunk 2W-1-src (it lies after both).
    "last_queries": src > r, the query chunk r lies before both key chunks, chunk 2W-1-r after both.
    """
    if not causal:
        return "all"
    if step == 0:
        return "diag"
    return "first_keys" if (rank - step) % size < rank else "last_queries"


def _tiles(kind: str, L: int, docs: tuple[torch.Tensor, torch.Tensor] | None) -> list[tuple[slice, slice, slice, Any]]:
    """The visible parts of one ring step as ``(batch rows, query rows, keys, mask)`` tiles of the local block.

    Without documents: one tile (see :func:`_step_kind`). With packed documents (``docs``: this rank's and the
    held block's (B, L) document ids, non-decreasing in local order, which is global order): the diagonal step
    adds the document ids to its causal mask. In the other steps every visible key lies before every visible
    query, and document ids never decrease, so a query sees a key only when both are in the one document that
    spans the gap (the keys' last, the queries' first): a prefix of the queries against a suffix of the keys,
    fully visible, per batch row; a step whose documents do not meet has no tile.
    """
    c = L // 2
    every = slice(None)
    if kind == "all":
        return [(every, every, every, None)]
    if kind == "diag":
        return [(every, every, every, MaskSpec(causal=True, doc_ids=None if docs is None else docs[0]))]
    rows, keys = (every, slice(None, c)) if kind == "first_keys" else (slice(c, None), every)
    if docs is None:
        return [(every, rows, keys, None)]
    q_doc, k_doc = docs[0][:, rows], docs[1][:, keys]
    q0 = 0 if rows.start is None else rows.start
    k_end = k_doc.shape[1] if keys.stop is None else keys.stop
    tiles = []
    for b in range(q_doc.shape[0]):
        shared = k_doc[b, -1]
        n_q = int((q_doc[b] == shared).sum())
        n_k = int((k_doc[b] == shared).sum())
        if n_q and n_k:
            tiles.append((slice(b, b + 1), slice(q0, q0 + n_q), slice(k_end - n_k, k_end), None))
    return tiles


def _step_docs(doc_ids: torch.Tensor | None, T: int, ring: _Ring, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(this rank's, the held block's) (B, L) document ids at ``step``, or None without documents."""
    if doc_ids is None:
        return None
    src = (ring.rank - step) % ring.size
    own = doc_ids.index_select(1, shard_index(T, ring.size, ring.rank, "zigzag", doc_ids.device))
    return own, doc_ids.index_select(1, shard_index(T, ring.size, src, "zigzag", doc_ids.device))


def _ring_forward(q, k, v, causal, scale, group, block_q, block_k, doc_ids=None):
    ring = _Ring(group)
    B, H, L, _ = q.shape
    qf = q.float()
    # (B, H, L, D_v) float32 running output and (B, H, L) lse; nothing seen yet is out 0, lse -inf
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, L), float("-inf"), device=q.device)
    kv = (k, v)
    for step in range(ring.size):
        pending = ring.start(kv, _TAG_KV) if step + 1 < ring.size else None
        kind = _step_kind(causal, step, ring.rank, ring.size)
        for b, rows, keys, mask in _tiles(kind, L, _step_docs(doc_ids, L * ring.size, ring, step)):
            qs, kb, vb = qf[b, :, rows], kv[0][b, :, keys], kv[1][b, :, keys]
            plan = _plan(mask, qs.shape[0], H, qs.shape[2], kb.shape[2], block_q, block_k, q.device)
            part, part_lse = _forward(qs, kb, vb, mask, scale, block_q, block_k, plan)
            merge_partials_(out[b, :, rows], lse[b, :, rows], part, part_lse)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def _ring_backward(d_out, d_lse, q, k, v, out, lse, causal, scale, group, block_q, block_k, doc_ids=None):
    ring = _Ring(group)
    B, H, L, D = q.shape
    qf, dof = q.float(), d_out.float()
    dq = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
    kv = (k, v)
    pending_grads = None
    for step in range(ring.size):
        pending_kv = ring.start(kv, _TAG_KV) if step + 1 < ring.size else None
        kind = _step_kind(causal, step, ring.rank, ring.size)
        kb, vb = kv[0].float(), kv[1].float()
        # (B, H_kv, L, D) float32 gradients of the block held now; the parts a step does not see stay zero
        dk = torch.zeros_like(kb)
        dv = torch.zeros_like(vb)
        for b, rows, keys, mask in _tiles(kind, L, _step_docs(doc_ids, L * ring.size, ring, step)):
            dl = None if d_lse is None else d_lse[b, :, rows]
            qs, kt, vt = qf[b, :, rows], kb[b, :, keys], vb[b, :, keys]
            plan = _plan(mask, qs.shape[0], H, qs.shape[2], kt.shape[2], block_q, block_k, q.device)
            # The global out and lse give each tile's exact probabilities and rowsum(dO ⊙ O), as in FlashAttention-2.
            dq_s, dk_s, dv_s = _backward(
                dof[b, :, rows], dl, qs, kt, vt, out[b, :, rows], lse[b, :, rows], mask, scale, block_q, block_k, plan
            )
            dq[b, :, rows] += dq_s
            dk[b, :, keys] += dk_s
            dv[b, :, keys] += dv_s
        if pending_grads is None:
            acc = (dk, dv)
        else:
            # The accumulator for the block held now arrives from the previous rank, which held it last step.
            acc_k, acc_v = pending_grads.wait()
            acc = (acc_k.add_(dk), acc_v.add_(dv))
        if pending_kv is not None:
            kv = pending_kv.wait()
        # After the last step this send carries each block's gradient home to its owner (the next rank).
        pending_grads = ring.start(acc, _TAG_GRAD)
    dk, dv = pending_grads.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    group: Any = None,
    *,
    block_q: int = 128,
    block_k: int = 128,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zigzag ring attention over the ranks of ``group``: exact (causal) attention of the whole sequence.

    Each rank passes its local shard in the zigzag layout (:func:`longkit.attention.sequence_parallel.shard`):
    chunks r and 2W-1-r of the sequence cut into 2W equal chunks. K/V blocks travel the ring
    (``batch_isend_irecv``); partial results merge by log-sum-exp in float32; the backward sends dK/dV around
    a second ring. Collective: every rank of the group must call it with equally shaped tensors. With no
    process group (or a group of one) it is blockwise attention. Based on Liu et al. 2023, Ring Attention with
    Blockwise Transformers (https://arxiv.org/abs/2310.01889) and the zigzag layout of
    https://github.com/zhuzilin/ring-flash-attention.

    Parameters:
        q: (B, H, L, D) local queries. k: (B, H_kv, L, D). v: (B, H_kv, L, D_v); H a multiple of H_kv; any float
            dtype (accumulation is float32). L = T / W must be even (T a multiple of 2W).
        causal: causal attention over global positions (True) or full attention (False).
        scale: score scale, default ``D ** -0.5``.
        group: a ProcessGroup, or None for WORLD.
        block_q, block_k: int >= 16, tile edges of the local blockwise kernel.
        doc_ids: (B, T) integer document ids of the whole sequence (T = W L, global order, non-decreasing) for
            packed documents: each query attends causally within its document only; needs ``causal``. None: one
            document.

    Returns ``(out (B, H, L, D_v) in q's dtype, lse (B, H, L) float32)``, both differentiable.
    """
    check_args(Blockwise, block_q=block_q, block_k=block_k)
    _, _, _, T, S, D = check_qkv(q, k, v)
    _, size = rank_and_size(group)
    if S != T:
        raise MethodError(f"ring attention: local key length S = {S} must equal the local query length T = {T}")
    if T % 2:
        raise MethodError(
            f"ring attention: the local length {T} must be even (zigzag: the sequence is 2 × world size = {2 * size} "
            "equal chunks, two per rank)"
        )
    if doc_ids is not None:
        if not causal:
            raise MethodError("ring attention: parameter 'doc_ids' (packed documents) needs causal=True")
        if doc_ids.shape != (q.shape[0], T * size) or doc_ids.dtype.is_floating_point:
            raise MethodError(f"ring attention: parameter 'doc_ids' must be an integer (B, T) = ({q.shape[0]}, "
                              f"{T * size}) tensor of the whole sequence; got {tuple(doc_ids.shape)}")
        if bool((doc_ids.diff(dim=-1) < 0).any()):
            raise MethodError("ring attention: parameter 'doc_ids' must be non-decreasing (contiguous documents)")
    scale = D**-0.5 if scale is None else float(scale)
    return LSEAttention.apply(
        q, k, v, (_ring_forward, _ring_backward), bool(causal), scale, group, block_q, block_k, doc_ids
    )


@register("attention", "ring")
@dataclass
class Ring(SequenceParallelAttention):
    """Zigzag ring attention: a sequence sharded over the ranks of a process group, attended exactly.

    Each rank runs the model on its zigzag shard (chunks r and 2W-1-r, with the matching global
    ``position_ids``); attention passes key/value blocks around the ring and merges partial softmaxes by
    log-sum-exp, forward and backward (dK/dV travel a second ring). Use :func:`sequence_parallel` to shard
    inputs and gather logits. Without a process group (or with one rank) it is exact single-process blockwise
    attention, caches and padding included; sharded runs need whole unpadded sequences without a KV cache.
    Based on Liu et al. 2023, Ring Attention (https://arxiv.org/abs/2310.01889), zigzag layout from
    https://github.com/zhuzilin/ring-flash-attention.

    Parameters:
        block_q: int >= 16, query rows per local tile (default 128).
        block_k: int >= 16, keys per local tile (default 128).
    """

    paper = (
        "Ring Attention with Blockwise Transformers for Near-Infinite Context (Liu, Zaharia, Abbeel 2023) "
        "https://arxiv.org/abs/2310.01889"
    )
    #: How :func:`sequence_parallel` shards a sequence for this method.
    layout = "zigzag"

    def sharded_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float | None,
        group: Any, doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out, _ = ring_attention(query, key, value, causal, scaling, group, block_q=self.block_q, block_k=self.block_k,
                                doc_ids=doc_ids)
        return out
