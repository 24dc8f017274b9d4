"""Helpers of the tests of the benchmarks: load a script as a module (every benchmark test loads its script here);
for the grids (benchmarks/evalgrid.py's scripts), run a script as the user does and write run directories of
made-up records."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO


def load_script(path: Path) -> ModuleType:
    """A benchmark script as a module named ``bench_<folder>_<stem>`` (the scripts are not a package): the one
    loader of the tests."""
    name = "bench_" + "_".join(Path(path).resolve().relative_to(REPO / "benchmarks").with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as an import would be: dataclasses look the module up in sys.modules to resolve
    # string annotations. Put back afterwards so that loading a script leaves nothing behind.
    before = sys.modules.pop(name, None)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        if before is not None:
            sys.modules[name] = before
    return module


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the repository root; its ``longkit eval`` steps import this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=REPO)


def record(method: str, task: str, length: int, depth, sample: int, score: float | None, answer: str,
           **extra) -> dict:
    """A sample record as ``longkit eval`` writes it (2 s prefill, 0.5 s decode, 1 MiB peak and KV)."""
    return {"id": f"{method}|{task}|{length}|{depth}|{sample}", "method": method, "task": task, "length": length,
            "depth": depth, "sample": sample, "n_tokens": length, "score": score, "prediction": "", "answer": [answer],
            "needle_start": None, "prefill_s": 2.0, "decode_s": 0.5, "new_tokens": 4, "peak_mem_bytes": 2**20,
            "kv_bytes": 2**20, **extra}


def write_run(d: Path, records: list[dict], model: str = "m", seed: int = 0) -> None:
    """A run directory: run.json with the prompt settings and samples.jsonl."""
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"config": {"model": model, "seed": seed, "haystack": None, "chat": None}}))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def check_rerender_and_doctored(grid: ModuleType, results: Path, text: str, run: str, prompt: str) -> None:
    """The grid's table re-renders from the records alone, byte for byte, and a second render writes the same
    files; then a doctored record (another answer for the first prompt of ``run``) fails the same-prompt check
    with the message naming ``prompt``."""
    assert grid.table(results)[0] == text
    before = (results / "results.json").read_bytes()
    grid.render(type("Args", (), {"results": str(results)})())
    assert (results / "table.md").read_text() == text and (results / "results.json").read_bytes() == before
    path = results / run / "samples.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[0]["answer"] = ["99999"]
    path.write_text("".join(json.dumps(x) + "\n" for x in records))
    with pytest.raises(SystemExit, match=re.escape(f"different prompts for {prompt}")):
        grid.table(results)
