"""Blockwise online-softmax attention: the FlashAttention algorithm in plain PyTorch, forward and backward.

Queries and keys are cut into tiles; each (query block, key block) tile is a small softmax whose output and
log-sum-exp are merged into the running result with :func:`longkit.attention.lse.merge_partials_`. Tiles the
mask hides entirely are skipped, fully visible tiles need no mask, and no (T, S) matrix is ever built, in
the forward or the backward pass (which recomputes each tile from q, k, v and the saved lse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import AttentionMethod, check_args, check_qkv
from longkit.attention.lse import merge_partials_
from longkit.attention.masks import EMPTY, FULL, MaskSpec
from longkit.registry import param, register

MIN_BLOCK = 16


def _masked_(s: torch.Tensor, visible: torch.Tensor, group: int) -> torch.Tensor:
    """Hide scores in place: s (B, H_kv, group · n, m) against a tile mask (B|1, H|1, n, m)."""
    B, H_kv, _, m = s.shape
    n = visible.shape[-2]
    # (B|1, H_kv|1, group|1, n, m): the grouped layout by broadcasting, without copying the mask per head
    grouped = visible[:, :, None] if visible.shape[1] == 1 else visible.reshape(visible.shape[0], H_kv, group, n, m)
    s.view(B, H_kv, group, n, m).masked_fill_(~grouped, float("-inf"))
    return s


def _tile_scores(
    qt: torch.Tensor, kt: torch.Tensor, mask: MaskSpec | None, cls: int, i0: int, i1: int, j0: int, scale: float
) -> torch.Tensor:
    """Masked float32 scores of one tile: qt (B, H_kv, group · n, D), kt (B, H_kv, m, D) -> (B, H_kv, group · n, m)."""
    # The group's queries are rows of one matrix against their shared key head, so K is never repeated.
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if cls != FULL:
        _masked_(s, mask.tile(i0, i1, j0, j0 + kt.shape[-2], device=qt.device), qt.shape[-2] // (i1 - i0))
    return s


def _attend_tile(
    qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, mask: MaskSpec | None, cls: int, i0: int, i1: int,
    j0: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one tile: (out (B, H_kv, group · n, D_v), lse (B, H_kv, group · n)), float32."""
    s = _tile_scores(qt, kt, mask, cls, i0, i1, j0, scale)
    m = s.amax(-1)
    # Rows the tile hides entirely have max -inf; shifting them by 0 keeps exp(-inf) = 0 instead of NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m[..., None])
    total = p.sum(-1)
    out = torch.matmul(p, vt) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return out, m + torch.log(total)


def _plan(mask: MaskSpec | None, B, H, T, S, block_q, block_k, device) -> list[list[tuple[int, int]]]:
    """Per query block, the (key block, class) pairs to compute; empty tiles are left out."""
    if mask is None:
        return [[(j, FULL) for j in range(-(-S // block_k))] for _ in range(-(-T // block_q))]
    classes = mask.tile_classes(B, H, T, S, block_q, block_k, device=device).tolist()
    return [[(j, c) for j, c in enumerate(row) if c != EMPTY] for row in classes]


def _rows(x: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Query rows i0..i1-1 of a grouped (B, H_kv, group, T, *) tensor as float32 (B, H_kv, group · n, *)."""
    return x[:, :, :, i0:i1].reshape(x.shape[0], x.shape[1], -1, *x.shape[4:]).float()


def _forward(q, k, v, mask, scale, block_q, block_k, plan):
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = H // H_kv
    # (B, H_kv, group, T, D): the query heads that share one key/value head sit side by side
    qg = q.unflatten(1, (H_kv, group))
    out = torch.empty(B, H_kv, group, T, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H_kv, group, T, dtype=torch.float32, device=q.device)
    for qi, tiles in enumerate(plan):
        i0, i1 = qi * block_q, min((qi + 1) * block_q, T)
        qt = _rows(qg, i0, i1)
        # (B, H_kv, group · n, D_v) and (B, H_kv, group · n): nothing seen yet is out 0, lse -inf
        acc = torch.zeros(B, H_kv, qt.shape[2], Dv, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(acc.shape[:-1], float("-inf"), device=q.device)
        for kj, cls in tiles:
            j0, j1 = kj * block_k, min((kj + 1) * block_k, S)
            part, part_lse = _attend_tile(qt, k[:, :, j0:j1].float(), v[:, :, j0:j1].float(), mask, cls, i0, i1, j0,
                                          scale)
            merge_partials_(acc, acc_lse, part, part_lse)
        out[:, :, :, i0:i1] = acc.view(B, H_kv, group, i1 - i0, Dv)
        lse[:, :, :, i0:i1] = acc_lse.view(B, H_kv, group, i1 - i0)
    return out.view(B, H, T, Dv), lse.view(B, H, T)


def _backward(do, dlse, q, k, v, out, lse, mask, scale, block_q, block_k, plan):
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = H // H_kv
    # (B, H_kv, group, T, *) views of the per-query tensors
    qg, dog, outg = (x.unflatten(1, (H_kv, group)) for x in (q, do, out))
    lseg = lse.unflatten(1, (H_kv, group))[..., None]
    dlseg = None if dlse is None else dlse.unflatten(1, (H_kv, group))[..., None]
    dq = torch.empty(B, H_kv, group, T, D, dtype=q.dtype, device=q.device)
    # (B, H_kv, S, D) float32 accumulators: every query block adds into the key blocks it sees
    dk = torch.zeros(B, H_kv, S, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, H_kv, S, Dv, dtype=torch.float32, device=q.device)
    for qi, tiles in enumerate(plan):
        i0, i1 = qi * block_q, min((qi + 1) * block_q, T)
        qt, dot = _rows(qg, i0, i1), _rows(dog, i0, i1)
        # (B, H_kv, group · n): D_i = rowsum(dO ⊙ O), the softmax-Jacobian term of FlashAttention-2
        delta = (dot * _rows(outg, i0, i1)).sum(-1)
        if dlseg is not None:
            # d lse_i / d s_ij = P_ij, so an lse gradient enters dS exactly like -D_i.
            delta = delta - _rows(dlseg, i0, i1)[..., 0]
        row_lse = _rows(lseg, i0, i1)
        # Rows that saw no key have lse -inf and all-masked scores; shifting by 0 keeps P = 0 there.
        row_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        dqt = torch.zeros_like(qt)
        for kj, cls in tiles:
            j0, j1 = kj * block_k, min((kj + 1) * block_k, S)
            kt, vt = k[:, :, j0:j1].float(), v[:, :, j0:j1].float()
            # (B, H_kv, group · n, m) probabilities recomputed from the saved lse
            p = torch.exp(_tile_scores(qt, kt, mask, cls, i0, i1, j0, scale) - row_lse)
            # (B, H_kv, m, D_v): the product sums over the group, giving the shared head's gradient
            dv[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dot)
            ds = p * (torch.matmul(dot, vt.transpose(-1, -2)) - delta[..., None])
            dqt += torch.matmul(ds, kt) * scale
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qt) * scale
        dq[:, :, :, i0:i1] = dqt.view(B, H_kv, group, i1 - i0, D)
    return dq.view(B, H, T, D), dk.to(k.dtype), dv.to(v.dtype)


class LSEAttention(torch.autograd.Function):
    """``(out, lse)`` with a recomputing backward, for blockwise attention and the ring: ``apply(q, k, v, (forward,
    backward), *args)`` runs ``forward(q, k, v, *args) -> (out, lse)``, saves them (``out`` as computed, returned in
    q's dtype), and its backward is ``backward(d_out, d_lse, q, k, v, out, lse, *args) -> (dq, dk, dv)``."""

    @staticmethod
    def forward(ctx, q, k, v, functions, *args):
        forward, ctx.backward_fn = functions
        out, lse = forward(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        # Unused outputs then arrive as None instead of zero tensors.
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        return *ctx.backward_fn(d_out, d_lse, q, k, v, out, lse, *ctx.args), None, *(None for _ in ctx.args)


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    *,
    block_q: int = 128,
    block_k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise (FlashAttention-style) attention with masks, GQA, log-sum-exp, and a memory-bounded backward.

    Loops over query blocks and key blocks; each tile's softmax is merged into the running output with the
    shared LSE merge, in float32. Tiles the mask hides are skipped and fully visible tiles build no mask, so
    memory is O(block_q · block_k) per tile and never O(T · S). The backward recomputes tiles from the saved
    lse: dS = P ⊙ (dP − rowsum(dO ⊙ O) + dlse), so both outputs are differentiable. Rows that see no key give
    out = 0, lse = -inf. Based on https://arxiv.org/abs/2205.14135 (Dao et al. 2022, FlashAttention; backward
    of FlashAttention-2, https://arxiv.org/abs/2307.08691) and https://arxiv.org/abs/2112.05682 (Rabe &
    Staats 2021, Self-attention Does Not Need O(n²) Memory).

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, S, D). v: (B, H_kv, S, D_v); H a multiple of H_kv; any float dtype.
        mask: a :class:`MaskSpec`, or None for no mask (every query sees every key).
        scale: score scale, default ``D ** -0.5``.
        block_q, block_k: int >= 16, tile edges; need not divide T or S.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    check_args(Blockwise, block_q=block_q, block_k=block_k)
    B, H, _, T, S, D = check_qkv(q, k, v)
    if mask is not None:
        mask.check(B, H, T, S)
    scale = D**-0.5 if scale is None else float(scale)
    plan = _plan(mask, B, H, T, S, block_q, block_k, q.device)
    return LSEAttention.apply(q, k, v, (_forward, _backward), mask, scale, block_q, block_k, plan)


@register("attention", "blockwise")
@dataclass
class Blockwise(AttentionMethod):
    """Blockwise online-softmax attention (FlashAttention in plain PyTorch) with tile skipping.

    Queries and keys are processed in (block_q, block_k) tiles whose partial softmaxes are merged through
    their log-sum-exp; tiles the mask hides are skipped and the (T, S) score matrix is never built. Same
    results as sdpa up to float rounding. Based on https://arxiv.org/abs/2205.14135 (FlashAttention) and
    https://arxiv.org/abs/2112.05682 (Rabe & Staats 2021).

    Parameters:
        block_q: int >= 16, query rows per tile (default 128).
        block_k: int >= 16, keys per tile (default 128).
    """

    paper = (
        "FlashAttention (Dao et al. 2022) https://arxiv.org/abs/2205.14135; Self-attention Does Not Need "
        "O(n^2) Memory (Rabe & Staats 2021) https://arxiv.org/abs/2112.05682"
    )
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        mask = MaskSpec.from_transformers(module, query, key, attention_mask, **kwargs)
        out, _ = blockwise_attention(query, key, value, mask, scaling, block_q=self.block_q, block_k=self.block_k)
        return out
