"""benchmarks/README.md indexes every benchmark script and every committed result, and names nothing that is gone.

The index is a table per room; each row links a script and the results it wrote, as files or as folders whose
files the row names. A result file no row reaches, or a link to a file or script that does not exist, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_benchmark_tables import TABLES

from conftest import REPO
from longkit.eval.rundir import LOCK_FILE

BENCH = REPO / "benchmarks"
INDEX = BENCH / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _rows() -> list[str]:
    """The index's table rows (header and separator rows excluded)."""
    lines = INDEX.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith(("| script |", "|---"))]


def _links(text: str) -> list[str]:
    """Relative link targets (other pages and anchors excluded)."""
    return [t for t in LINK.findall(text) if "://" not in t and not t.startswith(("../", "#"))]


def _results() -> list[Path]:
    """Every committed result: the files under benchmarks/<room>/results/ (not the lock a running eval holds)."""
    return sorted(p for p in BENCH.glob("*/results/**/*")
                  if p.is_file() and "__pycache__" not in p.parts and p.name != LOCK_FILE)


def _reached() -> set[Path]:
    """The result files the index reaches: linked files, and files of a linked folder that its row names."""
    reached = set()
    for row in _rows():
        for target in _links(row):
            path = BENCH / target
            if target.endswith("/"):
                reached |= {p for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) in row}
            else:
                reached.add(path)
    return reached


def test_every_link_of_the_index_exists():
    missing = [t for t in _links(INDEX.read_text(encoding="utf-8")) if not (BENCH / t).exists()]
    assert missing == [], f"benchmarks/README.md links to files that do not exist: {missing}"


def test_every_result_file_is_reachable_from_the_index():
    unreached = [str(p.relative_to(BENCH)) for p in _results() if p not in _reached()]
    assert unreached == [], f"results not in benchmarks/README.md (link them, or name them in their folder's row): {unreached}"


def test_every_script_is_in_the_index():
    scripts = sorted(p for p in BENCH.glob("*/*") if p.is_file() and p.suffix in (".py", ".sh"))
    assert scripts, "no benchmark scripts found"
    linked = {BENCH / t for row in _rows() for t in _links(row)}
    assert [str(p.relative_to(BENCH)) for p in scripts if p not in linked] == []


def test_results_live_only_in_the_rooms_results_folders():
    # A room's folder holds its scripts; what they measure goes to its results/ folder.
    loose = sorted(
        str(p.relative_to(BENCH))
        for p in BENCH.glob("*/*")
        if p.is_file() and p.suffix not in (".py", ".sh") and not p.name.startswith(".")
    )
    assert loose == []


def test_every_table_is_rerendered_or_listed_as_not():
    """A committed .md table is re-rendered by tests/test_benchmark_tables.py, or its index row says why not."""
    not_rendered = set()
    for row in _rows():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[3].startswith(("no", "partly")):
            not_rendered |= {BENCH / t for t in _links(row) if t.endswith(".md")}
    tables = [p for p in _results() if p.suffix == ".md" and not p.name.endswith(".notes.md")]
    unchecked = [str(p.relative_to(BENCH)) for p in tables if str(p.relative_to(BENCH)) not in TABLES]
    assert [t for t in unchecked if BENCH / t not in not_rendered] == []
