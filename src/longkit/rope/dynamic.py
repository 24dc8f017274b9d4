"""Dynamic NTK scaling: the RoPE base grows with the current sequence length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod, trained_length


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
    factor: float = param(2.0, ge=1.0, help="scaling factor")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")

    def rope_parameters(self, model: Any) -> dict[str, Any]:
        return {"factor": self.factor}

    def scaled_config(self, model: Any) -> Any:
        cfg = super().scaled_config(model)
        # transformers' dynamic NTK reads the trained length from max_position_embeddings.
        cfg.max_position_embeddings = self.original_max_position_embeddings or trained_length(model)
        return cfg
