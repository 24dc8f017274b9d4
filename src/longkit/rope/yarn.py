"""YaRN: NTK-by-parts frequency interpolation plus an attention temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies


@register("rope", "yarn")
@dataclass
class Yarn(HFRopeMethod):
    """YaRN: high frequencies kept, low frequencies interpolated by ``factor``, a linear ramp between
    (set by beta_fast/beta_slow rotations), and cos/sin scaled by 0.1*ln(factor)+1.

    Based on Peng et al. 2023, YaRN: Efficient Context Window Extension of LLMs
    (https://arxiv.org/abs/2309.00071); transformers rope_type ``yarn``.

    Parameters
    ----------
    factor: extension factor, >= 1.
    original_max_position_embeddings: trained length (> 0); default: the model's.
    beta_fast, beta_slow: ramp boundaries in rotations, beta_fast >= beta_slow > 0 (32 and 1 in the paper).
    mscale, mscale_all_dim: DeepSeek-style attention-factor terms (optional, >= 0; used when both are non-zero).
    attention_factor: explicit cos/sin scale (> 0); default from factor/mscale.
    truncate: round the correction range to whole dimensions (paper behaviour).
    """

    paper = "YaRN (Peng et al. 2023) https://arxiv.org/abs/2309.00071"
    rope_type = "yarn"
    shown = ("factor",)
    required = ("factor",)
    factor: float = param(2.0, ge=1.0, help="extension factor")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")
    beta_fast: float = param(32.0, gt=0, help="fast ramp boundary (rotations)")
    beta_slow: float = param(1.0, gt=0, help="slow ramp boundary (rotations)")
    mscale: float | None = param(None, ge=0, help="attention-factor numerator term (0 = off)")
    mscale_all_dim: float | None = param(None, ge=0, help="attention-factor denominator term (0 = off)")
    attention_factor: float | None = param(None, gt=0, help="explicit cos/sin scale")
    truncate: bool = param(True, help="truncate the correction range to integers")

    @staticmethod
    def check(p: Any) -> None:
        if p.beta_fast < p.beta_slow:
            p.fail("beta_fast", f"must be >= beta_slow (got {p.beta_fast} < {p.beta_slow})")


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@register_frequencies("yarn")
def yarn_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """YaRN frequencies: NTK-by-parts blend of default and default/factor, plus the attention temperature.

    Frequencies completing more than beta_fast rotations over the trained length L are kept, fewer than
    beta_slow divided by factor, with a linear ramp over the dimension index between; cos/sin are scaled by
    0.1*ln(factor)+1 (or the mscale/mscale_all_dim ratio, or attention_factor). Based on
    https://arxiv.org/abs/2309.00071. Parameters: factor (>= 1; default max_position_embeddings / L),
    L = original_max_position_embeddings (> 0), beta_fast >= beta_slow > 0, mscale, mscale_all_dim (>= 0),
    attention_factor (> 0), truncate (bool); seq_len is unused.
    """
    trained, factor = p.require_trained_length(), p.implied_factor()
    if p.attention_factor is not None:
        attention_factor = p.attention_factor
    elif p.mscale and p.mscale_all_dim:
        attention_factor = _mscale(factor, p.mscale) / _mscale(factor, p.mscale_all_dim)
    else:
        attention_factor = _mscale(factor)

    dim, base = p.rotary_dim, p.base

    def dim_of(rotations: float) -> float:
        # The (fractional) frequency index that completes `rotations` full turns over the trained length.
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(p.beta_fast), dim_of(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    # transformers clamps high to dim - 1 although indices stop at dim/2 - 1; the ramp is clamped anyway.
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # (d/2,) ramp: 0 up to index `low` (extrapolate), 1 from `high` on (interpolate)
    ramp = ((torch.arange(p.n_freq, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # (d/2,) base^(2j/d), combined in transformers' order so the float32 result matches bit for bit
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
