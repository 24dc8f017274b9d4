"""log-n attention scaling: query logits multiplied by ``max(1, log(n) / log(L))`` at 1-based position n.

Attention entropy grows with the number of keys; scaling the logits of the query at position n by
``log_L n`` (L the trained length) keeps it near what the model saw in training. The factor depends only on
the query, so it scales the query vector before an ordinary attention kernel (sdpa or blockwise). The factors
are :func:`log_n_factors`, the same function ReRoPE's log-n uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longkit.attention.base import BoundAttention, check_args, full_layer_trained_length
from longkit.attention.blockwise import MIN_BLOCK, blockwise_attention
from longkit.attention.masks import MaskSpec
from longkit.methods import Undo
from longkit.registry import param, register


def log_n_factors(positions: torch.Tensor, trained: int) -> torch.Tensor:
    """log-n query scaling: ``max(1, log(p + 1) / log(L))`` per position (ReRoPE, ``bojone/rerope``)."""
    return (torch.log(positions.double() + 1) / math.log(trained)).clamp(min=1.0).float()


def log_n_scale_queries(query: torch.Tensor, positions: torch.Tensor, trained: int) -> torch.Tensor:
    """Queries (B, H, T, D) at 0-based ``positions`` ((T,) or (B, T)) times ``max(1, log(p + 1) / log(L))``.

    Scaling the query scales every logit of that query, which is what log-n scaling asks. Based on Su 2023
    (https://kexue.fm/archives/8823, ``bojone/rerope``) and Chiang & Cholak 2022
    (https://arxiv.org/abs/2202.12172). trained L: int >= 2.
    """
    check_args(LogN, trained=trained)
    # (B|1, 1, T, 1) factors, computed in float32 as transformers computes positions
    f = log_n_factors(positions, trained).to(query.device)
    f = f[None, None, :, None] if f.ndim == 1 else f[:, None, :, None]
    return (query.float() * f).to(query.dtype)


@register("attention", "logn")
@dataclass
class LogN(BoundAttention):
    """log-n attention scaling: the logits of the query at position n multiplied by ``max(1, log_L n)``.

    Past the trained length L the attention logits grow with log n so the attention entropy stays near the
    trained one; below L nothing changes. Works with any RoPE or none, through an ordinary kernel (``inner``),
    in prefill and cached decoding; left padding is honoured through transformers' ``position_ids``. Based on
    Su 2023, https://kexue.fm/archives/8823 (used by ReRoPE and Qwen-1) and Chiang & Cholak 2022,
    Overcoming a Theoretical Limitation of Self-Attention, https://arxiv.org/abs/2202.12172.

    Parameters:
        trained: int >= 2 or None, L (default None: the model's trained length).
        skip_layers: int >= 0, the first layers left unscaled (default 0: every layer).
        inner: "sdpa" or "blockwise", the attention kernel run on the scaled queries (default "sdpa").
        block_q, block_k: int >= 16, tile edges when ``inner`` is "blockwise".
    """

    paper = (
        "Entropy invariance / log-n scaling (Su 2023) https://kexue.fm/archives/8823; Overcoming a Theoretical "
        "Limitation of Self-Attention (Chiang & Cholak 2022) https://arxiv.org/abs/2202.12172"
    )
    trained: int | None = param(None, ge=2, help="trained length L of the log base (None: the model's)")
    skip_layers: int = param(0, ge=0, help="leave the first this many layers unscaled")
    inner: str = param("sdpa", choices=("sdpa", "blockwise"), help="attention kernel run on the scaled queries")
    block_q: int = param(128, ge=MIN_BLOCK, help="query rows per tile (inner = blockwise)")
    block_k: int = param(128, ge=MIN_BLOCK, help="keys per tile (inner = blockwise)")

    def apply(self, model: Any) -> Undo:
        return self.bind(model, self.trained if self.trained is not None else full_layer_trained_length(model))

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        trained = self.bound(module)
        layer = getattr(module, "layer_idx", None)
        if layer is None or layer >= self.skip_layers:
            T, S = query.shape[2], key.shape[2]
            positions = kwargs.get("position_ids")
            # (B, T) real positions (left padding honoured), else the cache index S - T .. S - 1
            positions = torch.arange(S - T, S) if positions is None else positions
            query = log_n_scale_queries(query, positions, trained)
        if self.inner == "blockwise":
            mask = MaskSpec.from_transformers(module, query, key, attention_mask, **kwargs)
            out, _ = blockwise_attention(query, key, value, mask, scaling, block_q=self.block_q, block_k=self.block_k)
            return out
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # sdpa returns (B, T, H, D_v) contiguous: this view back to (B, H, T, D_v) makes forward's transpose free
        return out.transpose(1, 2)
