"""The ``longlora`` recipe: LoRA+ (LoRA on attention with trainable embeddings and norms) under S²-Attn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longkit.errors import MethodError
from longkit.registry import param
from longkit.train.recipes import Recipe, register_recipe

#: Module-name endings trained in full (peft ``modules_to_save`` matches names ending so): LongLoRA's default
#: ``trainable_params="embed,norm"`` (its ``supervised-fine-tune.py``/``fine-tune.py``), spelled for the
#: Llama-style names (``embed_tokens``; ``input_layernorm``, ``post_attention_layernorm``, ``norm``).
EXTRA_TRAINABLE = ["embed_tokens", "norm"]


@register_recipe("longlora")
@dataclass
class LongLoRA(Recipe):
    """LongLoRA: shifted sparse attention (S²-Attn) during training, LoRA+ (LoRA on q/k/v/o with the input
    embeddings and every normalisation layer trained in full), full attention in the saved model.

    S²-Attn is the ``s2_attn`` attention method (groups of ``group_size_ratio`` of the row; half of the heads
    shifted by half a group, without the reference's wrap-around leak), applied by the run while the model is
    in training mode; the saved model has no trace of it and runs full attention, as the paper evaluates.
    Packed rows keep their document masks inside the groups. The LoRA adapters and the trained embeddings and
    norms are merged into the saved model (peft's adapter, with the embeddings and norms, is kept under
    ``adapter/``). The paper's table: without trainable embeddings and norms LoRA does not close the gap to
    full fine-tuning at long context. Based on https://arxiv.org/abs/2309.12307.

    Parameters: group_size_ratio: float in (0, 1], S²-Attn's group size as a fraction of the row (default
    0.25); lora (default true; false: full fine-tuning under S²-Attn); and those of every recipe
    (:class:`~longkit.train.recipes.Recipe`).
    """

    paper = "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (Chen et al. ICLR 2024) https://arxiv.org/abs/2309.12307"
    lora: bool = param(True, help="LoRA+ adapters (false: full fine-tuning under S2-Attn)")
    group_size_ratio: float = param(0.25, gt=0.0, le=1.0, help="S2-Attn group size as a fraction of the row")

    def attention(self) -> str | None:
        return f"s2_attn:group_size_ratio={self.group_size_ratio}"

    def extra_trainable(self) -> list[str]:
        return list(EXTRA_TRAINABLE) if self.lora else []

    def wrap(self, model: Any) -> Any:
        if self.lora:
            names = [n for n, _ in model.named_modules()]
            missing = [e for e in EXTRA_TRAINABLE if not any(n.endswith(e) for n in names)]
            if missing:
                raise MethodError(f"training recipe '{self.name}': {type(model).__name__} has no module named "
                                  f"*{', *'.join(missing)} (LoRA+ trains the embeddings and norms); use "
                                  "continual:lora=true with --attention s2_attn instead")
        return super().wrap(model)
