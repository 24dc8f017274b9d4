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

from longkit.attention.blockwise import MIN_BLOCK
from longkit.attention.position_remap import RemapAttention, remapped_attention, remapped_reference
from longkit.errors import MethodError
from longkit.registry import param, register
from longkit.rope.remap import lm_infinite_matrix


def _check(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MethodError(f"lm_infinite attention: parameter '{name}' must be an int >= {lo} (got {value!r})")
    return value


def lm_infinite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    n_sinks: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-Infinite attention over RoPE-rotated q and k, blockwise: local window part + sink part, LSE-merged.

    Query i sits at position ``S - T + i`` and key j at position j. Local part: keys at distance < L with
    their own rotations. Sink part: keys j < n_sinks at distance >= L, query re-rotated to L and key to 0
    (relative distance L). Memory O(T·D + tiles), never O(T·S). Based on https://arxiv.org/abs/2308.16137
    (Han et al. 2024, ``Glaciohound/LM-Infinite``).

    Parameters:
        q: (B, H, T, D) rotated at positions S - T .. S - 1. k: (B, H_kv, S, D) rotated at 0 .. S - 1.
        v: (B, H_kv, S, D_v). inv_freq: (rotary_dim / 2,) the model's RoPE inverse frequencies.
        window: int >= 1, L (local window and distance cap). n_sinks: int >= 0, the global (sink) tokens.
        dense: optional bool (B|1, 1|H, T, S) extra mask (padding), True = visible.
        scale: score scale (default D ** -0.5). block_q, block_k: int >= 16, tile edges.

    Returns ``(out (B, H, T, D_v) in q's dtype, lse (B, H, T) float32)``.
    """
    L = _check("window", window, 1)
    n = _check("n_sinks", n_sinks, 0)
    return remapped_attention(
        q,
        k,
        v,
        inv_freq,
        L,
        lambda p: torch.full_like(p, L),
        torch.zeros_like,
        far_keys=n,
        dense=dense,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
    )


def lm_infinite_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    window: int,
    n_sinks: int,
    *,
    dense: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LM-Infinite from the explicit relative-position matrix of :func:`longkit.rope.relative_positions`
    (``lm_infinite``) and dense scores, O(T·S·D) memory (tests only). Same arguments and result as
    :func:`lm_infinite_attention`."""
    L = _check("window", window, 1)
    n = _check("n_sinks", n_sinks, 0)
    T, S = q.shape[2], k.shape[2]
    # (T, S) relative positions of the queries at S - T .. S - 1; -1 marks hidden pairs
    rel = lm_infinite_matrix(S, L, n)[S - T :]
    return remapped_reference(q, k, v, inv_freq, rel, dense=dense, scale=scale)


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

    def attend(self, q, k, v, inv_freq, trained, dense, scale):
        window = trained if self.window is None else self.window
        out, _ = lm_infinite_attention(
            q,
            k,
            v,
            inv_freq,
            window,
            self.n_sinks,
            dense=dense,
            scale=scale,
            block_q=self.block_q,
            block_k=self.block_k,
        )
        return out
