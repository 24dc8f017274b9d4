"""H2O: heavy hitters (accumulated attention) plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.base import RunningScoreMethod
from longkit.registry import param, register

# Queries scored at once while accumulating a long prefill's attention: bounds the (B, H, chunk, S) scratch.
_QUERY_CHUNK = 512


@register("kv", "h2o")
@dataclass
class H2O(RunningScoreMethod):
    """H2O: keep the heavy hitters, the tokens with the largest attention accumulated over all queries so far.

    Each cached token carries the sum of the attention every query has paid to it (summed over the query heads
    of its kv head); the newest ``recent`` fraction of the budget is always kept, the rest goes to the largest
    sums. The sums live in the cache (4 bytes per kept key and head, counted in ``nbytes``) and grow at every
    step, so compression runs after the prompt and, by default, at every decoding step.
    Based on Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models (https://arxiv.org/abs/2306.14048).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (default 1);
    recent in [0, 1] (fraction of the budget kept for the most recent tokens).
    """

    paper = (
        "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models "
        "(Zhang et al. 2023) https://arxiv.org/abs/2306.14048"
    )
    recent: float = param(0.5, ge=0.0, le=1.0, help="fraction of the budget kept for the most recent tokens")
    decode_every: int = param(1, ge=0, help="compress every N decoding steps (0 = only after multi-token forwards)")

    def update(self, ctx) -> torch.Tensor:
        """(B, H_kv, S) accumulated attention including this call's queries."""
        _, _, _, extras = ctx.layer.view(ctx.keys.shape[-2])
        acc = extras["acc"].clone()
        g = ctx.groups
        k = ctx.keys.float().repeat_interleave(g, dim=1)
        visible_keys = ctx.valid.repeat_interleave(g, dim=1)[:, :, None]
        S, T = k.shape[-2], ctx.n_new
        for start in range(0, T, _QUERY_CHUNK):
            stop = min(start + _QUERY_CHUNK, T)
            # queries start..stop sit at slots S - T + i: they see the keys before slot S - T + stop only, so the
            # later keys (half the work of a prefill) are never multiplied
            s_vis = S - T + stop
            # (B, H, t, s_vis) attention of queries start..stop
            q = ctx.queries[:, :, start:stop].float()
            logits = torch.matmul(q, k[:, :, :s_vis].transpose(-1, -2)) * ctx.scaling
            q_slot = S - T + torch.arange(start, stop, device=k.device)
            causal = torch.arange(s_vis, device=k.device)[None, :] <= q_slot[:, None]
            logits = logits.masked_fill(~(causal[None, None] & visible_keys[..., :s_vis]), float("-inf"))
            attn = torch.softmax(logits, dim=-1).sum(dim=2)
            B, H, _ = attn.shape
            acc[..., :s_vis] += attn.view(B, H // g, g, s_vis).sum(2)
        return acc

    def rank(self, stat: torch.Tensor) -> torch.Tensor:
        return stat
