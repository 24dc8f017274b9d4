"""Ada-KV: per-head budgets from one layer-wide top-k over any scorer's scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longkit.kvcache.base import CompressionMethod, make_scorer
from longkit.kvcache.budget import keep_layerwide, keep_threshold, target_tokens
from longkit.registry import param, register


@register("kv", "adakv")
@dataclass
class AdaKV(CompressionMethod):
    """Ada-KV: adaptive per-head budgets for any scorer.

    The layer keeps ``H_kv * k`` tokens chosen by one top-k over the scores of all its heads, so heads whose
    attention is concentrated give tokens to heads whose attention is spread; a safeguard first gives every
    head its own ``floor(alpha * k)`` best tokens. Heads then hold different numbers of tokens: the cache stores
    them ragged (packed rows + per-head lengths), so the evicted bytes are freed, not masked.
    Based on Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
    LLM Inference (https://arxiv.org/abs/2407.11550).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod);
    scorer (a registered eviction method: snapkv, knorm, tova, ...); scorer_args ("key=value;key=value", the
    scorer's own parameters, e.g. "window=8;kernel=5"; default: its defaults; budget parameters are adakv's own);
    alpha in [0, 1] (safeguard fraction of the uniform budget every head keeps).
    """

    paper = (
        "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference "
        "(Feng et al. 2024) https://arxiv.org/abs/2407.11550"
    )
    wrapper: ClassVar[bool] = True

    scorer: str = param("snapkv", help="the eviction method whose scores are re-budgeted per head")
    scorer_args: str = param("", help="the scorer's own parameters, 'key=value;key=value' (e.g. 'window=8')")
    alpha: float = param(0.2, ge=0.0, le=1.0, help="safeguard: every head keeps floor(alpha * k) of its best tokens")
    _inner: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._inner = make_scorer(self.name, self.scorer, self.scorer_args)

    @property
    def track(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._inner.track

    def score(self, ctx) -> torch.Tensor:
        return self._inner.score(ctx)

    def select(self, ctx, scores: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            return keep_threshold(scores, self.threshold)
        k = target_tokens(ctx.real_seen, ratio=self.ratio, tokens=self.tokens)
        return keep_layerwide(scores, k, self.alpha)

    def on_compact(self, ctx, keep: torch.Tensor):
        return self._inner.on_compact(ctx, keep)
