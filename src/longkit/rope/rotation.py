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
    f = inv_freq.float().to(x.device)
    # (..., N, rot / 2): the angle difference per frequency
    delta = (new.to(x.device).float()[..., None] * f).double() - (old.to(x.device).float()[..., None] * f).double()
    # (..., N, rot): rotate-half layout repeats each frequency in both halves
    delta = torch.cat([delta, delta], dim=-1)
    cos, sin = delta.cos().to(torch.float32), delta.sin().to(torch.float32)
    xr = x[..., :rot].float()
    half = rot // 2
    rotated_half = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = (xr * cos + rotated_half * sin).to(x.dtype)
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)
