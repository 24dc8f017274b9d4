"""The package's layers import only downward, and the method rooms import each other without cycles.

Layers, bottom to top: core (errors, registry, methods, models) -> method rooms (rope, attention, kvcache,
memory) -> seam -> runtime -> eval -> tools -> cli. Function-local imports count: a lazy import is still a
dependency. ``longkit/__init__.py`` is the public facade: it may import any layer, and only the cli may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import longkit

ROOT = Path(longkit.__file__).parent
LAYERS = {
    "errors": 0, "registry": 0, "methods": 0, "models": 0,
    "rope": 1, "attention": 1, "kvcache": 1, "memory": 1, "train": 1,
    "seam": 2,
    "runtime": 3,
    "eval": 4,
    "tools": 5,
    "cli": 6,
    # the facade re-exports every layer, so only the top may import it
    "longkit": 6,
}


def part_of(module: str) -> str | None:
    """The top-level part of ``longkit.x.y`` ('x'), or None for the facade ``longkit`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, imported longkit module) of every import in ``path``, at any depth, relative ones resolved."""
    package = ".".join(("longkit", *path.relative_to(ROOT).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "longkit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "longkit":
                continue
            # `from longkit import rope` imports the part `rope`, not the facade
            names = [f"{base}.{a.name}" if base == "longkit" else base for a in node.names]
            found += [(node.lineno, n) for n in names]
    return found


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importing part, imported part) for every import between parts of the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel == Path("__init__.py"):
            continue
        src = rel.parts[0].removesuffix(".py")
        for line, module in imports(path):
            dst = part_of(module)
            if dst is None:
                out.append((str(rel), line, src, "longkit"))
            elif dst != src:
                out.append((str(rel), line, src, dst))
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.name != "__init__.py" and not p.name.startswith("_")
             and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts <= set(LAYERS), f"give these a layer in tests/test_layers.py: {sorted(parts - set(LAYERS))}"


def test_no_module_imports_a_higher_layer_or_the_facade():
    bad = [f"{f}:{line} ({src}) imports {dst}" for f, line, src, dst in edges() if LAYERS[dst] > LAYERS[src]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_method_rooms_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst in edges():
        if LAYERS[src] == LAYERS[dst] == 1:
            graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    cycles = sorted(room for room in graph if reaches(room, room, {room}))
    assert not cycles, f"method rooms in an import cycle: {cycles} (graph {graph})"


@pytest.mark.parametrize("source, expected", [
    ("from longkit.eval.runner import x", ["longkit.eval.runner"]),
    ("from longkit import rope, seam", ["longkit.rope", "longkit.seam"]),
    ("def f():\n    import longkit.tools.scaling_laws", ["longkit.tools.scaling_laws"]),
    ("from .cache import x\nfrom ..seam import apply", ["longkit.kvcache.cache", "longkit.seam"]),
])
def test_the_checker_sees_every_form_of_import(source, expected):
    # A checker that missed function-local, relative or facade imports would pass the tests above vacuously.
    assert [m for _, m in imports(ROOT / "kvcache" / "probe.py", source)] == expected
