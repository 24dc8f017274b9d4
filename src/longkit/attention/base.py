"""Attention methods plug into transformers through ``AttentionInterface`` (no patching).

An :class:`AttentionMethod` either switches the model to an implementation transformers already has
(``eager``, ``sdpa``) or registers its own attention function under ``longkit_<name>`` and selects it
with ``model.set_attn_implementation``. Undo restores the previous implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longkit.errors import MethodError
from longkit.methods import Method, Undo


@dataclass
class AttentionMethod(Method):
    """Base of attention methods.

    Subclasses either set ``implementation`` to an existing transformers implementation name, or override
    :meth:`forward` with transformers' attention-function signature
    ``(module, query (B, H, T, D), key (B, H_kv, S, D), value (B, H_kv, S, D), attention_mask, scaling,
    dropout, **kwargs) -> (output (B, T, H, D), weights | None)``.
    """

    implementation = ""

    def forward(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def implementation_name(self) -> str:
        if self.implementation:
            return self.implementation
        from transformers import AttentionInterface

        name = f"longkit_{self.name}"
        # Registering adds a new key to transformers' registry; no existing implementation is replaced.
        AttentionInterface.register(name, self.forward)
        return name

    def apply(self, model: Any) -> Undo:
        if not hasattr(model, "set_attn_implementation"):
            raise MethodError(f"attention method '{self.name}' needs a transformers PreTrainedModel")
        previous = model.config._attn_implementation
        model.set_attn_implementation(self.implementation_name())
        if model.config._attn_implementation != self.implementation_name():
            raise MethodError(
                f"attention method '{self.name}': {type(model).__name__} does not support switching its attention "
                "implementation through AttentionInterface"
            )

        def undo() -> None:
            model.set_attn_implementation(previous)

        return undo
