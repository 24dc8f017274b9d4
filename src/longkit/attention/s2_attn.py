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
Implemented without the roll: the shifted half is padded with ``g - s`` placeholder tokens at the front so its
groups align with multiples of ``g``; placeholders are masked out.

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


def _grouped(q, k, v, g: int, front: int, dense: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Causal attention inside groups of ``g`` of positions ``-front, ..., T - 1`` (placeholders below 0 and
    past T - 1 are masked): q (B, h, T, D), k, v (B, h_kv, T, D) -> (B, h, T, D_v)."""
    B, h, T, _ = q.shape
    n = -(-(front + T) // g)
    back = n * g - front - T

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # (B, h, T, D) -> (B, n, h, g, D): sdpa's batch dims, then heads at -3 as its GQA needs
        x = F.pad(x, (0, 0, front, back))
        return x.view(x.shape[0], x.shape[1], n, g, x.shape[-1]).transpose(1, 2)

    idx = torch.arange(n * g, device=q.device) - front
    real = ((idx >= 0) & (idx < T)).view(n, g)
    causal = torch.ones(g, g, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(g, dtype=torch.bool, device=q.device)
    # (n, g, g): a real key, or the query itself (so a placeholder query's row is never empty)
    visible = causal & (real[:, None, :] | eye)
    mask = visible[None, :, None]
    if dense is not None:
        d = F.pad(dense, (front, back, front, back))
        # (Bd, hd, n·g, n·g) -> the diagonal blocks (Bd, n, hd, g, g): each group's own rows and columns
        d = d.view(d.shape[0], d.shape[1], n, g, n, g).diagonal(dim1=2, dim2=4).permute(0, 4, 1, 2, 3)
        mask = mask & d
    # A row that sees nothing (a padded query) gets its own key so sdpa stays finite, then a zero output, as
    # the reference gives it.
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & eye)
    out = F.scaled_dot_product_attention(
        blocks(q), blocks(k), blocks(v), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != h
    )
    out = out.masked_fill(empty, 0.0) if dense is not None else out
    return out.transpose(1, 2).reshape(B, h, n * g, -1)[:, :, front : front + T]


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
    s = g // 2
    rep, half = H // H_kv, H // 2
    outs = []
    for heads, front in ((range(0, half), 0), (range(half, H), (g - s) % g)):
        if not heads:
            continue
        qh = q[:, heads.start : heads.stop]
        if heads.start % rep == 0 and heads.stop % rep == 0:
            # The half's key heads are whole: keep GQA unexpanded.
            kv = slice(heads.start // rep, heads.stop // rep)
            kh, vh = k[:, kv], v[:, kv]
        else:
            kh = k.repeat_interleave(rep, dim=1)[:, heads.start : heads.stop]
            vh = v.repeat_interleave(rep, dim=1)[:, heads.start : heads.stop]
        dh = None if dense is None else dense if dense.shape[1] == 1 else dense[:, heads.start : heads.stop]
        outs.append(_grouped(qh, kh, vh, g, front, dh, scale))
    return torch.cat(outs, dim=1)


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
