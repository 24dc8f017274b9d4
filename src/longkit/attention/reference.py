"""Plain-PyTorch reference attention: the ground truth every faster attention is tested against."""

from __future__ import annotations

import torch

from longkit.attention.masks import MaskSpec
from longkit.errors import MethodError


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Check attention inputs and return ``(B, H, H_kv, T, S, D)``; errors name the tensor and the rule."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise MethodError(
            f"attention: 'query' (B, H, T, D), 'key' and 'value' (B, H_kv, S, D) must be 4-D; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[-1] != D:
        raise MethodError(
            f"attention: 'key' must be (B, H_kv, S, D) and 'value' (B, H_kv, S, D_v) with B = {B}, D = {D}; got "
            f"key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    H_kv, S = k.shape[1], k.shape[2]
    if H % H_kv:
        raise MethodError(f"attention: query heads H = {H} must be a multiple of key/value heads H_kv = {H_kv}")
    return B, H, H_kv, T, S, D


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention with masks: softmax(q k^T * scale + mask) v, materialising the (T, S) scores.

    Float32 throughout; GQA by repeating each key/value head for its group of query heads. A row that sees
    no key (everything masked) returns out = 0 and lse = -inf, with zero gradients. O(B·H·T·S) memory.
    Based on https://arxiv.org/abs/1706.03762 (Vaswani et al. 2017, scaled dot-product attention).

    Parameters:
        q: (B, H, T, D). k: (B, H_kv, S, D). v: (B, H_kv, S, D_v); H a multiple of H_kv.
        mask: a :class:`MaskSpec`, or None for no mask (every query sees every key).
        scale: score scale, default ``D ** -0.5``.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    B, H, H_kv, T, S, D = check_qkv(q, k, v)
    scale = D**-0.5 if scale is None else scale
    group = H // H_kv
    # (B, H, S, D): each key/value head repeated for its group of query heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    # (B, H, T, S)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if mask is not None:
        visible = mask.to_dense(B, H, T, S, device=q.device)
        # (B|1, H|1, T, 1): rows without a visible key get finite scores so neither value nor gradient is NaN
        empty = ~visible.any(-1, keepdim=True)
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
        lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    else:
        probs = torch.softmax(scores, dim=-1)
        lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(probs, vf)
    return out.to(q.dtype), lse
