"""Random eviction: the baseline every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.base import CompressionMethod
from longkit.registry import param, register


@register("kv", "random")
@dataclass
class RandomEviction(CompressionMethod):
    """Random: keep a uniformly random subset of the cached tokens of each head.

    Scores are drawn from a generator seeded by ``seed``, the layer and the cache length, so a run is repeatable.
    Based on the random baseline of kvpress (NVIDIA 2024, https://github.com/NVIDIA/kvpress).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod); seed >= 0.
    """

    paper = "Random eviction baseline, as RandomPress in kvpress (NVIDIA 2024) https://github.com/NVIDIA/kvpress"

    seed: int = param(0, ge=0, help="seed of the random scores")

    def score(self, ctx) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx * 10_007 + ctx.layer.seen)
        # (B, H_kv, S) uniform scores, drawn on the CPU for the same draw on every device
        return torch.rand(ctx.keys.shape[:3], generator=g).to(ctx.keys.device)
