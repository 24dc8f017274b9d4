"""SnapKV: keep the tokens the observation window attends to most, pooled so that neighbours stay together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.errors import MethodError
from longkit.kvcache.base import CompressionMethod
from longkit.kvcache.scores import per_kv_head, window_attention
from longkit.registry import param, register


@register("kv", "snapkv")
@dataclass
class SnapKV(CompressionMethod):
    """SnapKV: attention of the observation window, pooled, per kv head.

    The last ``window`` tokens of the prompt (the question, in query-aware use) attend over the cache; each earlier
    token's score is that attention averaged over the window queries, smoothed by a 1-D ``pooling`` of width
    ``kernel`` and averaged over the query heads sharing a kv head (GQA). The window itself is always kept.
    The window is the last ``window`` prompt tokens whatever they are: when the question is shorter than the window
    (a plain-completion passkey prompt ends in ~10 question tokens), context tokens share the vote, and tokens that
    occur once (the passkey digits) can score lowest in the early layers (issue #4; kvpress does the same).
    Based on Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation
    (https://arxiv.org/abs/2404.14469).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod);
    window >= 1 (observation window); kernel odd >= 1 (pooling width); pooling "avg" or "max".
    """

    paper = (
        "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al. 2024) https://arxiv.org/abs/2404.14469"
    )

    window: int = param(32, ge=1, help="observation window: the last tokens whose queries score the cache")
    kernel: int = param(5, ge=1, help="pooling width over neighbouring tokens (odd)")
    pooling: str = param("avg", choices=("avg", "max"), help="pooling of the scores over the kernel")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise MethodError(f"kv method '{self.name}': parameter 'kernel' must be odd (got {self.kernel})")

    def score(self, ctx) -> torch.Tensor:
        w = min(self.window, ctx.n_new)
        # (B, H, w, S) -> (B, H, S - w): attention the window pays to the tokens before it
        attn = window_attention(ctx, self.window)
        S = attn.shape[-1]
        prefix = attn[..., : S - w].mean(dim=2)
        if self.kernel > 1 and prefix.shape[-1] > 0:
            pool = torch.nn.functional.avg_pool1d if self.pooling == "avg" else torch.nn.functional.max_pool1d
            B, H, P = prefix.shape
            prefix = pool(prefix.reshape(B * H, 1, P), self.kernel, stride=1, padding=self.kernel // 2).view(B, H, P)
        scores = per_kv_head(prefix, ctx.groups)
        window_scores = torch.full((*scores.shape[:2], w), float("inf"), device=scores.device)
        return torch.cat([scores, window_scores], dim=-1)
