"""Unscaled RoPE, rebuilt through the seam (a control: must give bit-identical logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.registry import register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies


@register("rope", "default")
@dataclass
class Default(HFRopeMethod):
    """Plain rotary embedding with the model's own base; rebuilt through the seam as a control.

    Based on Su et al. 2021, RoFormer (https://arxiv.org/abs/2104.09864). No parameters.
    """

    paper = "RoFormer (Su et al. 2021) https://arxiv.org/abs/2104.09864"
    rope_type = "default"


@register_frequencies("default")
def default_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Plain RoPE frequencies: inv_freq_j = base^(-2j/d) over the rotary dim d; attention factor 1.

    Partial rotary follows the models that implement it (Phi, GPT-NeoX, StableLM): d = int(head_dim *
    partial_rotary_factor). Based on https://arxiv.org/abs/2104.09864. Parameters: base (> 1),
    partial_rotary_factor (in (0, 1]); seq_len is unused.
    """
    return p.inv_freq(), 1.0
