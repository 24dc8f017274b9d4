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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from longkit.errors import MethodError
from longkit.methods import Method, Undo
from longkit.models.introspect import per_layer_rope, rope_config, rotary_modules, trained_length
from longkit.registry import params_of

#: The layer type a scaling method scales on per-layer-type models unless told otherwise: Gemma 3's long-context
#: recipe rescales the global (full-attention) layers' RoPE only; a sliding layer never sees a distance beyond its
#: window, so its frequencies need no extrapolation.
DEFAULT_LAYER_TYPES = ("full_attention",)


def require_rope(model: Any, method: str, *, per_layer_type: bool = False) -> tuple[Any, dict]:
    """The model's rope config and its ``rope_parameters`` (a copy); a clear error for models without RoPE.

    Per-layer-type parameters (``{"sliding_attention": {...}, "full_attention": {...}}``) are returned only when
    the caller handles them (``per_layer_type=True``); otherwise such a model is refused with a MethodError.
    """
    config = rope_config(model)
    params = getattr(config, "rope_parameters", None)
    arch = type(model).__name__
    if not params or not rotary_modules(model, per_layer_type=True):
        raise MethodError(
            f"rope method '{method}' needs a model with rotary position embeddings (RoPE); "
            f"{arch} (model_type={getattr(config, 'model_type', '?')!r}) has none"
        )
    per_type = per_layer_rope(config)
    if per_type is not None:
        if not per_layer_type:
            raise MethodError(
                f"rope method '{method}': {arch} has per-layer-type rope parameters ({', '.join(per_type)}), "
                f"which '{method}' cannot handle; it needs a model with one rope_parameters dict"
            )
        return config, {t: (dict(p) if p is not None else None) for t, p in per_type.items()}
    return config, dict(params)


@dataclass
class HFRopeMethod(Method):
    """Base of the RoPE methods that map onto a transformers ``rope_type``.

    On a model with per-layer-type rope parameters (Gemma 3) the method scales the layer types named by
    ``layer_types`` (default: ``full_attention``) and leaves the others' RoPE as it is.
    """

    #: The transformers rope_type this method builds.
    rope_type = "default"
    #: Parameters transformers' rope_parameters must hold: the method's frequency function gives them no default
    #: (the class default is the CLI's convenience), so ``frequencies("llama3", ...)`` asks for them.
    required: ClassVar[tuple[str, ...]] = ()
    #: Parameters that act only when the method is applied to a model (a file, a hook): no frequency inputs.
    #: ``layer_types`` is added to every subclass's own list.
    apply_only: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every method gets the parameter ``layer_types``, declared here as the subclass's own last field (this
        # runs before its @dataclass), so it follows the method's own parameters in labels and listings and
        # keeps their positions (``Linear(4.0)``). It only selects where the method applies: apply_only.
        super().__init_subclass__(**kwargs)
        if "layer_types" not in cls.__dict__.get("__annotations__", {}):
            cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}), "layer_types": "str | None"}
            cls.layer_types = field(default=None, kw_only=True, metadata={
                "help": "per-layer-type models only: the layer types to scale, ';'-separated, or 'all' "
                        "(default full_attention)",
            })
        if "layer_types" not in cls.apply_only:
            cls.apply_only = (*cls.apply_only, "layer_types")

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list | tuple):
            self.layer_types = ";".join(str(t) for t in self.layer_types)
        super().__post_init__()
        if self.layer_types is not None and not self._layer_type_names():
            self.fail("layer_types", "must name at least one layer type, e.g. full_attention or 'all' (got '')")
        self.check(self)

    def _layer_type_names(self) -> list[str]:
        return [t.strip() for t in (self.layer_types or "").split(";") if t.strip()]

    @staticmethod
    def check(p: Any) -> None:
        """Rules across parameters (one parameter's range is declared with ``param``), checked once for both
        paths: ``p`` is the method itself, or the :class:`~longkit.rope.frequencies.RopeParams` of its
        frequency function (there, parameters not given are None). Both have ``fail(key, text)``."""

    def rope_parameters(self, model: Any, old: dict[str, Any]) -> dict[str, Any]:
        """This method's entries of ``rope_parameters`` for a layer whose current parameters are ``old``: its
        parameters (less ``apply_only``; the trained length defaults to the model's). :meth:`scaled_config`
        adds rope_theta and partial_rotary_factor."""
        out = {p.name: getattr(self, p.name) for p in params_of(type(self)) if p.name not in self.apply_only}
        if "original_max_position_embeddings" in out:
            out["original_max_position_embeddings"] = out["original_max_position_embeddings"] or trained_length(model)
        return out

    def scaled_theta(self, model: Any, old: dict[str, Any]) -> float:
        """The ``rope_theta`` to build with for a layer whose parameters are ``old``: its own unless the method
        changes the base (ntk).

        abf's parameter is ``rope_theta`` itself, so its :meth:`rope_parameters` carry the new base."""
        return old["rope_theta"]

    def scaled_parameters(self, model: Any, old: dict[str, Any]) -> dict[str, Any]:
        """The rope parameters this method gives a layer whose parameters are ``old``."""
        new = {"rope_type": self.rope_type, "rope_theta": self.scaled_theta(model, old)}
        if "partial_rotary_factor" in old:
            new["partial_rotary_factor"] = old["partial_rotary_factor"]
        new.update({k: v for k, v in self.rope_parameters(model, old).items() if v is not None})
        return new

    def scaled_layer_types(self, model: Any) -> list[str] | None:
        """The layer types this method scales on a per-layer-type model (None on a model with one rope dict)."""
        config = rope_config(model)
        per_type = per_layer_rope(config)
        arch = type(model).__name__
        if per_type is None:
            if self.layer_types is not None:
                self.fail("layer_types", f"applies only to models with per-layer-type rope parameters; {arch} has "
                                         "one rope_parameters dict for every layer (leave layer_types out)")
            return None
        valid = [t for t, p in per_type.items() if p is not None]
        names = self._layer_type_names() or list(DEFAULT_LAYER_TYPES)
        if names == ["all"]:
            return valid
        unknown = [t for t in names if t not in valid]
        if unknown:
            given = "" if self.layer_types is not None else " (the default)"
            self.fail("layer_types", f"names layer type(s) {', '.join(map(repr, unknown))}{given} that {arch} "
                                     f"does not have; its layer types with RoPE: {', '.join(valid)}, or 'all'")
        return names

    def scaled_config(self, model: Any) -> Any:
        """A copy of the model's config carrying this method's rope parameters, validated by transformers."""
        config, old = require_rope(model, self.name, per_layer_type=True)
        chosen = self.scaled_layer_types(model)
        if chosen is None:
            rope = new = self.scaled_parameters(model, old)
        else:
            rope = {t: (self.scaled_parameters(model, p) if t in chosen else p) for t, p in old.items()}
            new = rope[chosen[0]]
        cfg = copy.deepcopy(config)
        cfg.rope_parameters = rope
        if new.get("factor") and new.get("original_max_position_embeddings"):
            # The extended window, as a scaled checkpoint's config states it (transformers checks against it).
            cfg.max_position_embeddings = int(round(new["factor"] * new["original_max_position_embeddings"]))
        try:
            cfg.validate_rope()
        except (ValueError, KeyError, TypeError) as err:
            raise MethodError(f"rope method '{self.name}': transformers rejected {rope}: {err}") from None
        return cfg

    def apply(self, model: Any) -> Undo:
        cfg = self.scaled_config(model)
        swapped = []
        # A per-layer-type model (Gemma 3) has one rotary module holding every type's frequencies: the new module
        # is built from the whole per-type config, so the types not scaled get their frequencies recomputed
        # from unchanged parameters, identical to the old ones.
        for parent, attr, old in rotary_modules(model, per_layer_type=True):
            try:
                new = type(old)(config=cfg)
            except TypeError:
                new = type(old)(cfg)
            # inv_freq stays float32 as transformers builds it; only the device follows the model.
            new = new.to(device=next(old.buffers()).device)
            new.train(old.training)
            setattr(parent, attr, new)
            swapped.append((parent, attr, old))

        def undo() -> None:
            for parent, attr, old in swapped:
                setattr(parent, attr, old)

        return undo
