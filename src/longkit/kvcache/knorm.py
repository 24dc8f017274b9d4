"""K-norm: keep the cached tokens whose keys have the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.base import CompressionMethod
from longkit.registry import register


@register("kv", "knorm")
@dataclass
class KNorm(CompressionMethod):
    """K-norm: a query-free score, the negative L2 norm of each cached key.

    Keys with a low norm tend to receive high attention, so the tokens with the largest key norms are evicted
    first; no queries or attention weights are needed (works with any prompt, query-agnostic).
    Based on Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression
    (https://arxiv.org/abs/2406.11430).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (see CompressionMethod).
    """

    paper = (
        "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al. 2024) "
        "https://arxiv.org/abs/2406.11430"
    )

    def score(self, ctx) -> torch.Tensor:
        # (B, H_kv, S)
        return -ctx.keys.float().norm(dim=-1)
