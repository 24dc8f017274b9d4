"""BABILong against the official code (booydar/babilong): prompts from babilong/prompts.py, label matching from
babilong/metrics.py ``compare_answers``, and per-file accuracy on rows of the published evaluation files as
collect_results.py computes it. Expected values were produced by running that code (the file's "source")."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from longkit.eval.suites import babilong, get_suite
from longkit.eval.suites.scoring import BABILONG_LABELS, babilong_compare

OFFICIAL = json.loads((FIXTURES / "suites" / "babilong_official" / "official.json").read_text(encoding="utf-8"))


class CountingTokenizer:
    """Enough tokenizer for BABILong's prompt (which only counts tokens): one id per whitespace word."""

    chat_template = None

    def __call__(self, text):
        class Enc:
            input_ids = list(range(len(text.split())))

        return Enc()


def test_prompts_equal_get_formatted_input_for_every_task_and_switch():
    record = {"input": OFFICIAL["context"], "question": OFFICIAL["question"]}
    assert set(babilong.PROMPTS) == set(OFFICIAL["prompts"]) == {f"qa{i}" for i in range(1, 21)}
    suite = get_suite("babilong")
    for task, expected in OFFICIAL["prompts"].items():
        assert babilong.format_input(task, record) == expected["all"], task
        assert babilong.format_input(task, record, False, False, False) == expected["none"], task
        assert babilong.format_input(task, record, examples=False) == expected["no_examples"], task
        prompt = suite.prompt(task, record, CountingTokenizer(), 0, chat=None)
        assert prompt.text == expected["all"] and prompt.max_new_tokens == 20 and not prompt.truncated


def test_task_labels_equal_metrics_py():
    assert {task: list(labels) for task, labels in BABILONG_LABELS.items()} == OFFICIAL["task_labels"]


@pytest.mark.parametrize("case", OFFICIAL["cases"], ids=lambda c: f"{c['task']}:{c['output'][:24]!r}")
def test_label_matching_equals_compare_answers(case):
    labels = BABILONG_LABELS[case["task"]]
    assert babilong_compare(case["target"], case["output"], case["question"], labels) is case["correct"]
    score = get_suite("babilong").score(case["task"], case["output"], case)
    assert score == (100.0 if case["correct"] else 0.0)


@pytest.mark.parametrize("entry", OFFICIAL["evals"], ids=lambda e: f"{e['model'].split('/')[1]}:{e['file'][:30]}")
def test_published_evaluation_rows_score_the_official_accuracy(entry):
    suite = get_suite("babilong")
    rows = [
        {
            "method": "m",
            "length": 0,
            "task": entry["task"],
            "error": None,
            "score": suite.score(entry["task"], r["output"], r),
        }
        for r in entry["rows"]
    ]
    assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(entry["accuracy"], abs=1e-9)
    assert suite.summarize(rows)["m"][0][entry["task"]]["score"] == round(entry["accuracy"], 2)
