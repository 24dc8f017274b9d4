"""The one shared preamble of the RoPE frequency functions: a typed, validated parameter object.

transformers opens every rope function with a copied preamble (rope_theta, partial_rotary_factor, head_dim,
rotary dim) whose copies have drifted apart. Here :func:`rope_params` is the only place that reads and checks
those inputs; each frequency function receives the resulting :class:`RopeParams` and holds only its own maths.
Parameter names are transformers' ``rope_parameters`` names, so a model's config can be passed straight in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from longkit.errors import MethodError
from longkit.registry import ParamInfo, check_params, param, params_of


@dataclass(frozen=True)
class RopeParams:
    """Validated inputs of one RoPE frequency computation, for the method named ``method``.

    The rotary dim is ``int(head_dim * partial_rotary_factor)`` as in transformers, and must be even; the
    frequencies have ``rotary_dim / 2`` entries. The trained length is ``original_max_position_embeddings``,
    else ``max_position_embeddings`` (transformers' own fallback). Optional parameters are None when not given.
    """

    method: str
    head_dim: int = param(ge=2, help="attention head dimension (even)")
    base: float = param(gt=1.0, help="the model's rope_theta")
    partial_rotary_factor: float = param(1.0, gt=0, le=1, help="fraction of head_dim that is rotated")
    factor: float | None = param(None, ge=1.0, help="context extension factor")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length")
    max_position_embeddings: int | None = param(
        None, gt=0, help="extended length (the trained length when original_max_position_embeddings is absent)"
    )
    attention_factor: float | None = param(None, gt=0, help="explicit cos/sin scale")
    beta_fast: float = param(32.0, gt=0, help="yarn: rotations above which a frequency is kept")
    beta_slow: float = param(1.0, gt=0, help="yarn: rotations below which a frequency is interpolated")
    mscale: float | None = param(None, ge=0, help="yarn: attention-factor numerator term (0 = off)")
    mscale_all_dim: float | None = param(None, ge=0, help="yarn: attention-factor denominator term (0 = off)")
    truncate: bool = param(True, help="yarn: round the ramp boundaries to whole dimensions")
    short_factor: tuple[float, ...] | None = param(None, help="longrope: per-frequency factors up to the trained length")
    long_factor: tuple[float, ...] | None = param(None, help="longrope: per-frequency factors beyond it")
    low_freq_factor: float | None = param(None, gt=0, help="llama3: low band edge (1 for Llama 3.1)")
    high_freq_factor: float | None = param(None, gt=0, help="llama3: high band edge (4 for Llama 3.1)")
    rope_theta: float | None = param(None, gt=1.0, help="abf: the new base")
    rotary_dim: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for key in ("short_factor", "long_factor"):
            object.__setattr__(self, key, self._float_tuple(key, getattr(self, key)))
        check_params(self, kind="rope", name=self.method)
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
        for key in ("short_factor", "long_factor"):
            values = getattr(self, key)
            if values is None:
                continue
            if len(values) != self.n_freq:
                self.fail(key, f"needs {self.n_freq} values (rotary_dim / 2), got {len(values)}")
            if not all(math.isfinite(v) and v > 0 for v in values):
                self.fail(key, f"values must be finite and > 0 (got min {min(values)})")

    def _float_tuple(self, key: str, value: Any) -> tuple[float, ...] | None:
        if value is None:
            return None
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
            info = _INFO[key]
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


_INFO: dict[str, ParamInfo] = {p.name: p for p in params_of(RopeParams)}
#: The keyword parameters every frequency function accepts (each reads only those its maths needs).
OPTIONAL_PARAMS: tuple[str, ...] = tuple(name for name in _INFO if name not in ("method", "head_dim", "base"))


def rope_params(method: str, *, head_dim: int, base: float, **params: Any) -> RopeParams:
    """Build and validate the :class:`RopeParams` of one frequency computation (the single shared preamble).

    ``params`` are transformers ``rope_parameters`` names (see ``OPTIONAL_PARAMS``); None means "not given".
    Unknown names, out-of-range values, an odd head_dim or rotary dim, and longrope lists of the wrong length
    raise a ``MethodError`` naming the parameter and its valid range.
    """
    unknown = sorted(set(params) - set(OPTIONAL_PARAMS))
    if unknown:
        raise MethodError(
            f"rope method '{method}' has no parameter {', '.join(repr(u) for u in unknown)}; "
            f"valid parameters: head_dim, base, seq_len, {', '.join(sorted(OPTIONAL_PARAMS))}"
        )
    given = {key: value for key, value in params.items() if value is not None}
    return RopeParams(method, head_dim=head_dim, base=base, **given)
