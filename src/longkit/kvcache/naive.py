"""Plain-PyTorch references of the KV room's fast decode paths: the ground truth their tests compare against.

:func:`decode_reference` is single-query attention with repeated kv heads and float32 scores;
:func:`kivi_decode_reference` dequantises a whole :class:`~longkit.kvcache.kivi.KIVILayer` and attends over it,
which is what KIVI did at every step before the quantised read (:func:`longkit.kvcache.kivi_attention.kivi_decode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from longkit.kvcache.kivi import KIVILayer


def bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool (True = visible) or additive (0 = visible) attention mask as bool; None stays None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Single-query attention: q (B, H, 1, D), k/v (B, H_kv, S, D), mask (B|1, H|1, 1, S) bool or additive, or None.
    Repeated kv heads, float32 scores and softmax; returns (B, H, 1, D_v) in q's dtype."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    kf, vf = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    m = bool_mask(mask)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype)


def kivi_decode_reference(
    layer: KIVILayer, q: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Attention of one query token over a KIVI layer: dequantise the whole cache (keys and values in the model's
    dtype, then the exact residual; ragged per-head rows padded to the longest head's, the padding hidden), then
    :func:`decode_reference`. ``mask`` as for :func:`longkit.kvcache.kivi_attention.kivi_decode`."""
    k, v, valid, _ = layer.padded()
    if valid is not None:
        # (B, H, 1, S) each query head sees its kv head's real slots
        real = valid.repeat_interleave(q.shape[1] // valid.shape[1], dim=1)[:, :, None]
        m = bool_mask(mask)
        mask = real if m is None else real & m[..., : real.shape[-1]]
    return decode_reference(q, k, v, mask, scale)
