"""Llama-3.1 RoPE scaling: per-band frequency interpolation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies


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
    required = ("factor", "low_freq_factor", "high_freq_factor")
    factor: float = param(8.0, ge=1.0, help="low-frequency interpolation factor")
    low_freq_factor: float = param(1.0, gt=0, help="low band edge")
    high_freq_factor: float = param(4.0, gt=0, help="high band edge")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")

    @staticmethod
    def check(p: Any) -> None:
        low, high = p.low_freq_factor, p.high_freq_factor
        if low is not None and high is not None and low >= high:
            p.fail("low_freq_factor", f"must be < high_freq_factor (got {low} >= {high})")


@register_frequencies("llama3")
def llama3_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Llama-3.1 frequencies: wavelengths above L/low_freq_factor divided by factor, below L/high_freq_factor
    kept, a smooth blend between; attention factor 1.

    Based on https://arxiv.org/abs/2407.21783. Parameters (all required, as transformers requires them):
    factor (>= 1), low_freq_factor < high_freq_factor (both > 0; 1 and 4 for Llama 3.1), L =
    original_max_position_embeddings (> 0; max_position_embeddings in its place); seq_len is unused.
    """
    factor, low, high = p.require("factor"), p.require("low_freq_factor"), p.require("high_freq_factor")
    trained = p.require_trained_length()
    inv_freq = p.inv_freq()
    # (d/2,) wavelengths in tokens, compared with the band edges L/low and L/high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > trained / low, inv_freq / factor, inv_freq)
    smooth = (trained / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < trained / high) * ~(wavelen > trained / low)
    return torch.where(medium, smoothed, scaled), 1.0
