"""YaRN: NTK-by-parts frequency interpolation plus an attention temperature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod, trained_length


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
    beta_fast, beta_slow: ramp boundaries in rotations, > 0 (32 and 1 in the paper).
    mscale, mscale_all_dim: DeepSeek-style attention-factor terms (optional, > 0).
    attention_factor: explicit cos/sin scale (> 0); default from factor/mscale.
    truncate: round the correction range to whole dimensions (paper behaviour).
    """

    paper = "YaRN (Peng et al. 2023) https://arxiv.org/abs/2309.00071"
    rope_type = "yarn"
    shown = ("factor",)
    factor: float = param(2.0, ge=1.0, help="extension factor")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")
    beta_fast: float = param(32.0, gt=0, help="fast ramp boundary (rotations)")
    beta_slow: float = param(1.0, gt=0, help="slow ramp boundary (rotations)")
    mscale: float | None = param(None, gt=0, help="attention-factor numerator term")
    mscale_all_dim: float | None = param(None, gt=0, help="attention-factor denominator term")
    attention_factor: float | None = param(None, gt=0, help="explicit cos/sin scale")
    truncate: bool = param(True, help="truncate the correction range to integers")

    def rope_parameters(self, model: Any) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings or trained_length(model),
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "attention_factor": self.attention_factor,
            "truncate": self.truncate,
        }
