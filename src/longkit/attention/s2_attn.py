"""LongLoRA's shifted sparse attention (S²-Attn), a training-time attention (Chen et al. ICLR 2024).

The sequence is cut into groups of ``g = int(T · group_size_ratio)`` tokens and each query attends causally
inside its own group only. The first half of the heads (``h < H // 2``, as LongLoRA's reshape into two halves)
use groups starting at 0; the other half use groups shifted by ``s = g // 2``, so information flows between
neighbouring groups through the shifted heads. Cost: O(T · g) instead of O(T²).

No causal leak. LongLoRA's plain-PyTorch path (``forward_noflashattn``) shifts by rolling the sequence by
``-s``, so the first ``s`` tokens are wrapped into the last group behind the last ``s`` tokens and see them (the
future): issues #15 and #90 of dvlab-research/LongLoRA. Here the shifted heads' groups are
``[0, s), [s, s + g), [s + g, s + 2g), ...``: the wrapped tokens form their own group at the start, which is
what the official flash-attention path (``forward_flashattn``, cumulative lengths ``k·g + g/2``) computes.
Implemented without the roll, as that flash path: each half's groups are runs of equal-length groups
(:func:`s2_runs`: the shifted half's own first group ``[0, s)``, whole groups of ``g``, a shorter last group), and
each run is one causal sdpa call with its groups folded into the batch dim: 4-D inputs, ``is_causal`` and no mask,
which torch's fused flash kernels take on CPU and GPU. An extra ``dense`` mask (padding, packed documents) that
hides something inside a group is cut into per-group (g, g) blocks and passed as a mask (still 4-D, still the
flash kernel on CPU); one that hides nothing there (a plain causal mask) is dropped. Measured in
``benchmarks/train/s2_attn_speed.py``: the former single masked 5-D sdpa call ran torch's math path on CPU
(materialised (g, g) scores, slow backward) and was slower than full attention.

Lengths not divisible by ``g`` (LongLoRA refuses them): the last group of each half is shorter; every token is
still in exactly one group.

Training only. As in the paper (and LongLoRA's inference path), the model is evaluated with full attention:
the registered method applies S²-Attn when the attention module is in training mode (``model.train()``) and
plain causal attention (torch's sdpa) in eval mode, so applying it changes nothing at inference, decoding
included. A training forward must have as many queries as keys (no cache).

The plain reference is :func:`longkit.attention.naive.s2_attn_reference` (explicit (T, T) mask, softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longkit.attention.base import AttentionMethod, check_args, check_qkv, transformers_inputs
from longkit.attention.masks import MaskSpec
from longkit.attention.sparse import dense_attention
from longkit.errors import MethodError
from longkit.registry import param, register


def s2_group_size(T: int, group_size_ratio: float) -> int:
    """Tokens per group for a sequence of ``T``: ``int(T · ratio)`` as LongLoRA, at least 1."""
    return max(1, int(T * group_size_ratio))


def s2_runs(T: int, g: int, first: int) -> list[tuple[int, int, int]]:
    """The groups of positions ``0 .. T - 1`` as runs ``(start, length, count)`` of ``count`` consecutive groups of
    ``length``: an own first group ``[0, first)`` when ``first > 0`` (the shifted heads' half group), then whole
    groups of ``g``, then the shorter last group when ``g`` does not divide what is left."""
    runs, a = [], 0
    if first:
        runs.append((0, first, 1))
        a = first
    if (T - a) // g:
        runs.append((a, g, (T - a) // g))
        a += (T - a) // g * g
    if a < T:
        runs.append((a, T - a, 1))
    return runs


def _fold(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, h, m·L, D) -> (B·m, h, L, D): ``m`` consecutive groups folded into the batch dim (a view for B = 1)."""
    B, h, n, D = x.shape
    return x.unflatten(2, (m, n // m)).transpose(1, 2).reshape(B * m, h, n // m, D)


def _group_mask(dense: torch.Tensor, B: int, a: int, L: int, m: int) -> torch.Tensor | None:
    """The diagonal (L, L) blocks of ``dense`` (Bd, hd, T, T) for the run, ANDed with causality, as a (B·m, hd, L, L)
    mask; None when the blocks hide nothing causal attention would show (a plain causal mask, as transformers may
    hand over for a batch without padding, or documents whose boundaries all fall between the run's groups)."""
    d = dense[:, :, a : a + m * L, a : a + m * L]
    # (Bd, hd, m, L, m, L) -> the diagonal blocks (Bd, m, hd, L, L): each group's own rows and columns
    d = d.unflatten(2, (m, L)).unflatten(4, (m, L)).diagonal(dim1=2, dim2=4).permute(0, 4, 1, 2, 3)
    causal = torch.ones(L, L, dtype=torch.bool, device=dense.device).tril()
    if bool((d | ~causal).all()):
        return None
    d = d & causal
    return d.expand(B, *d.shape[1:]).reshape(B * m, *d.shape[2:])


def _causal_groups(q, k, v, runs, dense: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Causal attention inside each group of ``runs`` (see :func:`s2_runs`): q (B, h, T, D), k, v (B, h, T, D)
    (key heads already matched to the query heads) -> (B, T, h, D_v).

    Each run is one sdpa call on 4-D inputs (groups folded into the batch dim) with ``is_causal`` and no mask
    where ``dense`` hides nothing in it: what torch's fused CPU/GPU flash kernels take (a 5-D call or an explicit
    mask sends CPU sdpa to its math path, which materialises every (g, g) score matrix and is slow backwards).
    The runs are cut with ``split`` (its backward is one ``cat``; slicing would zero-fill a full-size gradient
    per run)."""
    B = q.shape[0]
    sizes = [L * m for _, L, m in runs]
    outs = []
    for (a, L, m), qr, kr, vr in zip(runs, *(x.split(sizes, dim=2) for x in (q, k, v)), strict=True):
        mask = None if dense is None else _group_mask(dense, B, a, L, m)
        qf, kf, vf = _fold(qr, m), _fold(kr, m), _fold(vr, m)
        if mask is None:
            out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=L > 1, scale=scale)
        else:
            # A row that sees nothing (a padded query) gets its own key so sdpa stays finite, then a zero output,
            # as the reference gives it.
            empty = ~mask.any(-1, keepdim=True)
            mask = mask | (empty & torch.eye(L, dtype=torch.bool, device=mask.device))
            out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale).masked_fill(empty, 0.0)
        # (B·m, h, L, D_v) -> (B, m·L, h, D_v)
        outs.append(out.transpose(1, 2).reshape(B, m * L, out.shape[1], out.shape[-1]))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size_ratio: float = 0.25,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Shifted sparse attention: causal attention within groups; heads ``>= H // 2`` use groups shifted by
    half a group, with no wrap-around (see the module docstring).

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, T, D). v: (B, H_kv, T, D_v); H a multiple of H_kv; as many keys as queries.
        group_size_ratio: float in (0, 1], group size as a fraction of T (``int(T · ratio)``, at least 1).
        dense: optional bool (B|1, H|1, T, T) extra mask (padding, documents), True = visible.
        scale: default ``D ** -0.5``.

    Returns (B, H, T, D_v) in q's dtype. A query that sees no key gets 0.
    """
    check_args(S2Attn, group_size_ratio=group_size_ratio)
    B, H, H_kv, T, S, _ = check_qkv(q, k, v)
    if T != S:
        raise MethodError(
            f"s2_attn attention: needs as many queries as keys (a training forward without a cache); got T = {T}, "
            f"S = {S}"
        )
    if dense is not None:
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or dense.ndim != 4:
            raise MethodError("s2_attn attention: parameter 'dense' must be a bool tensor (B|1, H|1, T, T)")
        MaskSpec(causal=False, dense=dense).check(B, H, T, S)
    g = s2_group_size(T, group_size_ratio)
    rep, half = H // H_kv, H // 2
    # Key heads matched to the query heads (one copy, its backward one sum): as fast as sdpa's enable_gqa on the
    # flash kernel (benchmarks/train/results/s2_attn_speed.notes.md), which cannot take a half that splits a key
    # head (SmolLM2: 9 query heads, 3 key heads). The halves are cut with split (backward: one cat).
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    sizes = [n for n in (half, H - half) if n]
    firsts = [0, g // 2][-len(sizes) :]
    if dense is not None and dense.shape[1] > 1:
        denses = dense.split(sizes, dim=1)
    else:
        denses = [dense] * len(sizes)
    outs = [
        _causal_groups(qh, kh, vh, s2_runs(T, g, first), dh, scale)
        for qh, kh, vh, dh, first in zip(*(x.split(sizes, dim=1) for x in (q, k, v)), denses, firsts, strict=True)
    ]
    # (B, T, H, D_v) viewed as (B, H, T, D_v): the layout transformers wants back, so its transpose is free
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]).transpose(1, 2)


@register("attention", "s2_attn")
@dataclass
class S2Attn(AttentionMethod):
    """LongLoRA's shifted sparse attention for training: causal attention within groups of ``group_size_ratio`` of
    the sequence, half of the heads shifted by half a group (no wrap-around leak).

    Applies only while the attention modules are in training mode; in eval mode the model runs full causal
    attention (sdpa), as the paper evaluates, so inference and decoding are unchanged.
    Based on https://arxiv.org/abs/2309.12307 (Chen et al. ICLR 2024, LongLoRA).

    Parameters:
        group_size_ratio: float in (0, 1], group size as a fraction of the sequence length (default 0.25).
    """

    paper = (
        "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (Chen et al. ICLR 2024) "
        "https://arxiv.org/abs/2309.12307"
    )
    group_size_ratio: float = param(0.25, gt=0.0, le=1.0, help="group size as a fraction of the sequence length")

    def attention(self, module, query, key, value, attention_mask, scaling, kwargs):
        dense = transformers_inputs(self, module, query, key, attention_mask, kwargs)
        if not module.training:
            return dense_attention(query, key, value, dense, scaling)
        return s2_attention(query, key, value, self.group_size_ratio, dense=dense, scale=scaling)
