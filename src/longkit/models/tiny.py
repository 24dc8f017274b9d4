"""Tiny random models built from configs with a fixed seed (tests and quick experiments)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from longkit.models.tokenizer import VOCAB_SIZE, byte_tokenizer

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(**_COMMON)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**_COMMON)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(**{**_COMMON, "head_dim": 16})


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**{**_COMMON, "sliding_window": None})


def _gemma3():
    """Gemma 3's text model in small: sliding-window and full-attention layers (three sliding, then one full, as
    the real model's five-to-one pattern), a window of 16 tokens, per-layer-type ``rope_parameters``."""
    from transformers import Gemma3TextConfig

    common = {k: v for k, v in _COMMON.items() if k != "rope_parameters"}
    return Gemma3TextConfig(
        **{**common, "num_hidden_layers": 4, "head_dim": 16, "query_pre_attn_scalar": 16},
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=16,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    )


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "tiny-llama": _llama,
    "tiny-qwen2": _qwen2,
    "tiny-qwen3": _qwen3,
    "tiny-mistral": _mistral,
    "tiny-gemma3": _gemma3,
}


def tiny_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for a tiny alias; the weights depend only on ``seed`` (global RNG untouched)."""
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS[name]()
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval(), byte_tokenizer()
