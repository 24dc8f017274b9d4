"""What a benchmark suite is: published data files in a user directory, a prompt per record, the suite's own
truncation, and its official metric per task. Suites are registered by name in :data:`SUITES`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longkit.errors import EvalError
from longkit.registry import Registry


@dataclass
class SuitePrompt:
    """One record's prompt: the text after the suite's truncation, before any chat template."""

    text: str
    #: Whether to wrap ``text`` as a user turn in the model's chat template (or send it as a chat message).
    chat: bool
    max_new_tokens: int
    #: Prompt tokens before truncation (with the tokenizer's special tokens, as the suites count them).
    n_tokens_full: int = 0
    truncated: bool = False
    #: Stop at the first newline (LongBench samsum, as its pred.py adds the newline token to the EOS ids).
    stop_newline: bool = False
    system: str | None = None


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, each checked for its required fields; errors name the file and line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"cannot read data file {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        check_record(record, required, f"{path}:{number}")
        records.append(record)
    return records


def read_json_array(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a JSON file holding one list of objects (or, if it fails to parse as one, JSON lines)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"cannot read data file {path}: {err}") from None
    if not text.lstrip().startswith("["):
        return read_jsonl(path, required)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    for index, record in enumerate(data):
        check_record(record, required, f"{path}: record {index}")
    return data


def read_parquet(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalError(f"{path} is a parquet file; reading it needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001  (pyarrow raises many types for a damaged file)
        raise EvalError(f"cannot read parquet file {path}: {err}") from None
    for index, record in enumerate(rows):
        check_record(record, required, f"{path}: row {index}")
    return rows


def check_record(record: Any, required: dict[str, type | tuple[type, ...]], where: str) -> None:
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, kind in required.items():
        if key not in record:
            raise EvalError(f"{where}: missing field '{key}' (fields: {', '.join(sorted(record))})")
        if not isinstance(record[key], kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise EvalError(f"{where}: field '{key}' must be {names}, got {type(record[key]).__name__}")


def truncate_middle(
    tokenizer: Any, text: str, max_length: int, *, style: str, joined: bool = False
) -> tuple[str, int, bool]:
    """Keep the start and the end of a too-long prompt, measured in tokens: (text, tokens before, truncated).

    ``style="longbench"`` keeps ``int(L/2)`` tokens from each end (LongBench v1 pred.py, so L-1 tokens for odd L);
    ``style="floor"`` keeps ``ids[:L//2] + ids[-L//2:]`` (LongBench v2; ``-L//2`` rounds down, so the end
    keeps the extra token for odd L). Tokens are counted with the tokenizer's special tokens and decoded with
    ``skip_special_tokens=True``, as both suites do. InfiniteBench's official scripts truncate differently
    (completion vs chat budgets, and they re-decode prompts that fit): ``infinitebench.truncate``.

    ``joined`` picks how the kept ids become text, which the suites' official code does differently:
    ``False`` decodes head and tail separately and concatenates the strings (LongBench v1 pred.py);
    ``True`` decodes ``head + tail`` once (LongBench v2 pred.py). They differ at the seam for SentencePiece /
    Metaspace tokenizers, whose decode drops the leading space of its first piece: separate decodes lose the
    space the tail's first token carries ("Monday Thethe" where the joined decode gives "Monday The the").
    """
    ids = tokenizer(text).input_ids
    if len(ids) <= max_length:
        return text, len(ids), False
    if style == "longbench":
        half = int(max_length / 2)
        head, tail = ids[:half], ids[-half:] if half else []
    elif style == "floor":
        head, tail = ids[: max_length // 2], ids[-max_length // 2 :]
    else:
        raise EvalError(f"truncation style must be 'longbench' or 'floor' (got {style!r})")
    if joined:
        cut = tokenizer.decode(list(head) + list(tail), skip_special_tokens=True)
    else:
        cut = tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)
    return cut, len(ids), True


class Suite:
    """Base of benchmark suites. Subclasses set ``name``, ``tasks`` and implement the hooks below."""

    name: ClassVar[str] = "?"
    tasks: ClassVar[tuple[str, ...]] = ()
    #: What ``lengths`` means for this suite: "truncation" (max prompt tokens) or "split" (BABILong data split).
    length_kind: ClassVar[str] = "truncation"
    paper: ClassVar[str] = ""

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise EvalError(f"unknown {self.name} task '{task}'; valid tasks: {', '.join(self.tasks)}")

    def data_file(self, data_dir: Path, task: str, length: int | None = None) -> Path:
        raise NotImplementedError

    def available(self, data_dir: Path) -> list[str]:
        """The tasks that have a data file in ``data_dir`` (the default task list)."""
        out = []
        for task in self.tasks:
            try:
                self.data_file(data_dir, task, None)
            except EvalError:
                continue
            out.append(task)
        return out

    def load(self, data_dir: str | Path, task: str, length: int | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def prompt(
        self, task: str, record: dict[str, Any], tokenizer: Any, max_length: int, chat: bool | None
    ) -> SuitePrompt:
        raise NotImplementedError

    def answers(self, task: str, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def score(self, task: str, prediction: str, record: dict[str, Any]) -> float:
        """The official per-sample score, scaled to 0..100."""
        raise NotImplementedError

    def meta(self, task: str, record: dict[str, Any]) -> dict[str, Any]:
        """Extra per-sample fields for the run record (record id, length bucket, difficulty...)."""
        return {}

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Official aggregates of a run's records: per (method, length, task) mean score; errors counted apart."""
        return summarize_by_task(records)


def summarize_by_task(records: list[dict[str, Any]], extra: Any = None) -> dict[str, Any]:
    """``{method: {length: {task: {"score", "n", "errors", **extra(rs)}}}}``, scores rounded to 2 dp as the suites."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], int(r["length"]), r["task"]), []).append(r)
    out: dict[str, Any] = {}
    for (method, length, task), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("error") is None and r.get("score") is not None]
        cell: dict[str, Any] = {
            "score": round(sum(float(r["score"]) for r in ok) / len(ok), 2) if ok else None,
            "n": len(ok),
            "errors": len(rs) - len(ok),
        }
        if extra is not None:
            cell.update(extra(ok))
        out.setdefault(method, {}).setdefault(length, {})[task] = cell
    return out


SUITES = Registry("suites", "suite", error=EvalError)


def register_suite(cls: type[Suite]) -> type[Suite]:
    SUITES.add(cls.name, cls)
    return cls


def get_suite(name: str) -> Suite:
    return SUITES.get(name)()


def use_chat(tokenizer: Any, chat: bool | None, default: bool = True) -> bool:
    """Chat template on when asked, or by default when the tokenizer has one."""
    if chat is None:
        return default and getattr(tokenizer, "chat_template", None) is not None
    return chat
