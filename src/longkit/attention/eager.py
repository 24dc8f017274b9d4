"""Eager attention: the explicit softmax(QK^T)V reference path of transformers."""

from __future__ import annotations

from dataclasses import dataclass

from longkit.attention.base import AttentionMethod
from longkit.registry import register


@register("attention", "eager")
@dataclass
class Eager(AttentionMethod):
    """Run the model with transformers' eager attention (materialises the (T, S) score matrix; the reference).

    Based on Vaswani et al. 2017, Attention Is All You Need (https://arxiv.org/abs/1706.03762). No parameters.
    """

    paper = "Attention Is All You Need (Vaswani et al. 2017) https://arxiv.org/abs/1706.03762"
    implementation = "eager"
