"""Scissorhands: evict the tokens that were unimportant most often (persistence of importance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.base import RunningScoreMethod
from longkit.registry import param, register


@register("kv", "scissorhands")
@dataclass
class Scissorhands(RunningScoreMethod):
    """Scissorhands: a token that was unimportant for many recent queries will stay unimportant.

    Each cached token carries a counter of the queries for which it was unimportant: its attention (averaged
    over the query heads of its kv head) below the uniform share ``1 / visible tokens``. The prompt's last
    ``history`` queries count, then every decoding step; eviction drops the tokens with the highest counts,
    never the newest ``recent`` fraction of the budget. The counters live in the cache (4 bytes per kept key and
    head, counted in ``nbytes``).
    Based on Liu et al. 2023, Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
    Compression at Test Time (https://arxiv.org/abs/2305.17118).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (default 1);
    history >= 1 (prompt queries that vote); recent in [0, 1] (fraction of the budget kept for the newest tokens).
    """

    paper = (
        "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test "
        "Time (Liu et al. 2023) https://arxiv.org/abs/2305.17118"
    )
    history: int = param(64, ge=1, help="prompt queries whose attention votes")
    recent: float = param(0.25, ge=0.0, le=1.0, help="fraction of the budget kept for the most recent tokens")
    decode_every: int = param(1, ge=0, help="compress every N decoding steps (0 = only after multi-token forwards)")

    def update(self, ctx) -> torch.Tensor:
        """(B, H_kv, S) times each token was unimportant, this call's last ``history`` queries included."""
        _, _, _, extras = ctx.layer.view(ctx.keys.shape[-2])
        g = ctx.groups
        w = min(self.history, ctx.n_new)
        k = ctx.keys.float().repeat_interleave(g, dim=1)
        S = k.shape[-2]
        # (B, H, w, S) attention of the voting queries, which sit in the last w slots
        q = ctx.queries[:, :, -w:].float()
        logits = torch.matmul(q, k.transpose(-1, -2)) * ctx.scaling
        q_slot = S - w + torch.arange(w, device=k.device)
        visible = (torch.arange(S, device=k.device)[None, :] <= q_slot[:, None])[
            None, None
        ] & ctx.valid.repeat_interleave(g, dim=1)[:, :, None]
        attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        B, H = attn.shape[:2]
        # (B, H_kv, w, S) averaged over the group; (B, H_kv, w, 1) visible tokens per query
        attn = attn.view(B, H // g, g, w, S).mean(2)
        seen = visible.view(B, H // g, g, w, S)[:, :, 0]
        share = 1.0 / seen.sum(-1, keepdim=True).clamp(min=1)
        low = ((attn < share) & seen).sum(2).float()
        return extras["acc"] + low

    def rank(self, stat: torch.Tensor) -> torch.Tensor:
        # the most often unimportant go first
        return -stat
