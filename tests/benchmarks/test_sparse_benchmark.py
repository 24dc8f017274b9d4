"""The sparse-prefill benchmark's reporting: the accuracy / speed table of an eval run
(benchmarks/attention/sparse_table.py) and the MInference search summary (benchmarks/attention/minference_search.py)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO
from grid_records import load_script

HERE = REPO / "benchmarks" / "attention"


def _module(name: str):
    return load_script(HERE / f"{name}.py")


def _rec(method, task, depth, sample, score=None, prefill=10.0, **extra):
    key = f"{method}|{task}|16384|{'-' if depth is None else f'{depth:.4f}'}|{sample}"
    return {"id": key, "method": method, "task": task, "length": 16384, "depth": depth, "sample": sample,
            "score": score, "prefill_s": prefill, **extra}  # fmt: skip


def test_table_accuracy_per_depth_perplexity_and_same_prompt_speed(tmp_path):
    table = _module("sparse_table")
    dense, sparse = "rope=ntk:factor=4", "rope=ntk:factor=4+attention=moba"
    recs = [
        _rec(dense, "passkey", 0.1, 0, 100.0, prefill=100.0),
        _rec(dense, "passkey", 0.1, 1, 0.0, prefill=120.0),
        _rec(dense, "passkey", 0.9, 0, 0.0, prefill=500.0),  # replaced below
        _rec(dense, "perplexity", None, 0, nll_sum=200.0, n_targets=100, prefill=90.0),
        _rec(dense, "perplexity", None, 1, nll_sum=100.0, n_targets=100, prefill=90.0),
        _rec(sparse, "passkey", 0.1, 0, 0.0, prefill=25.0),  # 4x
        _rec(sparse, "passkey", 0.1, 1, 0.0, prefill=60.0),  # 2x
        _rec(sparse, "passkey", 0.9, 0, 100.0, prefill=11.0),  # 10x
        # a prompt dense never ran: no ratio from it, though it counts for accuracy and median time
        _rec(sparse, "passkey", 0.9, 1, 100.0, prefill=1.0),
        _rec(sparse, "perplexity", None, 0, nll_sum=300.0, n_targets=100, prefill=30.0),
    ]
    lines = [
        "\n".join(json.dumps(r) for r in recs),
        # a resumed run wrote the dense depth-0.9 prompt again: the later record wins
        json.dumps(_rec(dense, "passkey", 0.9, 0, 100.0, prefill=110.0)),
    ]
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    md = table.table(table.load(tmp_path), dense).splitlines()
    assert md[0] == (
        "| method | passkey d=0.1 | passkey d=0.9 | passkey all | ppl | prefill s (median) | vs rope=ntk:factor=4 |"
    )
    cells = {row.split(" | ")[0].strip("| `"): [c.strip(" |") for c in row.split(" | ")[1:]] for row in md[2:]}
    assert cells[dense] == ["50 (2)", "100 (1)", "67 (3)", f"{math.exp(1.5):.2f}", "110", "1.00x"]
    # scored prompts only: ratios 4, 2, 10 (not the perplexity forward) -> median 4; median prefill of 25, 60, 11, 1 -> 18
    assert cells[sparse] == ["0 (2)", "100 (2)", "50 (4)", f"{math.exp(3.0):.2f}", "18", "4.00x"]


def test_table_refuses_an_unknown_reference_naming_the_methods(tmp_path):
    table = _module("sparse_table")
    (tmp_path / "samples.jsonl").write_text(json.dumps(_rec("baseline", "passkey", 0.5, 0, 100.0)) + "\n")
    with pytest.raises(SystemExit, match="--reference 'dense'.*baseline"):
        table.table(table.load(tmp_path), "dense")
    with pytest.raises(SystemExit, match="run_dir"):
        table.load(tmp_path / "missing")
    other = dict(_rec("baseline", "passkey", 0.5, 1, 100.0), length=8192)
    with pytest.raises(SystemExit, match=r"lengths \[8192, 16384\]"):
        table.table([_rec("baseline", "passkey", 0.5, 0, 100.0), other], None)


def test_minference_search_summary_counts_patterns_and_errors():
    search = _module("minference_search")
    vs = {"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 3000}
    a = {"pattern": "a_shape", "sinks": 128, "window": 4096}
    found = {"layers": {"10": [vs, a, vs], "2": [a, a, a]}, "errors": {"10": [0.1, 0.5, 0.3], "2": [0.2, 0.2, 0.4]}}
    md = search.summary(found, "# head").splitlines()
    assert "| `a_shape:sinks=128,window=4096` | 4 |" in md
    assert "| `vertical_slash:vertical_size=1000,slash_size=3000` | 2 |" in md
    assert md.index("| `a_shape:sinks=128,window=4096` | 4 |") < md.index(
        "| `vertical_slash:vertical_size=1000,slash_size=3000` | 2 |"
    )
    assert any("median 0.250, max 0.500" in line for line in md)
    rows = [line for line in md if line.startswith("| 2 ") or line.startswith("| 10 ")]
    # layers in numeric order (2 before 10), each with its own median and max
    assert rows == [
        "| 2 | `a_shape:sinks=128,window=4096` (3) | 0.200 | 0.400 |",
        "| 10 | `vertical_slash:vertical_size=1000,slash_size=3000` (2), `a_shape:sinks=128,window=4096` (1) "
        "| 0.300 | 0.500 |",
    ]
