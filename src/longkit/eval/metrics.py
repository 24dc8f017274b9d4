"""Scores and summaries shared by every evaluation: effective context length and RULER's weighted averages."""

from __future__ import annotations

from collections.abc import Mapping

#: RULER's threshold: Llama-2-7B's average score at 4K (arXiv 2404.06654, Figure/Table 3).
RULER_THRESHOLD = 85.6


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
