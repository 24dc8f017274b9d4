"""Evaluation tasks, registered by name in :data:`TASKS`."""

from longkit.eval.tasks import needle, passkey, perplexity  # noqa: F401  (registration)
from longkit.eval.tasks.base import TASKS, GenerationSample, Task, TaskContext, get_task, register_task

__all__ = ["TASKS", "GenerationSample", "Task", "TaskContext", "get_task", "register_task"]
