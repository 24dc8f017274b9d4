"""LongBench v2 from its published ``data.json`` (503 four-choice questions over long contexts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longkit.errors import EvalError
from longkit.eval.suites.base import Suite, SuitePrompt, read_json_array, register_suite, truncate_middle, use_chat
from longkit.eval.suites.scoring import extract_choice_v2

# prompts/0shot.txt
TEMPLATE_0SHOT = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
MAX_NEW_TOKENS = 128
FIELDS = {
    "_id": str, "question": str, "choice_A": str, "choice_B": str, "choice_C": str, "choice_D": str,
    "answer": str, "context": str, "difficulty": str, "length": str,
}  # fmt: skip
SPLITS = {"difficulty": ("easy", "hard"), "length": ("short", "medium", "long")}


def fill_template(record: dict[str, Any]) -> str:
    """pred.py: each placeholder replaced by the stripped field."""
    return (
        TEMPLATE_0SHOT.replace("$DOC$", record["context"].strip())
        .replace("$Q$", record["question"].strip())
        .replace("$C_A$", record["choice_A"].strip())
        .replace("$C_B$", record["choice_B"].strip())
        .replace("$C_C$", record["choice_C"].strip())
        .replace("$C_D$", record["choice_D"].strip())
    )


@register_suite
class LongBenchV2(Suite):
    """LongBench v2, zero-shot without chain of thought (``prompts/0shot.txt``).

    Prompt: the template with ``$DOC$ $Q$ $C_A..$C_D$`` replaced by the stripped fields, truncated in the middle
    to ``length`` tokens (``ids[:L//2] + ids[-L//2:]``, decoded once as one list as pred.py does, so a
    SentencePiece seam keeps its space), sent as one user turn (chat template on by default when the tokenizer
    has one). 128 new tokens. Score: 100 if the answer extracted by "The correct answer is (X)" /
    "The correct answer is X" (after removing '*') equals the gold letter, else 0; the summary gives Overall,
    Easy, Hard, Short, Medium, Long as result.py (1 dp; its early 'medium' typo is fixed upstream in 5214a55).
    Differences: pred.py samples at temperature 0.1; longkit decodes greedily. CoT, no-context and RAG modes
    are not provided. Task: ``all`` (every record of the file).
    Based on LongBench v2 (Bai et al. 2024), https://arxiv.org/abs/2412.15204.
    Data: ``DIR/data.json`` (or ``DIR/longbench_v2.json``), a list of objects with ``_id, domain, sub_domain,
    difficulty, length, question, choice_A..choice_D, answer, context``.
    """

    name = "longbench_v2"
    tasks = ("all",)
    paper = "LongBench v2: Towards Deeper Understanding and Reasoning on Realistic Long-context Multitasks (Bai et al. 2024) https://arxiv.org/abs/2412.15204"

    def data_file(self, data_dir: Path, task: str, length: int | None = None) -> Path:
        self.check_task(task)
        for name in ("data.json", "longbench_v2.json", "data.jsonl"):
            if (Path(data_dir) / name).is_file():
                return Path(data_dir) / name
        raise EvalError(f"no LongBench v2 file: expected {Path(data_dir) / 'data.json'}")

    def load(self, data_dir: str | Path, task: str, length: int | None = None) -> list[dict[str, Any]]:
        path = self.data_file(Path(data_dir), task)
        records = read_json_array(path, FIELDS)
        for index, record in enumerate(records):
            if record["answer"] not in ("A", "B", "C", "D"):
                raise EvalError(f"{path}: record {index}: field 'answer' must be one of A, B, C, D")
            for split, values in SPLITS.items():
                if record[split] not in values:
                    raise EvalError(f"{path}: record {index}: field '{split}' must be one of {', '.join(values)}")
        return records

    def prompt(
        self, task: str, record: dict[str, Any], tokenizer: Any, max_length: int, chat: bool | None
    ) -> SuitePrompt:
        text, n_full, cut = truncate_middle(tokenizer, fill_template(record), max_length, style="floor", joined=True)
        return SuitePrompt(text, use_chat(tokenizer, chat), MAX_NEW_TOKENS, n_full, cut)

    def answers(self, task: str, record: dict[str, Any]) -> list[str]:
        return [record["answer"]]

    def score(self, task: str, prediction: str, record: dict[str, Any]) -> float:
        return 100.0 if extract_choice_v2(prediction) == record["answer"] else 0.0

    def meta(self, task: str, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "record_id": record["_id"],
            "difficulty": record["difficulty"],
            "length_class": record["length"],
            "domain": record.get("domain"),
        }

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from longkit.eval.suites.base import summarize_by_task

        def splits(rs: list[dict[str, Any]]) -> dict[str, Any]:
            out = {}
            for key, field in (
                ("easy", "difficulty"),
                ("hard", "difficulty"),
                ("short", "length_class"),
                ("medium", "length_class"),
                ("long", "length_class"),
            ):
                vals = [float(r["score"]) for r in rs if r.get(field) == key]
                out[key] = round(sum(vals) / len(vals), 1) if vals else None
            return {"splits": out}

        return summarize_by_task(records, splits)
