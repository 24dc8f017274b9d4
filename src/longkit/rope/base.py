"""Shared plumbing of the RoPE scaling methods: build ``rope_parameters`` and swap the rotary module.

transformers computes RoPE frequencies in one rotary-embedding module per model (``model.model.rotary_emb``
for Llama, Qwen2/3, Mistral...), from ``config.rope_parameters``. A RoPE method here is a dataclass that
returns the ``rope_parameters`` of its ``rope_type`` (and, through :meth:`HFRopeMethod.scaled_theta`, the
``rope_theta`` when it changes the base); :meth:`HFRopeMethod.apply` builds a new rotary module
of the model's own class from a copy of the config with those parameters and swaps it in. The model's
config object is never mutated, and undo puts the original module object back, so logits after removal
are bit-identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from longkit.errors import MethodError
from longkit.methods import Method, Undo
from longkit.models.introspect import rope_config, rotary_modules, trained_length
from longkit.registry import params_of


def require_rope(model: Any, method: str) -> tuple[Any, dict]:
    """The model's rope config and its flat ``rope_parameters``; a clear error for models without RoPE."""
    config = rope_config(model)
    params = getattr(config, "rope_parameters", None)
    arch = type(model).__name__
    if not params or not rotary_modules(model):
        raise MethodError(
            f"rope method '{method}' needs a model with rotary position embeddings (RoPE); "
            f"{arch} (model_type={getattr(config, 'model_type', '?')!r}) has none"
        )
    if any(isinstance(v, dict) for v in params.values()):
        raise MethodError(
            f"rope method '{method}': {arch} has per-layer-type rope parameters ({', '.join(params)}); "
            "only models with one rope_parameters dict are supported"
        )
    return config, dict(params)


@dataclass
class HFRopeMethod(Method):
    """Base of the RoPE methods that map onto a transformers ``rope_type``."""

    #: The transformers rope_type this method builds.
    rope_type = "default"
    #: Parameters transformers' rope_parameters must hold: the method's frequency function gives them no default
    #: (the class default is the CLI's convenience), so ``frequencies("llama3", ...)`` asks for them.
    required: ClassVar[tuple[str, ...]] = ()
    #: Parameters that act only when the method is applied to a model (a file, a hook): no frequency inputs.
    apply_only: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self)

    @staticmethod
    def check(p: Any) -> None:
        """Rules across parameters (one parameter's range is declared with ``param``), checked once for both
        paths: ``p`` is the method itself, or the :class:`~longkit.rope.frequencies.RopeParams` of its
        frequency function (there, parameters not given are None). Both have ``fail(key, text)``."""

    def rope_parameters(self, model: Any) -> dict[str, Any]:
        """This method's entries of ``rope_parameters``: its parameters (less ``apply_only``; the trained length
        defaults to the model's). :meth:`scaled_config` adds rope_theta and partial_rotary_factor."""
        out = {p.name: getattr(self, p.name) for p in params_of(type(self)) if p.name not in self.apply_only}
        if "original_max_position_embeddings" in out:
            out["original_max_position_embeddings"] = out["original_max_position_embeddings"] or trained_length(model)
        return out

    def scaled_theta(self, model: Any, theta: float) -> float:
        """The ``rope_theta`` to build with: the model's own unless the method changes the base (ntk).

        abf's parameter is ``rope_theta`` itself, so its :meth:`rope_parameters` carry the new base."""
        return theta

    def scaled_config(self, model: Any) -> Any:
        """A copy of the model's config carrying this method's rope parameters, validated by transformers."""
        config, old = require_rope(model, self.name)
        new = {"rope_type": self.rope_type, "rope_theta": self.scaled_theta(model, old["rope_theta"])}
        if "partial_rotary_factor" in old:
            new["partial_rotary_factor"] = old["partial_rotary_factor"]
        new.update({k: v for k, v in self.rope_parameters(model).items() if v is not None})
        cfg = copy.deepcopy(config)
        cfg.rope_parameters = new
        if new.get("factor") and new.get("original_max_position_embeddings"):
            # The extended window, as a scaled checkpoint's config states it (transformers checks against it).
            cfg.max_position_embeddings = int(round(new["factor"] * new["original_max_position_embeddings"]))
        try:
            cfg.validate_rope()
        except (ValueError, KeyError, TypeError) as err:
            raise MethodError(f"rope method '{self.name}': transformers rejected {new}: {err}") from None
        return cfg

    def apply(self, model: Any) -> Undo:
        cfg = self.scaled_config(model)
        swapped = []
        for parent, attr, old in rotary_modules(model):
            try:
                new = type(old)(config=cfg)
            except TypeError:
                new = type(old)(cfg)
            # inv_freq stays float32 as transformers builds it; only the device follows the model.
            new = new.to(device=old.inv_freq.device)
            new.train(old.training)
            setattr(parent, attr, new)
            swapped.append((parent, attr, old))

        def undo() -> None:
            for parent, attr, old in swapped:
                setattr(parent, attr, old)

        return undo
