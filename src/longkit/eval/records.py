"""The on-disk format of an evaluation run, shared by the runner (writes, resumes) and the report (reads).

A run directory holds:

``run.json``
    metadata: ``model`` (dict: name, source, dtype, architecture, trained_length, ...), ``methods``
    (list of method-combination labels, e.g. ``["baseline", "rope=yarn:factor=2"]``), ``tasks``,
    ``lengths``, ``depths``, ``samples``, ``seed``, ``threshold``, ``argv``, ``versions``, ``git_commit``,
    ``hardware``, ``started`` (the first invocation's; methods, tasks, lengths and depths are the union of all, samples
    the largest), ``identity`` (every input that changes results, file contents as SHA-256; see
    :mod:`longkit.eval.rundir`) and ``invocations`` (each ``longkit eval`` into the directory: started, argv, grid,
    versions, git_commit, hardware).
``eval.lock``
    held (``flock``) by the eval writing the directory; holds its pid.
``samples.quarantine.jsonl``
    damaged lines a resumed eval moved out of samples.jsonl (see :data:`QUARANTINE_FILE`), if there were any.
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
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longkit.errors import EvalError

RUN_FILE = "run.json"
#: The loss curve of a model trained by ``longkit train``, copied into the run directory that evaluates it.
TRAIN_LOSS_PLOT = "train_loss.png"
SAMPLES_FILE = "samples.jsonl"
#: Damaged lines a resuming eval moved out of ``samples.jsonl``: one JSON object per line, ``line`` (its number in
#: samples.jsonl then), ``reason`` and ``raw`` (the line's text; bytes that are not UTF-8 as ``\udcXX`` escapes,
#: so ``raw.encode("utf-8", "surrogateescape")`` gives back the exact bytes).
QUARANTINE_FILE = "samples.quarantine.jsonl"

log = logging.getLogger(__name__)

#: Fields every record has, with their types (bool is not an int here); ``depth`` is a number or null.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "method": str, "task": str, "length": int, "sample": int, "depth": (int, float, type(None)),
}
#: Fields the report computes with: when present they must be numbers or null.
NUMERIC_FIELDS = ("score", "n_tokens", "nll_sum", "n_targets", "prefill_s", "decode_s", "new_tokens",
                  "peak_mem_bytes", "kv_bytes")


def sample_id(method: str, task: str, length: int, depth: float | None, sample: int) -> str:
    depth_text = "-" if depth is None else f"{depth:.4f}"
    return f"{method}|{task}|{length}|{depth_text}|{sample}"


@dataclass
class BadLine:
    """A line of a JSONL file that is not a valid entry: its 1-based number, why, and its bytes."""

    number: int
    reason: str
    raw: bytes


@dataclass
class JsonlScan:
    """A JSONL file read line by line: the valid entries (line number, value) and every line that is not one.

    ``torn`` is the last line when it has no newline and is not valid: a write cut short (a killed process, or
    one still writing); it is not among ``bad``.
    """

    path: Path
    entries: list[tuple[int, Any]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    torn: BadLine | None = None
    #: The last line is valid but lacks its newline (a write cut just before it).
    unterminated: bool = False

    @property
    def damaged(self) -> list[BadLine]:
        return self.bad + ([self.torn] if self.torn else [])


def scan_jsonl(path: str | Path, check: Any = None) -> JsonlScan:
    """Read ``path`` as bytes and parse each line on its own, so one damaged line (even one cut inside a multi-byte
    UTF-8 character) costs only itself. ``check(value)`` returns why a parsed value is invalid, or None."""
    path = Path(path)
    scan = JsonlScan(path)
    if not path.is_file():
        return scan
    data = path.read_bytes()
    lines = data.split(b"\n")
    last_terminated = lines[-1] == b""
    if last_terminated:
        lines.pop()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        reason = None
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "not UTF-8"
        except json.JSONDecodeError as err:
            reason = f"not JSON ({err.msg} at column {err.colno})"
        else:
            reason = check(value) if check is not None else None
        is_last = number == len(lines)
        if reason is None:
            scan.entries.append((number, value))
            scan.unterminated = is_last and not last_terminated
        elif is_last and not last_terminated:
            scan.torn = BadLine(number, reason, raw)
        else:
            scan.bad.append(BadLine(number, reason, raw))
    return scan


def read_jsonl(path: str | Path) -> Iterator[Any]:
    """Every valid JSON line of an append-only log (none if it does not exist); damaged lines are skipped, so
    everything around them is kept (callers that must account for them use :func:`scan_jsonl`)."""
    for _, value in scan_jsonl(path).entries:
        yield value


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a valid samples.jsonl record (None when it is)."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    for name, types in REQUIRED_FIELDS.items():
        if name not in record:
            return f"missing field {name!r}"
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"field {name!r} is {value!r}"
    for name in NUMERIC_FIELDS:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"field {name!r} is {value!r}"
    return None


def scan_records(run_dir: str | Path) -> JsonlScan:
    return scan_jsonl(Path(run_dir) / SAMPLES_FILE, record_problem)


def _lines_text(lines: list[BadLine]) -> str:
    shown = ", ".join(f"{b.number} ({b.reason})" for b in lines[:5])
    return shown + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")


def _warn_read(scan: JsonlScan) -> None:
    if scan.bad:
        log.warning(
            "warning: %s: %d damaged line(s) left out: line %s; a resumed `longkit eval` into this directory moves "
            "them to %s and recomputes their samples", scan.path, len(scan.bad), _lines_text(scan.bad), QUARANTINE_FILE)
    if scan.torn:
        log.warning("warning: %s: last line %d is incomplete (an interrupted or ongoing write; %d bytes) and is left "
                    "out", scan.path, scan.torn.number, len(scan.torn.raw))


def iter_records(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every valid record of a run, in file order; damaged lines are left out with a warning naming them."""
    scan = scan_records(run_dir)
    _warn_read(scan)
    for _, record in scan.entries:
        yield record


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """All valid records of a run, the last one winning for a repeated id (a retried failure); damaged lines are
    left out with a warning naming them (see :func:`repair_records`)."""
    by_id: dict[str, dict[str, Any]] = {}
    for record in iter_records(run_dir):
        by_id[record["id"]] = record
    return list(by_id.values())


def repair_records(run_dir: str | Path) -> JsonlScan:
    """Make ``samples.jsonl`` safe to append to, before a resumed run does (the caller holds the run's lock).

    A torn last line (a write cut short) is truncated away; any other damaged line is moved to
    :data:`QUARANTINE_FILE` with its line number and reason, and samples.jsonl is rewritten without it (atomically).
    Each is reported by a warning; their samples are then missing, so the run computes them again.
    """
    run_dir = Path(run_dir)
    path = run_dir / SAMPLES_FILE
    scan = scan_records(run_dir)
    if scan.bad:
        with (run_dir / QUARANTINE_FILE).open("a", encoding="utf-8") as fh:
            for bad in scan.bad:
                raw = bad.raw.decode("utf-8", "surrogateescape")
                fh.write(json.dumps({"line": bad.number, "reason": bad.reason, "raw": raw}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        keep = {n for n, _ in scan.entries}
        lines = path.read_bytes().split(b"\n")
        text = b"".join(line + b"\n" for n, line in enumerate(lines, 1) if n in keep)
        _replace(path, text)
        log.warning("warning: %s: %d damaged line(s) moved to %s: line %s; their samples are recomputed",
                    path, len(scan.bad), QUARANTINE_FILE, _lines_text(scan.bad))
    elif scan.torn:
        with path.open("r+b") as fh:
            fh.truncate(path.read_bytes().rfind(b"\n") + 1)
            os.fsync(fh.fileno())
    elif scan.unterminated:
        # A complete record whose newline was not written: keep it, end its line.
        with path.open("ab") as fh:
            fh.write(b"\n")
            os.fsync(fh.fileno())
    if scan.torn:
        log.warning("warning: %s: last line %d was cut short by an interrupted write (%d bytes: %s); truncated away, "
                    "its sample is recomputed", path, scan.torn.number, len(scan.torn.raw), scan.torn.reason)
    return scan


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a crash leaves the old file or the new one, never half of either."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_run(run_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write run.json atomically (a run killed while writing it keeps the previous one)."""
    _replace(Path(run_dir) / RUN_FILE, (json.dumps(meta, indent=2, default=str) + "\n").encode())


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """run.json of a run ({} when there is none); an unreadable one is an EvalError naming it."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{path} is damaged ({err}); restore it, or move samples.jsonl to a new run") from None
    if not isinstance(meta, dict):
        raise EvalError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object)")
    return meta


class RecordWriter:
    """Appends records to ``samples.jsonl``, flushed and fsynced one by one so a crash loses nothing written."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / SAMPLES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fh = self.path.open("a", encoding="utf-8")

    def _repair_tail(self) -> None:
        # A run killed mid-write leaves a line without its newline; cut it so the next record starts clean (the
        # runner has already repaired the file with repair_records, which reports it; this guards other writers).
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
