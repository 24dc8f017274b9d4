"""The RoPE frequency registry: pure functions ``name -> (inv_freq, attention_factor)``.

The same contract as transformers' ``ROPE_INIT_FUNCTIONS``, without a config object: each function receives a
validated :class:`~longkit.rope.params.RopeParams` and the current sequence length, and returns the float32
inverse frequencies (``rotary_dim / 2`` of them) and the factor cos/sin are multiplied by. Each function lives
in its method's file (``rope/yarn.py`` holds YaRN's class and its frequencies), registered with
``@register_frequencies("yarn")``.

>>> inv_freq, attention_factor = longkit.rope.frequencies("yarn", head_dim=128, base=1e4, factor=4,
...                                                       original_max_position_embeddings=4096)
>>> inv_freq, attention_factor = longkit.rope.frequencies_from_config(model.config, seq_len=8192)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from longkit.errors import MethodError
from longkit.models.introspect import head_dim_of
from longkit.rope.params import RopeParams, rope_params

FrequencyFn = Callable[[RopeParams, int | None], tuple[torch.Tensor, float]]

#: name -> frequency function; every ``rope`` method of the seam has an entry of the same name.
FREQUENCIES: dict[str, FrequencyFn] = {}
# Methods whose own parameter is a new ``rope_theta`` (abf); for the others ``rope_theta`` is the model's base.
_SETS_THETA: set[str] = set()


def register_frequencies(name: str, *, sets_theta: bool = False) -> Callable[[FrequencyFn], FrequencyFn]:
    """Function decorator: ``@register_frequencies("yarn")``. ``sets_theta``: ``rope_theta`` is the new base."""

    def deco(fn: FrequencyFn) -> FrequencyFn:
        if name in FREQUENCIES and FREQUENCIES[name] is not fn:
            raise MethodError(f"rope frequencies '{name}' are already registered by {FREQUENCIES[name]}")
        FREQUENCIES[name] = fn
        if sets_theta:
            _SETS_THETA.add(name)
        return fn

    return deco


def frequencies(
    name: str, *, head_dim: int, base: float, seq_len: int | None = None, **params: Any
) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and attention factor of method ``name``, as transformers computes them.

    ``head_dim`` (even, >= 2) and ``base`` (the model's rope_theta, > 1) are required. ``params`` are
    transformers ``rope_parameters`` names (``factor``, ``original_max_position_embeddings``, ``beta_fast``,
    ``short_factor``, ``partial_rotary_factor``...; ranges in :class:`RopeParams`); every method accepts all
    of them and reads those its maths needs. A config's own ``rope_type`` and ``rope_theta`` keys may be
    passed through: ``rope_type`` must equal ``name``, and ``rope_theta`` must equal ``base`` except for
    ``abf``, whose parameter it is (the new base). ``seq_len`` (>= 1) is the current length: it matters for
    ``dynamic`` (the base grows past the trained length) and ``longrope`` (long factors past it).

    Returns ``(inv_freq, attention_factor)``: a float32 tensor of ``int(head_dim * partial_rotary_factor) / 2``
    entries, and a float; transformers builds ``cos = cat(pos * inv_freq, pos * inv_freq).cos() * attention_factor``.
    """
    if name not in FREQUENCIES:
        raise MethodError(f"unknown rope frequencies '{name}'; valid names: {', '.join(sorted(FREQUENCIES))}")
    params = _drop_config_keys(name, base, params)
    seq_len = _check_seq_len(name, seq_len)
    p = rope_params(name, head_dim=head_dim, base=base, **params)
    inv_freq, attention_factor = FREQUENCIES[name](p, seq_len)
    return inv_freq, float(attention_factor)


def _drop_config_keys(name: str, base: float, params: dict[str, Any]) -> dict[str, Any]:
    """Check and remove a config's ``rope_type`` (and ``rope_theta``, unless it is the method's parameter)."""
    params = dict(params)
    rope_type = params.pop("rope_type", None)
    if rope_type is not None and rope_type != name:
        raise MethodError(
            f"rope method '{name}': parameter 'rope_type' must be '{name}' or absent (got {rope_type!r}); "
            "use frequencies_from_config to follow a config's rope_type"
        )
    if name not in _SETS_THETA and params.get("rope_theta") is not None:
        theta = params.pop("rope_theta")
        if theta != base:
            raise MethodError(
                f"rope method '{name}': parameter 'rope_theta' must equal base={base!r} or be absent (got {theta!r})"
            )
    return params


def _check_seq_len(name: str, seq_len: Any) -> int | None:
    if seq_len is None:
        return None
    try:
        # transformers' runtime path holds seq_len as a 0-d tensor (max position + 1)
        value = -1 if isinstance(seq_len, bool) else operator.index(
            seq_len.item() if isinstance(seq_len, torch.Tensor) else seq_len
        )
    except (TypeError, ValueError, RuntimeError):
        value = -1
    if value < 1:
        raise MethodError(f"rope method '{name}': parameter 'seq_len' must be an int >= 1 or None (got {seq_len!r})")
    return value


def frequencies_from_config(config: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """:func:`frequencies` of a transformers config: its ``rope_parameters``, head dim and lengths.

    Reads the keys as transformers does: ``rope_type`` picks the function (default ``default``),
    ``rope_theta`` is the base, ``max_position_embeddings`` comes from the config; ``dynamic`` measures
    growth against ``max_position_embeddings`` only (transformers ignores ``original_max_position_embeddings``
    there), and a top-level ``original_max_position_embeddings`` attribute (Phi-3) wins for llama3, yarn and
    longrope. Per-layer-type (nested) rope parameters are not supported.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        raise MethodError(f"{type(config).__name__} has no rope_parameters: not a model with rotary embeddings")
    if any(isinstance(v, dict) for v in rope.values()):
        raise MethodError(
            f"{type(config).__name__} has per-layer-type rope parameters ({', '.join(rope)}); "
            "pass one of them to frequencies() instead"
        )
    params = dict(rope)
    name = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    base = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or config.default_theta
    if params.get("partial_rotary_factor") is None and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    if name == "dynamic":
        params.pop("original_max_position_embeddings", None)
    elif name in ("llama3", "yarn", "longrope") and getattr(config, "original_max_position_embeddings", None):
        params["original_max_position_embeddings"] = config.original_max_position_embeddings
    params.setdefault("max_position_embeddings", getattr(config, "max_position_embeddings", None))
    return frequencies(name, head_dim=head_dim_of(config), base=base, seq_len=seq_len, **params)
