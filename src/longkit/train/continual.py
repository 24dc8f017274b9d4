"""Continual training at the target length with a RoPE method trained in (ABF, PI, YaRN, LongRoPE, NTK...)."""

from __future__ import annotations

from dataclasses import dataclass

from longkit.train.recipes import Recipe, register_recipe


@register_recipe("continual")
@dataclass
class Continual(Recipe):
    """Continual pre-training (full or LoRA) on packed long documents at the target length, under any RoPE method.

    The rows are packed to the target length with per-document attention (position ids restart per document,
    as ProLong trains); the RoPE method given with ``--rope`` is applied during training and its parameters are
    written into the saved ``config.json``, so the saved model runs the method with plain transformers. Based on
    Xiong et al. 2023 (ABF, https://arxiv.org/abs/2309.16039) and Gao et al. 2024, How to Train Long-Context
    Language Models (Effectively) (ProLong, https://arxiv.org/abs/2410.02660).

    Parameters: those of every recipe (learning rate, batch, LoRA; see :class:`~longkit.train.recipes.Recipe`).
    """

    paper = "Effective Long-Context Scaling (Xiong et al. 2023) https://arxiv.org/abs/2309.16039; ProLong (Gao et al. 2024) https://arxiv.org/abs/2410.02660"
