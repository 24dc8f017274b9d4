"""Unscaled RoPE, rebuilt through the seam (a control: must give bit-identical logits)."""

from __future__ import annotations

from dataclasses import dataclass

from longkit.registry import register
from longkit.rope.base import HFRopeMethod


@register("rope", "default")
@dataclass
class Default(HFRopeMethod):
    """Plain rotary embedding with the model's own base; rebuilt through the seam as a control.

    Based on Su et al. 2021, RoFormer (https://arxiv.org/abs/2104.09864). No parameters.
    """

    paper = "RoFormer (Su et al. 2021) https://arxiv.org/abs/2104.09864"
    rope_type = "default"
