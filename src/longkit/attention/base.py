"""Attention methods plug into transformers through ``AttentionInterface`` (no patching).

An :class:`AttentionMethod` either switches the model to an implementation transformers already has
(``eager``, ``sdpa``) or registers its own attention function under ``longkit_<name>`` and selects it
with ``model.set_attn_implementation``. Undo restores the previous implementation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longkit.errors import MethodError
from longkit.methods import Method, Undo


@dataclass
class AttentionMethod(Method):
    """Base of attention methods.

    Subclasses either set ``implementation`` to an existing transformers implementation name, or override
    :meth:`attention`; :meth:`forward`, registered with transformers, has its attention-function signature
    ``(module, query (B, H, T, D), key (B, H_kv, S, D), value (B, H_kv, S, D), attention_mask, scaling,
    dropout, **kwargs) -> (output (B, T, H, D), weights | None)``.
    """

    implementation = ""
    #: The mask format a custom implementation receives: the mask function of this transformers implementation
    #: is registered under the same name. "sdpa": a boolean (B, 1, T, S) mask (True = visible), or None when
    #: plain causal attention suffices. Without a registered mask function transformers passes None even for
    #: padded batches, and padding would be silently ignored.
    mask_format: ClassVar[str] = "sdpa"

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
        """The function registered with transformers: refuses what no method here honours (attention dropout,
        logit softcapping), runs :meth:`attention` and returns its output in transformers' layout."""
        self.reject_unsupported(dropout, kwargs)
        out = self.attention(module, query, key, value, attention_mask, scaling, kwargs)
        # (B, T, H, D_v), the layout transformers' attention functions return
        return out.transpose(1, 2).contiguous(), None

    def attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None, kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """(B, H, T, D_v) output for query (B, H, T, D) and key, value (B, H_kv, S, D); ``kwargs`` are the
        keyword arguments transformers passed (position_ids, sliding_window, ...)."""
        raise NotImplementedError

    def reject_unsupported(self, dropout: float, kwargs: dict[str, Any]) -> None:
        """Refuse what a plain attention kernel cannot honour (attention dropout, logit softcapping)."""
        if dropout:
            raise MethodError(f"attention method '{self.name}' does not support attention dropout (got {dropout})")
        if kwargs.get("softcap") is not None:
            raise MethodError(f"attention method '{self.name}' does not support logit softcapping")

    def implementation_name(self) -> str:
        if self.implementation:
            return self.implementation
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        # One key per parameter setting, so two models using the same method with different settings at
        # once do not share one registered function.
        label = self.label()
        suffix = "" if label == self.name else "_" + hashlib.sha1(label.encode()).hexdigest()[:8]
        name = f"longkit_{self.name}{suffix}"
        # Registering adds a new key to transformers' registries; no existing implementation is replaced.
        AttentionInterface.register(name, self.forward)
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[self.mask_format])
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
