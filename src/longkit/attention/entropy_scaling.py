"""Entropy-aware attention scaling (the scaling half of Entropy-Aware ABF): log-n scaling from layer 3 on.

Zhang et al. 2024 observe that the first two layers keep an almost unchanged attention pattern as the context
grows, so they scale the logits by ``max(1, log_L n)`` in every layer except those two. Combined with the rope
method ``abf`` (base 500000) it is their Entropy-Aware ABF:
``longkit.apply(model, rope="abf", rope_args={"rope_theta": 5e5}, attention="entropy_scaling")``.
"""

from __future__ import annotations

from dataclasses import dataclass

from longkit.attention.logn import LogN
from longkit.registry import param, register


@register("attention", "entropy_scaling")
@dataclass
class EntropyScaling(LogN):
    """Entropy-aware attention scaling: log-n query scaling ``max(1, log_L n)`` in all but the first two layers.

    The query logits at 1-based position n are multiplied by ``max(1, log n / log L)`` (L the trained length)
    in layers ``skip_layers`` and up; the first layers, whose attention does not depend on the context length,
    are left as they are. Compose with ``rope=abf`` (``rope_theta`` 500000) for Entropy-Aware ABF. Based on
    Zhang et al. 2024, Extending LLMs' Context Window with 100 Samples, https://arxiv.org/abs/2401.07004
    (``GAIR-NLP/Entropy-ABF``, ``patch/EABF.py``: scale ``log(p + 1) / log(4096)`` clamped at 1, first 2 layers
    unscaled).

    Parameters:
        trained: int >= 2 or None, L (default None: the model's trained length).
        skip_layers: int >= 0, the first layers left unscaled (default 2, the paper's choice).
        inner: "sdpa" or "blockwise", the attention kernel run on the scaled queries (default "sdpa").
        block_q, block_k: int >= 16, tile edges when ``inner`` is "blockwise".
    """

    paper = "Extending LLMs' Context Window with 100 Samples (Zhang et al. 2024) https://arxiv.org/abs/2401.07004"
    skip_layers: int = param(2, ge=0, help="leave the first this many layers unscaled (the paper: 2)")
