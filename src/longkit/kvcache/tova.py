"""TOVA: evict the token the current query attends to least, at every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.base import CompressionMethod
from longkit.kvcache.scores import window_attention
from longkit.registry import param, register


@register("kv", "tova")
@dataclass
class TOVA(CompressionMethod):
    """TOVA: token omission via attention of the last query.

    The score of a cached token is the attention the newest query pays to it, averaged over all heads of the
    layer (the paper's layer-wise policy: every head keeps the same tokens). After the prompt and after every
    ``decode_every`` decoding steps the lowest-scored tokens are evicted down to the budget; the newest token is
    always kept. Use ``tokens=`` for a fixed-size cache during decoding.
    Based on Oren et al. 2024, Transformers are Multi-State RNNs (https://arxiv.org/abs/2401.06104).

    Parameters: ratio in (0, 1], tokens >= 1, threshold, decode_every >= 0 (default 1: every step).
    """

    paper = "Transformers are Multi-State RNNs (Oren et al. 2024) https://arxiv.org/abs/2401.06104"

    decode_every: int = param(1, ge=0, help="compress every N decoding steps (0 = only after multi-token forwards)")

    def score(self, ctx) -> torch.Tensor:
        # (B, H, 1, S) -> (B, S): the last query's attention averaged over every head of the layer
        attn = window_attention(ctx, 1)[:, :, 0].mean(dim=1)
        scores = attn[:, None, :].expand(ctx.keys.shape[:3]).clone()
        scores[..., -1] = float("inf")
        return scores
