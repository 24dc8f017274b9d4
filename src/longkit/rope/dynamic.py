"""Dynamic NTK scaling: the RoPE base grows with the current sequence length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.models.introspect import trained_length
from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies
from longkit.rope.ntk import ntk_base


@register("rope", "dynamic")
@dataclass
class Dynamic(HFRopeMethod):
    """Dynamic NTK-aware scaling: past the trained length L, base -> base * (factor*T/L - (factor-1))^(d/(d-2)).

    Below L the model is untouched. Based on emozilla/bloc97 (2023), "Dynamically Scaled RoPE further increases
    performance of long context LLaMA" (https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/); transformers
    rope_type ``dynamic``.

    Parameters
    ----------
    factor: scaling factor, >= 1.
    original_max_position_embeddings: trained length L (> 0); default: the model's.
    """

    paper = "Dynamic NTK (emozilla 2023) https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/"
    rope_type = "dynamic"
    shown = ("factor",)
    required = ("factor",)
    factor: float = param(2.0, ge=1.0, help="scaling factor")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")

    def rope_parameters(self, model: Any, old: dict[str, Any]) -> dict[str, Any]:
        # The trained length goes to max_position_embeddings (scaled_config): transformers' dynamic reads it there.
        return {"factor": self.factor}

    def scaled_config(self, model: Any) -> Any:
        cfg = super().scaled_config(model)
        # transformers' dynamic NTK reads the trained length from max_position_embeddings.
        cfg.max_position_embeddings = self.original_max_position_embeddings or trained_length(model)
        return cfg


@register_frequencies("dynamic")
def dynamic_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK frequencies: the default formula at base * (factor*T/L - (factor-1))^(d/(d-2)), T = max(seq_len, L).

    Up to the trained length L (and with seq_len None) the base is unchanged; beyond it the base grows with T
    (static ``ntk`` with the scale factor*T/L - (factor-1)). Attention factor 1. Based on emozilla 2023,
    https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/. Parameters: factor (required, >= 1), L =
    original_max_position_embeddings or max_position_embeddings (> 0), rotary dim d > 2.
    """
    factor, trained = p.require("factor"), p.require_trained_length()
    length = trained if seq_len is None else max(seq_len, trained)
    # Same operation order as transformers, in Python floats, so the float32 frequencies match bit for bit.
    return p.inv_freq(ntk_base(p, (factor * length / trained) - (factor - 1))), 1.0
