"""Every benchmark script answers ``--help``: argparse formats help strings with ``%``, so a help text that names a
configuration such as "snapkv 10%" crashed ``decode.py --help`` with a ValueError before it was escaped. Run in
process (the scripts' ``main`` reads ``sys.argv`` when given no arguments), so the whole set costs under a second."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from conftest import REPO
from grid_records import load_script

SCRIPTS = sorted(
    p for p in (REPO / "benchmarks").rglob("*.py")
    if "ArgumentParser" in p.read_text() and "\ndef main(" in p.read_text()
)  # fmt: skip


def test_scripts_found():
    # A wrong glob would make the parametrised test below vacuous.
    assert len(SCRIPTS) >= 20
    assert REPO / "benchmarks" / "decode" / "decode.py" in SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO / "benchmarks")))
def test_help(path, monkeypatch):
    module = load_script(path)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 0
    assert "usage:" in out.getvalue()
