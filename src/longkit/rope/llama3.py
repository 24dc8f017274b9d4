"""Llama-3.1 RoPE scaling: per-band frequency interpolation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longkit.errors import MethodError
from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod, trained_length


@register("rope", "llama3")
@dataclass
class Llama3(HFRopeMethod):
    """Llama-3.1 scaling: wavelengths above L/low_freq_factor divided by ``factor``, below L/high_freq_factor
    kept, smooth interpolation between.

    Based on Meta 2024, The Llama 3 Herd of Models (https://arxiv.org/abs/2407.21783); transformers rope_type
    ``llama3``.

    Parameters
    ----------
    factor: interpolation factor for low frequencies, >= 1 (8 for Llama 3.1).
    low_freq_factor, high_freq_factor: band edges, > 0, low < high (1 and 4 for Llama 3.1).
    original_max_position_embeddings: trained length L (> 0); default: the model's.
    """

    paper = "Llama 3 (Meta 2024) https://arxiv.org/abs/2407.21783"
    rope_type = "llama3"
    shown = ("factor",)
    factor: float = param(8.0, ge=1.0, help="low-frequency interpolation factor")
    low_freq_factor: float = param(1.0, gt=0, help="low band edge")
    high_freq_factor: float = param(4.0, gt=0, help="high band edge")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_freq_factor >= self.high_freq_factor:
            raise MethodError(
                f"rope method 'llama3': parameter 'low_freq_factor' must be < high_freq_factor "
                f"(got {self.low_freq_factor} >= {self.high_freq_factor})"
            )

    def rope_parameters(self, model: Any) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings or trained_length(model),
        }
