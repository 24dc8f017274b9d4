"""Scores and summaries shared by every evaluation: RULER's string-match metrics, effective context length and
RULER's weighted averages.

The metrics are RULER's (``scripts/eval/synthetic/constants.py`` and ``scripts/eval/evaluate.py`` of
https://github.com/NVIDIA/RULER): a prediction is post-processed (stripped, control characters turned into
newlines), then a gold string counts when it occurs in it, case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from longkit.errors import EvalError

#: RULER's threshold: Llama-2-7B's average score at 4K (arXiv 2404.06654, Figure/Table 3).
RULER_THRESHOLD = 85.6

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's postprocess_pred: strip, replace every control character (\\x00-\\x1f) by a newline, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if isinstance(preds, str) or len(preds) != len(refs):
        raise EvalError(
            f"parameters 'preds' and 'refs' must be lists of equal length (got {type(preds).__name__} of "
            f"{len(preds)} and {len(refs)})"
        )
    if not preds:
        raise EvalError("parameter 'preds' must hold at least one prediction")
    for ref in refs:
        if isinstance(ref, str) or not ref:
            raise EvalError(f"each entry of 'refs' must be a non-empty list of gold strings (got {ref!r})")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_all: mean over samples of the fraction of gold strings found in the prediction, x100.

    Rounded to 2 decimals as RULER reports it. Used for niah, vt, cwe and fwe.
    """
    _check(preds, refs)
    total = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_part: a sample scores 1 if any gold string is in the prediction; mean x100 (qa)."""
    _check(preds, refs)
    total = sum(max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}

#: RULER's metric per task family.
RULER_METRICS = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
}

#: RULER's metric per task.
RULER_TASK_METRICS = {
    **{
        t: "string_match_all"
        for t in (
            "niah_single_1",
            "niah_single_2",
            "niah_single_3",
            "niah_multikey_1",
            "niah_multikey_2",
            "niah_multikey_3",
            "niah_multivalue",
            "niah_multiquery",
            "vt",
            "cwe",
            "fwe",
        )
    },
    "qa_1": "string_match_part",
    "qa_2": "string_match_part",
}


def ruler_score(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's score of a task: its metric on post-processed predictions."""
    if task not in RULER_TASK_METRICS:
        raise EvalError(f"unknown RULER task '{task}'; valid tasks: {', '.join(RULER_TASK_METRICS)}")
    return METRICS[RULER_TASK_METRICS[task]]([postprocess_pred(p) for p in preds], refs)


def effective_length(scores_by_length: Mapping[int, float], threshold: float = RULER_THRESHOLD) -> int | None:
    """The longest tested length whose score is strictly above ``threshold``; None if no length is.

    This is the rule of the RULER tables: a length counts on its own, so a model that fails at 8K and
    passes at 16K has effective length 16K (scores are usually monotone; the rule is kept as RULER states it).
    """
    passing = [int(length) for length, score in scores_by_length.items() if score is not None and score > threshold]
    return max(passing) if passing else None


def weighted_average(scores_by_length: Mapping[int, float], increasing: bool = True) -> float | None:
    """RULER's wAvg: lengths weighted 1..n (``increasing``, favours long) or n..1 (decreasing) in sorted order."""
    items = sorted((int(k), v) for k, v in scores_by_length.items() if v is not None)
    if not items:
        return None
    n = len(items)
    weights = list(range(1, n + 1)) if increasing else list(range(n, 0, -1))
    return sum(w * v for w, (_, v) in zip(weights, items, strict=True)) / sum(weights)
