"""Evaluation tasks, registered by name in :data:`TASKS`: what ``--task NAME`` names without ``--suite``.

A task builds a sample for (length, depth, sample index) and scores the answer. Elsewhere: a benchmark suite's
tasks are its data files (``longbench/hotpotqa``, see :mod:`longkit.eval.suites`), and RULER's sample builders
are :class:`longkit.eval.ruler.RulerGenerator`; the runner turns either into jobs (:mod:`longkit.eval.jobs`).
"""

from longkit.eval.tasks import (  # noqa: F401  (registration)
    lost_in_middle,
    multi_needle,
    needle,
    passkey,
    perplexity,
    ruler,
)
from longkit.eval.tasks.base import TASKS, GenerationSample, Task, TaskContext, get_task, register_task

__all__ = ["TASKS", "GenerationSample", "Task", "TaskContext", "get_task", "register_task"]
