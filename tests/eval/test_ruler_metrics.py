"""RULER's metrics, post-processing, effective length and weighted averages on hand-made examples."""

import math

import pytest

from longkit.errors import EvalError
from longkit.eval import effective_length, string_match_all, string_match_part
from longkit.eval.metrics import (
    RULER_TASK_METRICS,
    postprocess_pred,
    ruler_score,
    weighted_average,
)
from longkit.eval.ruler import TASKS
from longkit.eval.ruler.freq_words import zeta


def test_string_match_all_counts_the_fraction_of_gold_strings():
    preds = ["a 123 b", "x", "nothing"]
    refs = [["123", "456"], ["X"], ["7"]]
    # (1/2 + 1 + 0) / 3 * 100, rounded to 2 decimals as RULER does
    assert string_match_all(preds, refs) == 50.0
    assert string_match_all(["1 2 3"], [["1", "2", "4"]]) == 66.67


def test_string_match_part_needs_any_gold_string():
    preds = ["a 123 b", "x", "nothing"]
    refs = [["123", "456"], ["X"], ["7"]]
    assert string_match_part(preds, refs) == 66.67
    assert string_match_part(["the Eiffel Tower"], [["eiffel tower", "Paris"]]) == 100.0


def test_matching_is_case_insensitive_substring():
    assert string_match_all(["ANSWER: Brave-Falcon."], [["brave-falcon"]]) == 100.0
    assert string_match_all(["12345"], [["123456"]]) == 0.0


def test_postprocess_is_rulers():
    assert postprocess_pred("  foo\x00bar\tbaz \n") == "foo\nbar\nbaz"
    assert postprocess_pred("\x1f 7 \x1b") == "7"


def test_per_task_metric_map_is_rulers():
    assert set(RULER_TASK_METRICS) == set(TASKS)
    assert {t for t, m in RULER_TASK_METRICS.items() if m == "string_match_part"} == {"qa_1", "qa_2"}
    # qa: any gold answer suffices; niah: all values needed
    assert ruler_score("qa_1", [" Paris\n"], [["paris", "France"]]) == 100.0
    assert ruler_score("niah_multivalue", [" 1, 2"], [["1", "2", "3", "4"]]) == 50.0
    with pytest.raises(EvalError, match="unknown RULER task 'niah'"):
        ruler_score("niah", ["x"], [["x"]])


def test_metric_input_errors():
    with pytest.raises(EvalError, match="equal length"):
        string_match_all(["a", "b"], [["a"]])
    with pytest.raises(EvalError, match="non-empty list"):
        string_match_part(["a"], ["a"])


def test_effective_length_is_strictly_above_the_threshold():
    assert effective_length({4096: 90.0, 8192: 85.6, 16384: 40.0}) == 4096
    assert effective_length({4096: 85.6}) is None
    assert effective_length({4096: 50.0, 8192: 86.0}) == 8192
    assert effective_length({4096: 95.0, 8192: 91.0}, threshold=92) == 4096


def test_weighted_averages():
    scores = {8192: 60.0, 4096: 90.0}
    assert weighted_average(scores, increasing=True) == pytest.approx((90 * 1 + 60 * 2) / 3)
    assert weighted_average(scores, increasing=False) == pytest.approx((90 * 2 + 60 * 1) / 3)


def test_weighted_averages_reproduce_rulers_readme():
    """RULER's README row for GPT-4-1106-preview (4K..128K): 96.6 96.3 95.2 93.2 87.0 81.2 -> wAvg 89.0 (inc) / 94.1
    (dec): weights 1..6 rising with length for inc, falling for dec (a swapped order would give 94.1 / 89.0)."""
    row = dict(zip([4096 * 2**i for i in range(6)], [96.6, 96.3, 95.2, 93.2, 87.0, 81.2], strict=True))
    assert round(weighted_average(row, increasing=True), 1) == 89.0
    assert round(weighted_average(row, increasing=False), 1) == 94.1
    assert effective_length(row) == 65536


def test_zeta_matches_closed_forms():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, abs=1e-12)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, abs=1e-12)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    with pytest.raises(EvalError, match="alpha"):
        zeta(1.0)
