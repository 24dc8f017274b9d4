"""LongRoPE: searched per-dimension rescale factors, a short set and a long set."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longkit.errors import MethodError
from longkit.methods import Undo
from longkit.models.introspect import head_dim_of, rope_config, rotary_modules, trained_length
from longkit.registry import param, register
from longkit.rope.base import HFRopeMethod
from longkit.rope.frequencies import RopeParams, register_frequencies


@register("rope", "longrope")
@dataclass
class LongRope(HFRopeMethod):
    """LongRoPE: frequency i divided by short_factor[i] up to the trained length, by long_factor[i] beyond it,
    and cos/sin scaled by sqrt(1 + ln(factor)/ln(L)); optionally the first n positions keep the model's own RoPE.

    Based on Ding et al. 2024, LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens
    (https://arxiv.org/abs/2402.13753); transformers rope_type ``longrope``.

    Parameters
    ----------
    short_factor, long_factor: one factor >= 1 per rotary frequency (head_dim/2 values); on the CLI as
        ``[1,1.5,...]`` or ``1;1.5;...``.
    config: a JSON file holding them (a rope-parameters dict, or a model config with ``rope_parameters``), such
        as ``longkit rope search`` writes; its ``rope_theta``, when present, must be the model's.
    factor: target length / trained length (>= 1); sets the attention factor.
    original_max_position_embeddings: trained length L (> 0); default: the model's.
    attention_factor: explicit cos/sin scale (> 0).
    start_tokens: the first n positions (>= 0) keep the model's original cos/sin, un-interpolated and unscaled
        (LongRoPE's n-hat); default 0, or the config file's ``start_tokens``. transformers has no such setting:
        it is applied here by a forward hook on the rotary module, and ignored if the rope parameters are
        loaded into transformers directly.
    """

    paper = "LongRoPE (Ding et al. 2024) https://arxiv.org/abs/2402.13753"
    rope_type = "longrope"
    apply_only = ("config", "start_tokens")
    short_factor: list[float] | None = param(None, help="per-frequency factors up to the trained length")
    long_factor: list[float] | None = param(None, help="per-frequency factors beyond the trained length")
    config: str | None = param(None, file=True, help="JSON file with short_factor/long_factor")
    factor: float | None = param(None, ge=1.0, help="target length / trained length")
    original_max_position_embeddings: int | None = param(None, gt=0, help="trained length (default: model's)")
    attention_factor: float | None = param(None, gt=0, help="explicit cos/sin scale")
    start_tokens: int | None = param(None, ge=0, help="first n positions keep the original RoPE (default: file's or 0)")

    def _load_config(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the file's rope-parameters dict, the whole file) of ``config``; both empty without one."""
        if self.config is None:
            return {}, {}
        path = Path(self.config)
        if not path.is_file():
            raise MethodError(f"rope method 'longrope': parameter 'config' names no file: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MethodError(f"rope method 'longrope': parameter 'config' is not a JSON file: {path}: {err}") from None
        if not isinstance(data, dict):
            raise MethodError(f"rope method 'longrope': parameter 'config' must hold a JSON object: {path}")
        loaded = data.get("rope_parameters") or data.get("rope_scaling") or data
        if not isinstance(loaded, dict):
            raise MethodError(
                f"rope method 'longrope': parameter 'config': 'rope_parameters' is not an object in {path}"
            )
        return loaded, data

    def n_start_tokens(self) -> int:
        """The number of leading positions that keep the model's original RoPE (``start_tokens``, else the file's)."""
        if self.start_tokens is not None:
            return self.start_tokens
        _, data = self._load_config()
        value = data.get("start_tokens", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MethodError(
                f"rope method 'longrope': parameter 'config': 'start_tokens' must be an int >= 0 (got {value!r})"
            )
        return value

    def _factors(self) -> dict[str, Any]:
        loaded, _ = self._load_config()
        out = {
            "short_factor": self.short_factor or loaded.get("short_factor"),
            "long_factor": self.long_factor or loaded.get("long_factor"),
        }
        for key in ("factor", "original_max_position_embeddings", "attention_factor"):
            out[key] = getattr(self, key) or loaded.get(key)
        if out["short_factor"] is None or out["long_factor"] is None:
            raise MethodError(
                "rope method 'longrope' needs short_factor and long_factor (head_dim/2 floats each) or config=FILE"
            )
        return out

    def rope_parameters(self, model: Any, old: dict[str, Any]) -> dict[str, Any]:
        config = rope_config(model)
        half = int(head_dim_of(config) * old.get("partial_rotary_factor", 1.0)) // 2
        out = self._factors()
        theta = self._load_config()[0].get("rope_theta")
        if theta is not None and float(theta) != float(old["rope_theta"]):
            # Factors divide base^(2j/d) of one base; on another base they are a different method.
            raise MethodError(
                f"rope method 'longrope': parameter 'config' was searched at rope_theta={theta}, "
                f"but the model's rope_theta is {old['rope_theta']}"
            )
        for key in ("short_factor", "long_factor"):
            values = [float(v) for v in out[key]]
            if len(values) != half:
                raise MethodError(
                    f"rope method 'longrope': parameter '{key}' needs {half} values (rotary dim / 2), got {len(values)}"
                )
            if min(values) < 1.0:
                raise MethodError(f"rope method 'longrope': parameter '{key}' values must be >= 1 (got {min(values)})")
            out[key] = values
        out["original_max_position_embeddings"] = out["original_max_position_embeddings"] or trained_length(model)
        return out

    def apply(self, model: Any) -> Undo:
        n_start = self.n_start_tokens()
        originals = {(id(parent), attr): module for parent, attr, module in rotary_modules(model, per_layer_type=True)}
        undo_swap = super().apply(model)
        if n_start == 0:
            return undo_swap
        handles = []
        for parent, attr, module in rotary_modules(model, per_layer_type=True):
            hook = _StartTokens(originals[(id(parent), attr)], n_start)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))

        def undo() -> None:
            for handle in handles:
                handle.remove()
            undo_swap()

        return undo


class _StartTokens:
    """Forward hook of a rotary module: positions < n get the cos/sin of the model's original rotary module.

    LongRoPE keeps the first n-hat tokens un-interpolated (no rescale, no attention factor), since the attention
    sinks at the start of a sequence carry large scores that interpolation would disturb (Ding et al. 2024, 3.2).
    """

    def __init__(self, original: torch.nn.Module, n_start: int):
        self.original = original
        self.n_start = n_start

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: tuple) -> tuple:
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        # Decoding past the first n positions: nothing to replace.
        if int(position_ids.min()) >= self.n_start:
            return output
        cos, sin = output
        # The same call (a per-layer-type module also takes the layer type) on the original module.
        cos0, sin0 = self.original(*args, **kwargs)
        # (B, T, 1) True where the position keeps the original RoPE
        keep = (position_ids < self.n_start).to(cos.device)[..., None]
        return torch.where(keep, cos0, cos), torch.where(keep, sin0, sin)


@register_frequencies("longrope")
def longrope_frequencies(p: RopeParams, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE frequencies: default frequency j divided by short_factor[j], or by long_factor[j] once
    seq_len exceeds the trained length L; cos/sin scaled by sqrt(1 + ln(factor)/ln(L)) (1 when factor <= 1).

    Based on https://arxiv.org/abs/2402.13753. Parameters: short_factor, long_factor (required, rotary_dim/2
    values > 0 each), L = original_max_position_embeddings (> 0), factor (>= 1; default
    max_position_embeddings / L, as Phi-3 configs state it), attention_factor (> 0, overrides the formula).
    seq_len None or <= L selects the short factors, as transformers does at init.
    """
    short, long = p.require("short_factor"), p.require("long_factor")
    trained = p.require_trained_length()
    attention_factor = p.attention_factor
    if attention_factor is None:
        factor = p.implied_factor()
        if factor > 1.0 and trained < 2:
            p.fail("original_max_position_embeddings", f"must be >= 2 for the ln(L) attention factor (got {trained})")
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(trained))
    ext = long if seq_len is not None and seq_len > trained else short
    # (d/2,) exponents 2j/d; the per-frequency factor divides base^(2j/d) as in transformers
    exponent = torch.arange(0, p.rotary_dim, 2, dtype=torch.int64).float() / p.rotary_dim
    inv_freq = 1.0 / (torch.tensor(ext, dtype=torch.float32) * p.base**exponent)
    return inv_freq, float(attention_factor)
