"""String-keyed registries (one :class:`Registry` class for all), and the typed parameters methods declare.

A method is a dataclass whose fields are declared with :func:`param`; the field metadata carries the
valid range and the help text, so the CLI (``--rope yarn:factor=2``), ``longkit methods`` and the
conformance tests all read the same declaration. Registering a class with ``@register("rope", "yarn")``
is all it takes for a new method to appear everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from longkit.errors import MethodError

KINDS = ("rope", "attention", "kv", "memory")

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    *,
    help: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    file: bool = False,
) -> Any:
    """Declare a method parameter: a dataclass field with a valid range and a help text. ``file=True``: the value
    may name a file or directory whose contents change the method's results (an eval run's identity hashes it)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "file": file}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamInfo:
    """What a parameter accepts; built from a dataclass field."""

    name: str
    type: str
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    #: The annotation itself, which values are coerced to.
    hint: Any = dataclasses.field(default=Any, compare=False, repr=False)
    #: The value may name a file whose contents matter (``param(..., file=True)``).
    file: bool = False

    def in_range(self, value: float) -> bool:
        """Whether the number ``value`` keeps the declared bounds (``ge``, ``gt``, ``le``, ``lt``)."""
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.ge is not None:
            parts.append(f">= {self.ge}")
        if self.gt is not None:
            parts.append(f"> {self.gt}")
        if self.le is not None:
            parts.append(f"<= {self.le}")
        if self.lt is not None:
            parts.append(f"< {self.lt}")
        return " and ".join(parts) if parts else "any " + self.type

    def to_json(self) -> dict:
        out = {"name": self.name, "type": self.type, "default": _jsonable(self.default), "help": self.help}
        for key in ("ge", "gt", "le", "lt"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.choices:
            out["choices"] = list(self.choices)
        return out


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | None"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(arg)}]"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def params_of(cls: type) -> tuple[ParamInfo, ...]:
    """The declared parameters of a method class, in declaration order (a class's fields never change: cached)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None
        )
        m = f.metadata
        hint = hints.get(f.name, Any)
        out.append(ParamInfo(f.name, _type_name(hint), default, m.get("help", ""), m.get("ge"), m.get("gt"),
                             m.get("le"), m.get("lt"), m.get("choices"), hint, m.get("file", False)))
    return tuple(out)


def _coerce(kind: str, method: str, name: str, tp: Any, value: Any) -> Any:
    """Turn a CLI string (or a JSON value) into the declared type; raise a MethodError naming the parameter."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = args[0] if len(args) == 1 else tp
        origin = typing.get_origin(tp)
    try:
        if origin is list:
            (inner,) = typing.get_args(tp) or (float,)
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else [v for v in text.split(";") if v]
            return [_coerce(kind, method, name, inner, v) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                text = value.strip().lower().replace("_", "")
                mult = 1
                if text.endswith("k"):
                    text, mult = text[:-1], 1024
                return int(float(text) * mult) if mult != 1 else int(text)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        # OverflowError: int("inf") or a count beyond float range such as "1e400k"
        raise MethodError(
            f"{kind} method '{method}': parameter '{name}' expects {_type_name(tp)}, got {value!r}"
        ) from None
    return value


def check_value(info: ParamInfo, value: Any, kind: str, name: str) -> Any:
    """``value`` coerced to parameter ``info``'s type and checked against its range; a MethodError otherwise."""
    value = _coerce(kind, name, info.name, info.hint, value)
    if not _finite(value):
        # nan passes every comparison of a range check and inf every lower bound: both would run and give garbage
        # (a perplexity of 205 for ntk:factor=inf), so no parameter takes them.
        bounds = "" if info.choices or info.range_text().startswith("any ") else " " + info.range_text()
        raise MethodError(f"{kind} method '{name}': parameter '{info.name}' must be a finite number{bounds} (got {value!r})")
    bad = False
    if value is None:
        pass
    elif info.choices is not None:
        bad = value not in info.choices
    elif isinstance(value, int | float) and not isinstance(value, bool):
        bad = not info.in_range(value)
    if bad:
        raise MethodError(f"{kind} method '{name}': parameter '{info.name}' must be {info.range_text()} (got {value!r})")
    return value


def _finite(value: Any) -> bool:
    """False for a float nan/inf, or a list holding one (1e400 reads as inf)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def check_params(obj: Any) -> None:
    """Coerce and validate every declared parameter of a method instance (called in __post_init__)."""
    cls = type(obj)
    for info in params_of(cls):
        value = getattr(obj, info.name)
        coerced = check_value(info, value, getattr(cls, "kind", "?"), getattr(cls, "name", cls.__name__))
        if coerced is not value:
            object.__setattr__(obj, info.name, coerced)


class Registry:
    """Name -> object, the one shape of every registry: the method kinds (:data:`REGISTRIES`), ``rope.FREQUENCIES``,
    ``rope.REMAPS``, ``attention.minference.PATTERNS``, the eval tasks and suites.

    ``what`` names one entry in messages (``"position remap"``), ``plural`` the valid names, ``error`` the exception.
    Without ``what`` it holds the ``kind`` methods: each class is stamped with its ``kind`` and ``name``, and
    :meth:`create` builds one from a dict of parameters. Iteration is in registration order (as a dict's);
    :meth:`names` sorts. An unknown name, or a second object under a taken one, raises ``error``.
    """

    def __init__(self, kind: str, what: str = "", *, plural: str = "", error: type[Exception] = MethodError):
        self.kind = kind
        self._methods = not what
        self.what = what or f"{kind} method"
        self.plural = plural or f"{self.what}s"
        self.error = error
        self._items: dict[str, Any] = {}

    def add(self, name: str, obj: Any) -> Any:
        """Register ``obj`` under ``name`` and return it."""
        if name in self._items and self._items[name] is not obj:
            raise self.error(f"{self.what} '{name}' is already registered by {self._items[name]}")
        if self._methods:
            obj.kind, obj.name = self.kind, name
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: ``@registry("rope").register("yarn")``, ``@REMAPS.register("rerope")``."""
        return lambda obj: self.add(name, obj)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> Any:
        if name not in self._items:
            valid = ", ".join(self.names()) or "(none)"
            raise self.error(f"unknown {self.what} '{name}'; valid {self.plural}: {valid}")
        return self._items[name]

    __getitem__ = get

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def create(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Build a method from its name and a dict of parameters (strings from the CLI are coerced)."""
        cls = self.get(name)
        args = dict(args or {})
        valid = {p.name for p in params_of(cls)}
        unknown = sorted(set(args) - valid)
        if unknown:
            raise MethodError(
                f"{self.what} '{name}' has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"valid parameters: {', '.join(sorted(valid)) or '(none)'}"
            )
        return cls(**args)


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}


def register(kind: str, name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("rope", "yarn")``."""
    if kind not in REGISTRIES:
        raise MethodError(f"unknown method kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    return REGISTRIES[kind].register(name)


def registry(kind: str) -> Registry:
    if kind not in REGISTRIES:
        raise MethodError(f"unknown method kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    return REGISTRIES[kind]


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Parse the compact CLI form ``name:key=value,key=value`` (lists as ``[1,2]`` or ``1;2``)."""
    spec = spec.strip()
    if not spec:
        raise MethodError("empty method spec; expected NAME or NAME:key=value,...")
    name, _, rest = spec.partition(":")
    args: dict[str, str] = {}
    depth, current, items = 0, "", []
    for ch in rest:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if current:
        items.append(current)
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(f"bad method spec '{spec}': '{item}' is not key=value")
        if key.strip() in args:
            # Which of the two was meant cannot be told; the last one winning silently would hide a typo.
            raise MethodError(f"bad method spec '{spec}': parameter '{key.strip()}' is given twice")
        args[key.strip()] = value.strip()
    return name.strip(), args
