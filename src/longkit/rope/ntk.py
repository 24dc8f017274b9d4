"""NTK-aware scaling: a larger RoPE base, so low frequencies interpolate and high ones extrapolate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.models.introspect import head_dim_of, rope_config
from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies, rope_params


def ntk_base(p: RopeParams, scale: float) -> float:
    """base * scale^(d/(d-2)) over the rotary dim d: the lowest frequency is divided by exactly ``scale``."""
    dim = p.rotary_dim
    if dim <= 2:
        p.fail("head_dim", f"needs a rotary dim > 2 for the d/(d-2) exponent (got {dim})")
    return p.base * scale ** (dim / (dim - 2))


@register_frequencies("ntk")
def ntk_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """NTK-aware frequencies: the default formula at base' = base * factor^(d/(d-2)); attention factor 1.

    Frequency j is divided by factor^(2j/(d-2)): the highest is kept, the lowest divided by exactly factor.
    Based on bloc97 2023, https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/. Parameters: factor
    (required, >= 1), rotary dim d > 2; seq_len is unused (``dynamic`` is the length-dependent variant).
    """
    return p.inv_freq(ntk_base(p, p.require("factor"))), 1.0


@register("rope", "ntk")
@dataclass
class Ntk(HFRopeMethod):
    """NTK-aware scaling: the RoPE base raised to base * factor^(d/(d-2)), d the rotary dim.

    The lowest frequency is interpolated by exactly ``factor``, the highest kept; applied through transformers
    as rope_type ``default`` with the new ``rope_theta``. Based on bloc97 2023, "NTK-Aware Scaled RoPE"
    (https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/).

    Parameters
    ----------
    factor: extension factor, >= 1.
    """

    paper = "NTK-aware scaled RoPE (bloc97 2023) https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/"
    rope_type = "default"
    shown = ("factor",)
    required = ("factor",)
    factor: float = param(2.0, ge=1.0, help="extension factor")

    def rope_parameters(self, model: Any, old: dict[str, Any]) -> dict[str, Any]:
        return {}

    def scaled_theta(self, model: Any, old: dict[str, Any]) -> float:
        p = rope_params(
            self.name,
            head_dim=head_dim_of(rope_config(model)),
            base=old["rope_theta"],
            factor=self.factor,
            partial_rotary_factor=old.get("partial_rotary_factor"),
        )
        return ntk_base(p, self.factor)
