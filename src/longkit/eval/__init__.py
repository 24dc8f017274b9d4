"""Evaluation: tasks (passkey, needle, perplexity), a resumable runner, metrics and reports.

>>> from longkit.eval import EvalConfig, evaluate, write_report
>>> run_dir = evaluate(EvalConfig(model="smollm2-135m", methods=["baseline", "rope=yarn:factor=2"]))
>>> write_report(run_dir)
"""

from longkit.eval import backends, ruler, suites
from longkit.eval.metrics import (
    RULER_THRESHOLD,
    effective_length,
    string_match_all,
    string_match_part,
    weighted_average,
)
from longkit.eval.records import load_records, load_run
from longkit.eval.report import compare_runs, summarize, write_report
from longkit.eval.runner import EvalConfig, evaluate
from longkit.eval.tasks import TASKS, get_task

__all__ = [
    "RULER_THRESHOLD",
    "TASKS",
    "EvalConfig",
    "compare_runs",
    "effective_length",
    "evaluate",
    "get_task",
    "load_records",
    "load_run",
    "backends",
    "ruler",
    "string_match_all",
    "string_match_part",
    "suites",
    "summarize",
    "weighted_average",
    "write_report",
]
