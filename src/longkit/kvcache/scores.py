"""Shared scoring primitives of eviction methods: attention of observation-window queries over the cache."""

from __future__ import annotations

import torch


def window_attention(ctx, window: int) -> torch.Tensor:
    """(B, H, w, S) float32 softmax attention of the last ``w = min(window, n_new)`` queries over the cached keys.

    The window queries are the newest tokens, so they sit in the last ``w`` slots of the view: causal among
    themselves, and padded / padding slots (``ctx.valid`` False) get zero weight.
    """
    w = min(window, ctx.n_new)
    # (B, H, w, D) and (B, H, S, D) with the kv heads repeated for their query heads
    q = ctx.queries[:, :, -w:].float()
    k = ctx.keys.float().repeat_interleave(ctx.groups, dim=1)
    S = k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling
    slot = torch.arange(S, device=k.device)
    q_slot = S - w + torch.arange(w, device=k.device)
    # (B, H, w, S) visible: causal inside the window, real slots only
    visible = (slot[None, :] <= q_slot[:, None])[None, None] & ctx.valid.repeat_interleave(ctx.groups, dim=1)[
        :, :, None
    ]
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def per_kv_head(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, S) -> (B, H_kv, S): average the query heads that share a kv head (GQA-aware aggregation)."""
    B, H, S = scores.shape
    return scores.view(B, H // groups, groups, S).mean(2)
