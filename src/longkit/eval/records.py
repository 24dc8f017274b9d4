"""The on-disk format of an evaluation run, shared by the runner (writes, resumes) and the report (reads).

A run directory holds:

``run.json``
    metadata: ``model`` (dict: name, source, dtype, architecture, trained_length, ...), ``methods``
    (list of method-combination labels, e.g. ``["baseline", "rope=yarn:factor=2"]``), ``tasks``,
    ``lengths``, ``depths``, ``samples``, ``seed``, ``threshold``, ``argv``, ``versions``, ``git_commit``,
    ``hardware``, ``started``.
``samples.jsonl``
    one JSON object per finished sample, appended and flushed as soon as it is computed:

    ============== ====================================================================
    id             unique key ``method|task|length|depth|sample`` (resume skips these)
    method         method-combination label
    task           task name: ``passkey``, ``needle``, ``perplexity``, RULER's ``niah_single_1``...; ``suite/task`` for a suite
    length         requested context length in tokens (int)
    depth          needle depth as a fraction 0..1 (float), or null
    sample         sample index (int)
    n_tokens       tokens actually fed to the model (int; == length for fitted prompts)
    score          0..100 for scored tasks; null for perplexity
    prediction     generated text (scored tasks)
    answer         list of gold strings (scored tasks)
    nll_sum        summed negative log-likelihood (perplexity only)
    n_targets      number of scored tokens (perplexity only)
    prefill_s      prefill wall time, seconds
    decode_s       decode wall time, seconds (0 for perplexity)
    new_tokens     generated tokens
    peak_mem_bytes peak memory above the pre-sample level (CPU: resident set; CUDA: allocator)
    kv_bytes       bytes held by the KV cache after prefill (chunked perplexity: after the whole window)
    ppl_protocol   perplexity only: ``full`` (one forward) or ``chunked:C`` (C-token chunks against a KV method's
                   compressed cache; see ``--ppl-chunk``)
    kv_kept        chunked perplexity: tokens kept / tokens seen by the cache at the end (null if not counted)
    ============== ====================================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"


def sample_id(method: str, task: str, length: int, depth: float | None, sample: int) -> str:
    depth_text = "-" if depth is None else f"{depth:.4f}"
    return f"{method}|{task}|{length}|{depth_text}|{sample}"


def read_jsonl(path: str | Path) -> Iterator[Any]:
    """Every complete JSON line of an append-only log (none if it does not exist); a line cut short by an
    interrupted write is skipped, so everything before it is kept."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def iter_records(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a run; a torn last line (interrupted write) is skipped."""
    for record in read_jsonl(Path(run_dir) / SAMPLES_FILE):
        if isinstance(record, dict) and "id" in record:
            yield record


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run, the last one winning for a repeated id."""
    by_id: dict[str, dict[str, Any]] = {}
    for record in iter_records(run_dir):
        by_id[record["id"]] = record
    return list(by_id.values())


def load_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class RecordWriter:
    """Appends records to ``samples.jsonl``, flushed and fsynced one by one so a crash loses nothing written."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / SAMPLES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = self.path.open("a")

    def _repair_tail(self) -> None:
        # A run killed mid-write leaves a line without its newline; cut it so the next record starts clean.
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as fh:
                fh.truncate(cut)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
