"""ABF: adjusted base frequency, a new RoPE base (rope_theta) for long-context continual training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies

#: The base Xiong et al. raised Llama 2's 10,000 to.
ABF_THETA = 500_000.0


@register_frequencies("abf")
def abf_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """ABF frequencies: the default formula at the new base ``rope_theta`` (``base`` is the model's old one).

    A larger base slows every frequency but the first, so distant positions stay apart; the model is then
    trained at the long length. Based on https://arxiv.org/abs/2309.16039. Parameters: rope_theta (> 1;
    default 500000); attention factor 1; seq_len is unused.
    """
    return p.inv_freq(p.rope_theta), 1.0


@register("rope", "abf")
@dataclass
class Abf(HFRopeMethod):
    """Adjusted base frequency: the RoPE base replaced by ``rope_theta`` (Llama 2 Long: 10,000 -> 500,000).

    Every frequency but the first slows down, so attention decays less with distance; meant for continual
    pre-training at the long length. Applied through transformers as rope_type ``default`` with the new
    ``rope_theta``. Based on Xiong et al. 2023, Effective Long-Context Scaling of Foundation Models
    (https://arxiv.org/abs/2309.16039).

    Parameters
    ----------
    rope_theta: the new base, > 1 (500000 in the paper).
    """

    paper = "Effective Long-Context Scaling (Xiong et al. 2023) https://arxiv.org/abs/2309.16039"
    rope_type = "default"
    shown = ("rope_theta",)
    rope_theta: float = param(ABF_THETA, gt=1.0, help="new RoPE base")
