"""The method seam: apply a combination of long-context methods to a loaded model, and undo it.

>>> with longkit.apply(model, rope="yarn", rope_args={"factor": 2}) as applied:
...     out = model(input_ids, cache=applied.new_cache())

The same combination is spelled compactly on the CLI and in reports as
``rope=yarn:factor=2+kv=...`` (see :meth:`MethodSpec.parse`). Methods are applied in the order
rope, attention, kv, memory and removed in reverse order; removing restores the model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from longkit.errors import MethodError
from longkit.methods import Method, Undo
from longkit.registry import KINDS, registry, split_spec

BASELINE = "baseline"


def _to_method(kind: str, value: Any, args: dict[str, Any] | None = None) -> Method | None:
    if value is None:
        if args:
            raise MethodError(f"{kind}_args given without a {kind} method")
        return None
    if isinstance(value, Method):
        if value.kind != kind:
            raise MethodError(f"{kind}= expects a {kind} method, got the {value.kind} method '{value.name}'")
        if args:
            raise MethodError(f"{kind}_args given with an already-built {kind} method; set its fields instead")
        return value
    if isinstance(value, str):
        name, spec_args = split_spec(value)
        twice = sorted(set(spec_args) & set(args or {}))
        if twice:
            raise MethodError(
                f"{kind} method '{name}': parameter {', '.join(repr(k) for k in twice)} given both in '{value}' and "
                f"in {kind}_args; give each parameter once"
            )
        return registry(kind).create(name, {**spec_args, **(args or {})})
    raise MethodError(f"{kind}= expects a method name, a 'name:key=value' string or a Method, got {value!r}")


@dataclass(frozen=True)
class MethodSpec:
    """One combination of methods: at most one of each kind. Empty = the untouched model (baseline)."""

    rope: Method | None = None
    attention: Method | None = None
    kv: Method | None = None
    memory: Method | None = None

    def __post_init__(self) -> None:
        own = [f"{m.kind}={m.name}" for m in self.methods() if m.keeps_cache]
        if len(own) > 1:
            raise MethodError(
                f"methods {' and '.join(own)} each keep their own KV cache; a combination may hold one of them"
            )

    @classmethod
    def build(cls, **kwargs: Any) -> MethodSpec:
        """``MethodSpec.build(rope="yarn", rope_args={"factor": 2}, kv=...)``."""
        out = {}
        for kind in KINDS:
            out[kind] = _to_method(kind, kwargs.pop(kind, None), kwargs.pop(f"{kind}_args", None))
        if kwargs:
            raise MethodError(
                f"unknown argument(s) {', '.join(sorted(kwargs))}; valid: "
                + ", ".join(f"{k}, {k}_args" for k in KINDS)
            )
        return cls(**out)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """Parse ``baseline`` or ``rope=yarn:factor=2+attention=eager`` (kind= may be omitted for rope)."""
        text = text.strip()
        if text in ("", BASELINE, "none"):
            return cls()
        out: dict[str, Any] = {}
        for part in text.split("+"):
            part = part.strip()
            kind, eq, spec = part.partition("=")
            if not eq or kind not in KINDS:
                # "yarn:factor=2" alone: find the kind that has this method name.
                name = split_spec(part)[0]
                kinds = [k for k in KINDS if name in registry(k)]
                if len(kinds) != 1:
                    raise MethodError(
                        f"cannot tell the kind of '{part}'; write KIND=NAME:key=value with KIND one of {', '.join(KINDS)}"
                    )
                kind, spec = kinds[0], part
            if kind in out:
                raise MethodError(f"method combination '{text}' has two {kind} methods; at most one of each kind")
            out[kind] = spec
        return cls.build(**out)

    def check(self, model: Any) -> None:
        """Raise a MethodError now if this combination cannot run on ``model``: each method's
        :meth:`~longkit.methods.Method.check_model`, then a dry run (apply, one fresh cache, remove) that meets the
        checks made on applying and on building a cache. The model is left as it was (removing restores it
        exactly)."""
        for method in self.methods():
            method.check_model(model)
        with Applied(model, self) as applied:
            applied.new_cache()

    def methods(self) -> list[Method]:
        return [m for m in (getattr(self, f.name) for f in fields(self)) if m is not None]

    def label(self) -> str:
        ms = self.methods()
        return "+".join(f"{m.kind}={m.label()}" for m in ms) if ms else BASELINE

    def __str__(self) -> str:
        return self.label()


class Applied:
    """A combination applied to a model. A context manager; ``remove()`` undoes it (idempotent)."""

    def __init__(self, model: Any, spec: MethodSpec):
        self.model = model
        self.spec = spec
        self._undo: list[Undo] = []
        try:
            for method in spec.methods():
                self._undo.append(method.apply(model))
        except BaseException:
            self.remove()
            raise

    def new_cache(self) -> Any:
        """A fresh KV cache for one generation: the first method that provides one wins, else a DynamicCache whose
        full-attention layers grow in place instead of being re-concatenated at every step
        (:func:`longkit.kvcache.grow.growing_cache`: the same keys and values)."""
        for method in reversed(self.spec.methods()):
            cache = method.make_cache(self.model)
            if cache is not None:
                return cache
        from longkit.kvcache.grow import growing_cache

        return growing_cache(self.model.config)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply(model: Any, spec: MethodSpec | str | None = None, **kwargs: Any) -> Applied:
    """Apply a combination of methods to ``model``; use as a context manager or call ``.remove()``.

    ``spec`` is a :class:`MethodSpec` or its compact string (``"rope=yarn:factor=2"``); alternatively
    pass ``rope=``, ``rope_args=``, ``attention=``, ``kv=``, ``memory=`` (and their ``*_args``).
    """
    if spec is not None and kwargs:
        raise MethodError("pass either a spec or rope=/attention=/kv=/memory= keyword arguments, not both")
    if isinstance(spec, str):
        spec = MethodSpec.parse(spec)
    elif spec is None:
        spec = MethodSpec.build(**kwargs)
    return Applied(model, spec)
