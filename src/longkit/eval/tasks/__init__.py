"""Evaluation tasks, registered by name in :data:`TASKS`."""

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
