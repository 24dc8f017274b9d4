"""The attention prefill benchmark's report: table rows and figure re-rendered from its JSON
(benchmarks/attention/prefill.py --render)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "attention" / "prefill.py"


def _data() -> dict:
    kernel, model = [], []
    for T, base in ((4096, 0.2), (65536, 40.0)):
        for m, speed in (("sdpa", 1.0), ("vertical_slash", 3.0), ("moba", 8.0)):
            kernel.append({"length": T, "method": m, "median_s": base / speed, "speedup_vs_sdpa": speed,
                           "peak_rss_mb": 50.0 * speed, "rel_error_vs_sdpa": 0.0 if m == "sdpa" else 0.1})  # fmt: skip
            model.append({"length": T, "method": m, "median_s": 2 * base / speed, "speedup_vs_sdpa": speed / 2})
    # A method that failed at 64K (timeout) is a row with its error, not a missing row.
    kernel.append({"length": 65536, "method": "eager", "error": "timeout after 600 s"})
    return {"note": "test run", "kernel": kernel, "model": model, "passkey": []}


def test_render_rewrites_table_and_figure_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "run.json").write_text(json.dumps(_data()))
    # In a subprocess: the script draws through pyplot, which must not leak into this test process
    # (tests/test_report.py checks that the report never imports it).
    code = (
        "import sys; from pathlib import Path; sys.argv = ['prefill.py', '--render', '--name', 'run'];"
        f"sys.path.insert(0, {str(REPO / 'tests')!r}); from grid_records import load_script;"
        f"m = load_script(Path({str(SCRIPT)!r})); m.RESULTS = Path({str(tmp_path)!r}); m.main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "run.md").read_text().splitlines()
    assert "| 65536 | moba | 5.000 | 8.00x | 400 | 0.1000 |" in md
    assert "| 65536 | eager | timeout after 600 s | | | |" in md
    # The whole-model rows come after the kernel rows, with their own ratios.
    assert md.index("| 65536 | moba | 10.000 | 4.00x |") > md.index("| 65536 | moba | 5.000 | 8.00x | 400 | 0.1000 |")
    assert (tmp_path / "run.png").stat().st_size > 10_000
    # Rendering reads the JSON only: it must not have rewritten it.
    assert json.loads((tmp_path / "run.json").read_text()) == _data()
    assert "matplotlib.pyplot" not in sys.modules


def test_render_of_a_missing_run_fails_naming_the_file(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--render", "--name", "no_such_run_xyz"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode != 0
    assert "no_such_run_xyz.json" in r.stderr
