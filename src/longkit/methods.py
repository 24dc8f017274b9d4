"""The base class every long-context method derives from.

A method is a dataclass of parameters (declared with :func:`longkit.registry.param`) plus one verb:
``apply(model) -> undo``. ``apply`` changes the model only through transformers' official seams
(rope parameters, ``AttentionInterface``, ``Cache`` objects, forward hooks) and returns a callable
that restores the model exactly. Kind-specific bases live in their rooms (``rope/base.py``,
``attention/base.py``, ``kvcache/base.py``, ``memory/base.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from longkit.errors import MethodError
from longkit.registry import check_params, params_of

Undo = Callable[[], None]


@dataclass
class Parametrised:
    """A registered dataclass of typed, range-checked parameters: methods, and training recipes
    (:class:`longkit.train.recipes.Recipe`), which drive a run instead of being applied."""

    kind: ClassVar[str] = "?"
    name: ClassVar[str] = "?"
    #: Paper title and URL, shown by ``longkit methods`` and the README table.
    paper: ClassVar[str] = ""
    #: Parameters always spelled in the label, even at their default (e.g. a RoPE ``factor``).
    shown: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_params(self)

    def fail(self, key: str, text: str) -> NoReturn:
        """Raise the MethodError that names this method and its parameter ``key``; ``text`` says what is wrong."""
        raise MethodError(f"{self.kind} method '{self.name}': parameter '{key}' {text}")

    def params(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in params_of(type(self))}

    def label(self) -> str:
        """The compact spelling ``name:key=value`` of the non-default parameters (used in reports and run ids)."""
        changed = []
        for p in params_of(type(self)):
            value = getattr(self, p.name)
            if value != p.default or p.name in self.shown:
                if isinstance(value, list):
                    value = "[" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
                elif isinstance(value, float):
                    value = f"{value:g}"
                changed.append(f"{p.name}={value}")
        return self.name + (":" + ",".join(changed) if changed else "")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "kind": cls.kind,
            "paper": cls.paper,
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
            "parameters": [p.to_json() for p in params_of(cls)],
        }


@dataclass
class Method(Parametrised):
    """Base of all methods. Subclasses are dataclasses registered with ``@register(kind, name)``."""

    #: Whether :meth:`make_cache` gives the method's own KV cache: a combination may hold one such method, since
    #: a generation runs on one cache and the other method would silently not run.
    keeps_cache: ClassVar[bool] = False
    #: Whether a generation prefills all but the prompt's last token, then runs that token alone (as its first
    #: decoding step would): methods whose work depends on the call's queries (InfLLM's retrieval by a chunk's mean
    #: query) then answer from what the last token itself retrieves, as their reference generation loop does.
    prefill_last_token_alone: ClassVar[bool] = False

    def check_model(self, model: Any) -> None:
        """Raise a MethodError when this method cannot run on ``model`` (e.g. a group size that does not divide
        its head dim), where the problem would otherwise show only at the first forward. Called before any work
        (:meth:`longkit.seam.MethodSpec.check`); the default has nothing to check."""

    def apply(self, model: Any) -> Undo:
        """Install the method on ``model``; return a callable that removes it."""
        raise NotImplementedError

    def make_cache(self, model: Any) -> Any | None:
        """A fresh KV cache for one generation, or None to let the next method (or transformers) decide."""
        return None
