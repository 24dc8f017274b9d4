"""The RULER benchmark's combined table and its timing history (benchmarks/ruler/run.py)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO
from grid_records import load_script
from longkit.eval import ruler

RUNNER = REPO / "benchmarks" / "ruler" / "run.py"


def _runner():
    return load_script(RUNNER)


def _write_run(d: Path, length: int, methods: dict[str, float], tasks: list[str], samples: int = 2) -> None:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"methods": list(methods), "tasks": tasks, "lengths": [length]}))
    with open(d / "samples.jsonl", "w") as fh:
        for method, score in methods.items():
            for task in tasks:
                for s in range(samples):
                    rec = {"id": f"{method}|{task}|{length}|{s}", "method": method, "task": task, "length": length,
                           "depth": None, "sample": s, "score": score, "prefill_s": 1.5, "decode_s": 0.5}  # fmt: skip
                    fh.write(json.dumps(rec) + "\n")


def test_combined_table_columns_per_method_and_length_and_marks_partial_averages(tmp_path):
    run = _runner()
    tasks = [t if not t.startswith("qa_") else f"{t}_synthetic" for t in ruler.TASKS]
    _write_run(tmp_path / "a", 4096, {"baseline": 40.0, "rope=yarn:factor=2": 60.0}, tasks)
    # The 8K run stopped after two tasks of the baseline: its average covers 2 of 13 tasks and must say so.
    _write_run(tmp_path / "b", 8192, {"baseline": 20.0}, tasks[:2], samples=1)
    text = run.combined([tmp_path / "a", tmp_path / "b"])
    lines = text.splitlines()
    assert lines[0] == "| task | `baseline` 4K | `rope=yarn:factor=2` 4K | `baseline` 8K |"
    assert lines[2] == f"| {tasks[0]} | 40.0 | 60.0 | 20.0 |"
    assert f"| {tasks[-1]} | 40.0 | 60.0 | – |" in lines
    assert "| **average** | **40.0** | **60.0** | **20.0** (2/13 tasks) |" in lines
    assert lines[-1] == "| samples per task | 2 | 2 | 1 |"


def test_timing_keeps_every_invocation_and_totals_record_time(tmp_path):
    run = _runner()
    d = tmp_path / "r"
    _write_run(d, 4096, {"baseline": 0.0}, ["vt"], samples=3)
    # A timing file written before invocations were kept counts as the first invocation.
    (d / "timing.json").write_text(json.dumps({"wall_s": 10.0, "samples_computed": 2}))
    run.write_timing(d, {"wall_s": 5.0, "samples_computed": 1})
    t = json.loads((d / "timing.json").read_text())
    assert [i["wall_s"] for i in t["invocations"]] == [10.0, 5.0]
    assert t["wall_s"] == 15.0 and t["samples"] == 3 and t["compute_s"] == 6.0
    run.write_timing(d, {"wall_s": 1.0, "samples_computed": 0})
    assert len(json.loads((d / "timing.json").read_text())["invocations"]) == 3
