"""Attention methods plug into transformers through ``AttentionInterface`` (no patching).

An :class:`AttentionMethod` either switches the model to an implementation transformers already has
(``eager``, ``sdpa``) or registers its own attention function under ``longkit_<name>`` and selects it
with ``model.set_attn_implementation``. Undo restores the previous implementation. Also here: the input
checks every attention function shares (:func:`check_qkv`, :func:`check_args`, :func:`transformers_inputs`)
and :class:`BoundAttention`, the base of methods that read something from the model they are applied to.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longkit.attention.masks import MaskSpec
from longkit.errors import MethodError
from longkit.methods import Method, Undo
from longkit.registry import params_of


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Check attention inputs and return ``(B, H, H_kv, T, S, D)``; errors name the tensor and the rule."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise MethodError(
            f"attention: 'query' (B, H, T, D), 'key' and 'value' (B, H_kv, S, D) must be 4-D; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[-1] != D:
        raise MethodError(
            f"attention: 'key' must be (B, H_kv, S, D) and 'value' (B, H_kv, S, D_v) with B = {B}, D = {D}; got "
            f"key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    H_kv, S = k.shape[1], k.shape[2]
    if H % H_kv:
        raise MethodError(f"attention: query heads H = {H} must be a multiple of key/value heads H_kv = {H_kv}")
    return B, H, H_kv, T, S, D


def check_args(cls: type, where: str | None = None, /, **values: Any) -> None:
    """Check the arguments of a method's plain function against the ranges ``cls`` declares for those fields.

    The :func:`longkit.registry.param` declaration is the one statement of a range: the registry checks it when
    a method is built, this when its function is called directly. Ints must be ints, floats any real number;
    None is never accepted. ``where`` names the method in the message when the field is another method's (the
    ``trained`` length of ReRoPE's log-n scaling is :class:`LogN`'s).
    """
    declared = {p.name: p for p in params_of(cls)}
    for name, value in values.items():
        p = declared[name]
        integral = p.type.startswith("int")
        ok = not isinstance(value, bool) and isinstance(value, int if integral else int | float)
        if not ok or not p.in_range(value):
            raise MethodError(
                f"{where or cls.name} attention: parameter '{name}' must be {'an int' if integral else 'a number'} "
                f"{p.range_text()} (got {value!r})"
            )


def layer_window(module: torch.nn.Module, kwargs: dict[str, Any]) -> int | None:
    """The sliding window of the layer an attention call is for, None on a full-attention layer.

    transformers passes each layer's own window as the call's ``sliding_window`` (Gemma 3, Mistral and Qwen2 pass
    None on their full-attention layers); the module's attribute is the fallback for models that do not.
    """
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    return window or None


def sliding_layer_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None, dropout: float, kwargs: dict[str, Any],
) -> torch.Tensor:
    """A sliding-window layer's own attention, (B, T, H, D_v): transformers' sdpa function with the call's
    (sdpa-format) mask, which already holds the window, so the layer computes exactly what the model does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return out


def transformers_inputs(method: AttentionMethod, module, query, key, attention_mask, kwargs) -> torch.Tensor | None:
    """The padding mask a transformers attention call carries, as ``dense`` for methods that are causal by
    construction (sparse methods, position remaps); a non-causal or sliding-window layer is refused (through
    :meth:`AttentionMethod.forward` sliding-window layers never get here: they keep the model's attention)."""
    if layer_window(module, kwargs) is not None:
        raise MethodError(f"attention method '{method.name}' does not support sliding-window attention layers")
    spec = MaskSpec.from_transformers(module, query, key, attention_mask, **kwargs)
    if spec.window is not None:
        raise MethodError(f"attention method '{method.name}' does not support sliding-window attention layers")
    if not spec.causal and spec.dense is None:
        raise MethodError(f"attention method '{method.name}' needs causal attention")
    return spec.dense


def layer_type_of(module: torch.nn.Module) -> str | None:
    """The ``config.layer_types`` entry of an attention module ("full_attention", "sliding_attention"), None for
    models whose layers are all alike."""
    kind = getattr(module, "layer_type", None)
    if kind is None:
        types = getattr(getattr(module, "config", None), "layer_types", None)
        layer = getattr(module, "layer_idx", None)
        kind = types[layer] if types is not None and layer is not None and layer < len(types) else None
    return kind


def find_rotary(model: Any) -> list[tuple[Any, str]]:
    """(parent, attribute) of every rotary-embedding module of ``model``: one ``inv_freq`` (Llama family) or one
    ``<layer type>_inv_freq`` per layer type (Gemma 3, whose rotary module serves every layer)."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and any(
                n == "inv_freq" or n.endswith("_inv_freq") for n, _ in child.named_buffers(recurse=False)
            ):
                found.append((parent, attr))
    return found


def layer_inv_freq(method: AttentionMethod, rotary: torch.nn.Module, module: torch.nn.Module) -> torch.Tensor:
    """The RoPE inverse frequencies the attention layer ``module`` was rotated with: its layer type's
    ``<type>_inv_freq`` where the rotary module keeps one per type, else the shared ``inv_freq``."""
    kind = layer_type_of(module)
    inv_freq = getattr(rotary, f"{kind}_inv_freq", None) if kind else None
    if inv_freq is None:
        inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise MethodError(
            f"attention method '{method.name}': {type(rotary).__name__} has no inverse frequencies for "
            f"{kind or 'this'} layer"
        )
    return inv_freq


def full_layer_trained_length(model: Any) -> int:
    """The trained context length of the model's full-attention layers (what a method acts on): the
    ``full_attention`` entry of per-layer-type ``rope_parameters`` (Gemma 3), else the model's."""
    from longkit.models.introspect import rope_config, trained_length

    config = rope_config(model)
    params = getattr(config, "rope_parameters", None) or {}
    full = params.get("full_attention") if isinstance(params.get("full_attention"), dict) else None
    if full is None:
        return trained_length(model)
    return int(full.get("original_max_position_embeddings") or config.max_position_embeddings)


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
    #: Whether the method computes sliding-window layers itself. False (most methods): a method acts on the
    #: full-attention layers of models whose layers differ (Gemma 3, Qwen2 with max_window_layers), and a
    #: sliding-window layer keeps the model's own attention: its window already bounds its cost and its
    #: positions, and a remap or a sparse pattern there would change what the model was trained to see.
    own_sliding_layers: ClassVar[bool] = False
    #: Whether the method computes full-attention layers exactly as transformers' sdpa and changes only how
    #: sliding-window layers are computed (``sliding_window``): a KV method may then wrap it, taking the
    #: full-attention layers over (:func:`longkit.kvcache.hook.install`) and leaving the sliding layers to it.
    full_layers_sdpa: ClassVar[bool] = False

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
        logit softcapping), runs :meth:`attention` and returns its output in transformers' layout. Sliding-window
        layers run the model's own attention unless the method computes them itself (``own_sliding_layers``)."""
        if not self.own_sliding_layers and layer_window(module, kwargs) is not None:
            if self.mask_format != "sdpa":
                raise MethodError(
                    f"attention method '{self.name}' receives '{self.mask_format}' masks and cannot hand a "
                    "sliding-window layer to the model's attention"
                )
            return sliding_layer_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs), None
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

    def registration_key(self) -> str:
        """What tells this method's registered attention functions apart: its parameter setting."""
        return self.label()

    def implementation_name(self) -> str:
        if self.implementation:
            return self.implementation
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        # One key per parameter setting, so two models using the same method with different settings at
        # once do not share one registered function.
        label = self.registration_key()
        suffix = "" if label == self.name else "_" + hashlib.sha1(label.encode()).hexdigest()[:8]
        name = f"longkit_{self.name}{suffix}"
        # Registering adds a new key to transformers' registries; no existing implementation is replaced.
        AttentionInterface.register(name, self.forward)
        AttentionMaskInterface.register(name, self.mask_function() or ALL_MASK_ATTENTION_FUNCTIONS[self.mask_format])
        return name

    def mask_function(self) -> Any:
        """The mask function transformers calls for this method's implementation; None = the one of
        ``mask_format`` (a method overrides it to skip masks it builds itself, ``sliding_window``)."""
        return None

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


@dataclass
class BoundAttention(AttentionMethod):
    """Base of attention methods that read something from the model they are applied to (its rotary module,
    its trained length): :meth:`bind` keeps it on this instance per attention module of the model, and
    :meth:`bound` reads it when transformers calls the attention function. Each instance registers its own
    attention function, so two instances, even with equal settings, never read each other's models.
    """

    _bound: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    def registration_key(self) -> str:
        return f"{self.label()}@{id(self):x}"

    def bind(self, model: Any, state: Any) -> Undo:
        """Keep ``state`` for every module of ``model``, then switch its attention; the undo forgets both."""
        modules = list(model.modules())
        for m in modules:
            self._bound[m] = state
        undo_impl = AttentionMethod.apply(self, model)

        def undo() -> None:
            undo_impl()
            for m in modules:
                self._bound.pop(m, None)

        return undo

    def bound(self, module: torch.nn.Module) -> Any:
        """What :meth:`bind` kept for the model ``module`` belongs to."""
        if module not in self._bound:
            raise MethodError(f"attention method '{self.name}' was called for a model it was not applied to")
        return self._bound[module]
