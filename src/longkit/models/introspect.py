"""What a loaded transformers model says about its positions: rotary modules, rope config, trained length, head dim.

Every room reads these facts about a model; they live with the models so that no method room imports another
for them.
"""

from __future__ import annotations

from typing import Any

import torch


def rotary_modules(model: Any, *, per_layer_type: bool = False) -> list[tuple[Any, str, torch.nn.Module]]:
    """(parent, attribute name, module) of every rotary-embedding module of ``model`` that holds one ``inv_freq``.

    ``per_layer_type=True`` also finds the modules of models whose rope parameters are given per layer type
    (Gemma 3's one module holds ``sliding_attention_inv_freq`` and ``full_attention_inv_freq`` and takes the
    layer type in its forward); callers that read ``module.inv_freq`` must not ask for those.
    """
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if not type(child).__name__.endswith("RotaryEmbedding"):
                continue
            if hasattr(child, "inv_freq") or (per_layer_type and _per_type_buffers(child)):
                found.append((parent, attr, child))
    return found


def _per_type_buffers(module: torch.nn.Module) -> bool:
    # transformers' per-layer-type rotary modules keep a dict rope_type and one buffer per layer type.
    types = getattr(module, "rope_type", None)
    return isinstance(types, dict) and bool(types) and all(hasattr(module, f"{t}_inv_freq") for t in types)


def per_layer_rope(config: Any) -> dict[str, dict | None] | None:
    """The per-layer-type ``rope_parameters`` of a text config (``{"sliding_attention": {...}, "full_attention":
    {...}}``, Gemma 3's layout), or None when the config has one flat dict (or none)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return None
    if all(isinstance(v, dict) or v is None for v in params.values()) and any(isinstance(v, dict) for v in params.values()):
        return params
    return None


def rope_config(model: Any) -> Any:
    """The text config that owns ``rope_parameters`` (the model config itself for Llama-family models)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def trained_length(model: Any) -> int:
    """The context length the model was trained at (before any RoPE scaling already in its config)."""
    config = rope_config(model)
    per_type = per_layer_rope(config)
    if per_type is not None:
        # A per-layer-type model states a scaled type's trained length in that type's parameters.
        stated = [p.get("original_max_position_embeddings") for p in per_type.values() if p]
        return int(max((s for s in stated if s), default=config.max_position_embeddings))
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def head_dim_of(config: Any) -> int:
    """The attention head dim of a model config: ``head_dim``, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
