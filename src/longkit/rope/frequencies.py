"""The RoPE frequency registry: pure functions ``name -> (inv_freq, attention_factor)``.

The same contract as transformers' ``ROPE_INIT_FUNCTIONS``, without a config object: each function receives a
validated :class:`RopeParams` and the current sequence length, and returns the float32 inverse frequencies
(``rotary_dim / 2`` of them) and the factor cos/sin are multiplied by. Each function lives in its method's file
(``rope/yarn.py`` holds YaRN's class and its frequencies), registered with ``@register_frequencies("yarn")``.
transformers opens every rope function with a copied preamble (rope_theta, partial_rotary_factor, head_dim,
rotary dim) whose copies have drifted apart; here :class:`RopeParams` is the one place that reads and checks the
inputs, and a method's inputs are its dataclass fields (names are transformers' ``rope_parameters`` names).

>>> inv_freq, attention_factor = longkit.rope.frequencies("yarn", head_dim=128, base=1e4, factor=4,
...                                                       original_max_position_embeddings=4096)
>>> inv_freq, attention_factor = longkit.rope.frequencies_from_config(model.config, seq_len=8192)
>>> inv_freq, attention_factor = longkit.rope.frequencies_from_config(gemma3.config, layer_type="full_attention")
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from longkit.errors import MethodError
from longkit.models.introspect import head_dim_of, per_layer_rope
from longkit.registry import ParamInfo, Registry, check_value, param, params_of, registry


@dataclass
class ModelInputs:
    """The model's own RoPE inputs, read from its config: every frequency function takes them.

    A method's inputs are not listed here: they are its dataclass fields (``Yarn.beta_fast``), declared once.
    """

    head_dim: int = param(ge=2, help="attention head dimension (even)")
    base: float = param(gt=1.0, help="the model's rope_theta")
    partial_rotary_factor: float = param(1.0, gt=0, le=1, help="fraction of head_dim that is rotated")
    max_position_embeddings: int | None = param(
        None, gt=0, help="extended length (the trained length when original_max_position_embeddings is absent)"
    )


def inputs_of(method: str) -> dict[str, ParamInfo]:
    """The inputs of rope method ``method``'s frequency function, with their ranges and defaults.

    The model's (:class:`ModelInputs`), then the method's own parameters (less its ``apply_only`` ones, and
    without a default for its ``required`` ones: transformers requires those keys), then every other rope
    method's parameters, accepted and range-checked but None unless given, so a config passes straight in.
    """
    rope = registry("rope")
    own = rope.get(method)
    out = {p.name: p for p in params_of(ModelInputs)}
    for cls in (own, *(other for _, other in rope.items())):
        for p in params_of(cls):
            if p.name not in out and p.name not in cls.apply_only:
                keep_default = cls is own and p.name not in cls.required
                out[p.name] = p if keep_default else dataclasses.replace(p, default=None)
    return out


class RopeParams:
    """Validated, frozen inputs of one RoPE frequency computation for rope method ``method``.

    Every input of :func:`inputs_of` is an attribute (None when neither given nor defaulted); list inputs are
    tuples of floats, one per frequency. The rotary dim is ``int(head_dim * partial_rotary_factor)`` as in
    transformers, and must be even; the frequencies have ``rotary_dim / 2`` entries. The trained length is
    ``original_max_position_embeddings``, else ``max_position_embeddings`` (transformers' own fallback).
    Unknown names, out-of-range values, an odd head_dim or rotary dim, lists of the wrong length and the
    method's own cross-parameter rules (``HFRopeMethod.check``) raise a ``MethodError`` naming the parameter.
    """

    def __init__(self, method: str, *, head_dim: int, base: float, **params: Any) -> None:
        inputs = inputs_of(method)
        unknown = sorted(set(params) - set(inputs))
        if unknown:
            optional = ", ".join(sorted(set(inputs) - {"head_dim", "base"}))
            raise MethodError(
                f"rope method '{method}' has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"valid parameters: head_dim, base, seq_len, {optional}"
            )
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "_inputs", inputs)
        given = {**params, "head_dim": head_dim, "base": base}
        for name, info in inputs.items():
            value = given.get(name)
            if value is None:
                value = info.default
            elif info.type.startswith("list"):
                value = self._float_tuple(name, value)
            else:
                value = check_value(info, value, "rope", method)
            object.__setattr__(self, name, value)
        if self.head_dim % 2:
            self.fail("head_dim", f"must be even (got {self.head_dim})")
        # transformers truncates, never rounds: int(80 * 0.4) = 32, int(64 * 0.3) = 19.
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2:
            self.fail(
                "partial_rotary_factor",
                f"must make int(head_dim * partial_rotary_factor) an even number >= 2 "
                f"(got int({self.head_dim} * {self.partial_rotary_factor}) = {rotary_dim})",
            )
        object.__setattr__(self, "rotary_dim", rotary_dim)
        for name, info in inputs.items():
            values = getattr(self, name)
            if not info.type.startswith("list") or values is None:
                continue
            if len(values) != self.n_freq:
                self.fail(name, f"needs {self.n_freq} values (rotary_dim / 2), got {len(values)}")
            if not all(math.isfinite(v) and v > 0 for v in values):
                self.fail(name, f"values must be finite and > 0 (got min {min(values)})")
        registry("rope").get(method).check(self)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RopeParams is frozen: cannot set '{name}'")

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._inputs if getattr(self, k) is not None)
        return f"RopeParams({self.method!r}, {given})"

    def _float_tuple(self, key: str, value: Any) -> tuple[float, ...]:
        try:
            if isinstance(value, str | bytes):
                raise TypeError(value)
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            self.fail(key, f"expects a list of floats, got {value!r}")

    @property
    def n_freq(self) -> int:
        """Number of rotary frequencies: rotary_dim / 2."""
        return self.rotary_dim // 2

    @property
    def trained_length(self) -> int | None:
        return self.original_max_position_embeddings or self.max_position_embeddings

    def fail(self, key: str, text: str) -> NoReturn:
        raise MethodError(f"rope method '{self.method}': parameter '{key}' {text}")

    def require(self, key: str) -> Any:
        """The value of an optional parameter this method cannot do without."""
        value = getattr(self, key)
        if value is None:
            info = self._inputs[key]
            raise MethodError(f"rope method '{self.method}' needs parameter '{key}' ({info.range_text()}: {info.help})")
        return value

    def require_trained_length(self) -> int:
        length = self.trained_length
        if length is None:
            raise MethodError(
                f"rope method '{self.method}' needs parameter 'original_max_position_embeddings' "
                "(the trained length, > 0), or 'max_position_embeddings' in its place"
            )
        return length

    def implied_factor(self) -> float:
        """``factor``, else max_position_embeddings / trained length (how DeepSeek-V3 and Phi-3 configs state it)."""
        if self.factor is None and self.max_position_embeddings is not None:
            return self.max_position_embeddings / self.require_trained_length()
        return self.require("factor")

    def inv_freq(self, base: float | None = None) -> torch.Tensor:
        """Unscaled frequencies ``base ** (-2j / rotary_dim)``, float32 as transformers computes them."""
        base = self.base if base is None else base
        # (rotary_dim/2,) exponents 2j/d: int64 arange cast to float32, then a float32 power, as in transformers
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (base**exponent)


#: Build the :class:`RopeParams` of one frequency computation (``params`` are rope_parameters names).
rope_params = RopeParams

FrequencyFn = Callable[[RopeParams, int | None], tuple[torch.Tensor, float]]

#: name -> frequency function; every ``rope`` method has an entry of the same name, its inputs its parameters.
FREQUENCIES = Registry("rope", "rope frequencies", plural="names")
#: Function decorator: ``@register_frequencies("yarn")``.
register_frequencies = FREQUENCIES.register


def frequencies(
    name: str, *, head_dim: int, base: float, seq_len: int | None = None, **params: Any
) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and attention factor of method ``name``, as transformers computes them.

    ``head_dim`` (even, >= 2) and ``base`` (the model's rope_theta, > 1) are required. ``params`` are
    transformers ``rope_parameters`` names (``factor``, ``original_max_position_embeddings``, ``beta_fast``,
    ``short_factor``, ``partial_rotary_factor``...; see :func:`inputs_of`: the ranges are the methods'); every method accepts all
    of them and reads those its maths needs. A config's own ``rope_type`` and ``rope_theta`` keys may be
    passed through: ``rope_type`` must equal ``name``, and ``rope_theta`` must equal ``base`` except for
    ``abf``, whose parameter it is (the new base). ``seq_len`` (>= 1) is the current length: it matters for
    ``dynamic`` (the base grows past the trained length) and ``longrope`` (long factors past it).

    Returns ``(inv_freq, attention_factor)``: a float32 tensor of ``int(head_dim * partial_rotary_factor) / 2``
    entries, and a float; transformers builds ``cos = cat(pos * inv_freq, pos * inv_freq).cos() * attention_factor``.
    """
    fn = FREQUENCIES.get(name)
    params = _drop_config_keys(name, base, params)
    seq_len = _check_seq_len(name, seq_len)
    inv_freq, attention_factor = fn(RopeParams(name, head_dim=head_dim, base=base, **params), seq_len)
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
    # abf's own parameter is rope_theta (the new base); for the others it is the model's base.
    sets_theta = any(p.name == "rope_theta" for p in params_of(registry("rope").get(name)))
    if not sets_theta and params.get("rope_theta") is not None:
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


def frequencies_from_config(
    config: Any, seq_len: int | None = None, *, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """:func:`frequencies` of a transformers config: its ``rope_parameters``, head dim and lengths.

    Reads the keys as transformers does: ``rope_type`` picks the function (default ``default``),
    ``rope_theta`` is the base, ``max_position_embeddings`` comes from the config; ``dynamic`` measures
    growth against ``max_position_embeddings`` only (transformers ignores ``original_max_position_embeddings``
    there), and a top-level ``original_max_position_embeddings`` attribute (Phi-3) wins for llama3, yarn and
    longrope. A config with per-layer-type rope parameters (Gemma 3: ``{"sliding_attention": {...},
    "full_attention": {...}}``) needs ``layer_type``, the key whose parameters to read, as transformers'
    ``rope_init_fn(config, layer_type=...)``; a flat config takes none.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        raise MethodError(f"{type(config).__name__} has no rope_parameters: not a model with rotary embeddings")
    per_type = per_layer_rope(config)
    if per_type is not None:
        valid = [t for t, p in per_type.items() if p is not None]
        if layer_type not in valid:
            got = "none given" if layer_type is None else f"got {layer_type!r}"
            raise MethodError(
                f"{type(config).__name__} has per-layer-type rope parameters: parameter 'layer_type' must be one of "
                f"{', '.join(valid)} ({got})"
            )
        rope = per_type[layer_type]
    elif layer_type is not None:
        raise MethodError(
            f"parameter 'layer_type' applies only to configs with per-layer-type rope parameters; "
            f"{type(config).__name__} has one rope_parameters dict (got layer_type={layer_type!r})"
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
