"""Rotation of RoPE vectors from one position to another: the one helper every room uses to move keys or queries.

Position remaps (Self-Extend, DCA, LM-Infinite) re-rotate queries and keys to their remapped positions; KV-cache
eviction with re-positioning (StreamingLLM) moves kept keys to their new slots.
"""

from __future__ import annotations

import torch


def rotate_by(x: torch.Tensor, old: torch.Tensor, new: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE vectors rotated at positions ``old`` to positions ``new``: x (..., N, D), old/new (N,) or (..., N).

    The angles are computed as transformers computes them (float32 ``position * inv_freq``) and subtracted in
    float64, so the result equals rotating the raw vector at ``new`` up to the final rounding. Positions may be
    fractional. Dimensions past ``2 * len(inv_freq)`` (partial rotary) are left as they are. Uses transformers'
    rotate-half layout.
    """
    rot = 2 * inv_freq.shape[0]
    half = rot // 2
    f = inv_freq.float().to(x.device)
    # (..., N, rot / 2): the angle difference per frequency; rotate-half layout uses each frequency in both halves,
    # so cos and sin are computed once per frequency, not per dimension
    delta = (new.to(x.device).float()[..., None] * f).double() - (old.to(x.device).float()[..., None] * f).double()
    cos, sin = delta.cos().to(torch.float32), delta.sin().to(torch.float32)
    # (..., N, rot / 2) halves: x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), in float32 (a
    # bfloat16 x is promoted exactly), each half rounded to x's dtype before the one concatenation
    x1, x2 = x[..., :half], x[..., half:rot]
    parts = [(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype)]
    return torch.cat(parts if rot == x.shape[-1] else [*parts, x[..., rot:]], dim=-1)
