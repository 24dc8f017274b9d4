"""What a loaded transformers model says about its positions: rotary modules, rope config, trained length, head dim.

Every room reads these facts about a model; they live with the models so that no method room imports another
for them.
"""

from __future__ import annotations

from typing import Any

import torch


def rotary_modules(model: Any) -> list[tuple[Any, str, torch.nn.Module]]:
    """(parent, attribute name, module) of every rotary-embedding module of ``model``."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                found.append((parent, attr, child))
    return found


def rope_config(model: Any) -> Any:
    """The text config that owns ``rope_parameters`` (the model config itself for Llama-family models)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def trained_length(model: Any) -> int:
    """The context length the model was trained at (before any RoPE scaling already in its config)."""
    config = rope_config(model)
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def head_dim_of(config: Any) -> int:
    """The attention head dim of a model config: ``head_dim``, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
