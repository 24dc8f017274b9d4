"""SDPA attention: torch.nn.functional.scaled_dot_product_attention (fused, memory-efficient)."""

from __future__ import annotations

from dataclasses import dataclass

from longkit.attention.base import AttentionMethod
from longkit.registry import register


@register("attention", "sdpa")
@dataclass
class Sdpa(AttentionMethod):
    """Run the model with PyTorch's fused scaled-dot-product attention (FlashAttention / memory-efficient kernels).

    Based on Dao et al. 2022, FlashAttention (https://arxiv.org/abs/2205.14135). No parameters.
    """

    paper = "FlashAttention (Dao et al. 2022) https://arxiv.org/abs/2205.14135"
    implementation = "sdpa"
