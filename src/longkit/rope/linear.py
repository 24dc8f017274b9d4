"""Position Interpolation: positions divided by a constant factor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies


@register("rope", "linear")
@dataclass
class Linear(HFRopeMethod):
    """Position Interpolation: every rotary frequency divided by ``factor`` (positions squeezed into the trained range).

    Based on Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation
    (https://arxiv.org/abs/2306.15595); transformers rope_type ``linear``.

    Parameters
    ----------
    factor: context extension factor, >= 1 (2 doubles the usable window).
    """

    paper = "Position Interpolation (Chen et al. 2023) https://arxiv.org/abs/2306.15595"
    rope_type = "linear"
    shown = ("factor",)
    required = ("factor",)
    factor: float = param(2.0, ge=1.0, help="context extension factor")


@register_frequencies("linear")
def linear_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Position Interpolation frequencies: every default frequency divided by ``factor``; attention factor 1.

    Dividing inv_freq is the same as dividing the position ids, since the angles are positions x inv_freq.
    Based on https://arxiv.org/abs/2306.15595. Parameters: factor (required, >= 1); seq_len is unused.
    """
    return p.inv_freq() / p.require("factor"), 1.0
