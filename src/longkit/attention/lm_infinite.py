"""LM-Infinite: a Λ-shaped mask (sink tokens + a local window) with relative distances capped at the window.

Keys closer than the window L (the pre-training length) attend with their own RoPE positions; the first
``n_sinks`` keys stay visible beyond it and are seen at distance exactly L (query re-rotated to L, key to 0);
every other key is hidden. Both parts run blockwise and are merged through their log-sum-exp
(:mod:`longkit.attention.position_remap`); only the window's tiles are computed, so the cost is O(T·(L + n_sinks)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import check_args
from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.position_remap import RemapAttention, remapped_attention
from longkit.registry import param, register


def lm_infinite_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, window: int, n_sinks: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-Infinite (:class:`LMInfinite`) over RoPE-rotated q and k: local window part + sink part, LSE-merged.

    window: int >= 1, L (local window and distance cap). n_sinks: int >= 0, the global (sink) tokens, seen
    beyond the window at relative distance L (query re-rotated to L, key to 0). The tensors, the keyword
    arguments (dense, scale, block_q, block_k, fused) and the result ``(out, lse)`` are as
    :func:`remapped_attention`'s. Based on https://arxiv.org/abs/2308.16137 (Han et al. 2024).
    """
    check_args(LMInfinite, window=window, n_sinks=n_sinks)
    L = window
    return remapped_attention(q, k, v, inv_freq, L, lambda p: torch.full_like(p, L), torch.zeros_like, far_keys=n_sinks, **kw)


@register("attention", "lm_infinite")
@dataclass
class LMInfinite(RemapAttention):
    """LM-Infinite: Λ-shaped attention (sinks + local window) with distances capped at the window (training-free).

    Each query sees the keys closer than L with their normal RoPE positions and the first ``n_sinks`` tokens
    at relative distance L (never farther than pre-training); all other keys are masked. With the model's
    own RoPE, blockwise with LSE merging, in prefill and cached decoding. Based on Han et al. 2024,
    LM-Infinite, https://arxiv.org/abs/2308.16137 (``Glaciohound/LM-Infinite``: ``local_branch`` =
    ``limit_distance`` = L, ``global_branch`` = n_sinks).

    Parameters:
        window: int >= 1 or None, L (default None: the model's trained length, as the paper's L_pretrain).
        n_sinks: int >= 0, global tokens kept visible (default 100, the reference README's ``global_branch``).
        block_q, block_k: int >= 16, tile edges of the blockwise passes.
    """

    paper = (
        "LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models (Han et al. 2024) "
        "https://arxiv.org/abs/2308.16137"
    )
    window: int | None = param(None, ge=1, help="local window and distance cap L (None: the trained length)")
    n_sinks: int = param(100, ge=0, help="global (sink) tokens visible beyond the window, at distance L")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile")

    def attend(self, q, k, v, inv_freq, trained, **kw):
        window = trained if self.window is None else self.window
        return lm_infinite_attention(q, k, v, inv_freq, window, self.n_sinks, **kw)
