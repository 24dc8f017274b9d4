"""PyramidKV: SnapKV scores with per-layer budgets that shrink with depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.kvcache.budget import pyramid_budgets, target_tokens
from longkit.kvcache.snapkv import SnapKV
from longkit.registry import param, register


@register("kv", "pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV: pyramidal per-layer budgets on top of SnapKV scoring.

    Lower layers spread attention widely and get more tokens, upper layers concentrate it and get fewer: the
    budget beyond the observation window falls linearly from ``2k - k/beta`` at the first layer to ``k/beta`` at
    the last, averaging the uniform budget ``k``, so the whole cache holds as many tokens as SnapKV's.
    Based on Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling
    (https://arxiv.org/abs/2406.02069).

    Parameters: those of snapkv, plus beta > 1 (ratio of the mean budget to the last layer's).
    """

    paper = (
        "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al. 2024) "
        "https://arxiv.org/abs/2406.02069"
    )

    beta: float = param(20.0, gt=1.0, help="mean budget / last layer's budget")

    def layer_target(self, ctx) -> torch.Tensor:
        k = target_tokens(ctx.real_seen, ratio=self.ratio, tokens=self.tokens)
        w = min(self.window, ctx.n_new)
        out = []
        for kb in k.tolist():
            # The schedule applies to the budget beyond the window, which every layer keeps.
            extra = max(kb - w, 0)
            budgets = pyramid_budgets(float(extra), ctx.num_layers, self.beta)
            out.append(min(kb, w) + int(round(budgets[ctx.layer_idx])))
        return torch.tensor(out, dtype=torch.long, device=k.device).clamp(min=1)
