"""What an evaluation task is: build a prompt for (length, depth, sample), then score the model's answer.

The runner sees a task through :meth:`Task.request` (what to send a backend for one sample) and
:meth:`Task.fields` (the record fields of the backend's answer); the perplexity task overrides both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest
from longkit.eval.prompt import FittedPrompt
from longkit.registry import Registry


@dataclass
class TaskContext:
    """What tasks share within one run: the tokenizer, the seed, chat-template use, the haystack source."""

    tokenizer: Any
    seed: int = 0
    #: Wrap prompts in the chat template: True/False for every task, None for each task's own default.
    chat: bool | None = None
    haystack: str | None = None
    ppl_text: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def use_chat(self, task: Task) -> bool:
        return task.chat_default if self.chat is None else self.chat

    def rng(self, task: str, length: int, depth: float | None, sample: int) -> random.Random:
        """A generator that depends only on (seed, task, length, depth, sample): identical prompts for every method."""
        return random.Random(f"{self.seed}|{task}|{length}|{depth}|{sample}")


@dataclass
class GenerationSample:
    """A fitted prompt, the gold answers, and how many tokens to generate."""

    prompt: FittedPrompt
    answers: list[str]
    max_new_tokens: int


class Task:
    """Base of evaluation tasks, registered in :data:`TASKS` by name."""

    name: ClassVar[str] = "?"
    #: Scored tasks generate and score 0..100; unscored ones (perplexity) report NLL.
    scored: ClassVar[bool] = True
    #: Whether the task places a needle at a depth (the depth grid applies).
    uses_depth: ClassVar[bool] = True
    #: Whether prompts use the model's chat template unless the run says otherwise.
    chat_default: ClassVar[bool] = True
    #: Whether prompts expose (instruction, context, question) (:class:`~longkit.eval.prompt.PromptParts`), which
    #: retrieval memory methods need to know what to query with and what to cut.
    has_question: ClassVar[bool] = True

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        raise NotImplementedError

    def score(self, prediction: str, answers: list[str]) -> float:
        raise NotImplementedError

    def preflight(self, ctx: TaskContext, lengths: list[int], depths: list[float], samples: int) -> None:
        """Raise now what a sample of the run would raise later: the runner calls this for every task before the
        first sample. Default: build the first sample at the shortest length, where a prompt's fixed part (template,
        question, RULER's smallest haystack) is most likely not to fit; its data files are read on the way."""
        self.request(ctx, min(lengths), depths[0] if self.uses_depth and depths else None, 0)

    def request(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> tuple[Any, Any]:
        """What to send a backend for one sample, and what :meth:`fields` needs of it later (the built sample)."""
        built = self.build(ctx, length, depth, sample)
        return GenerationRequest(built.max_new_tokens, input_ids=list(built.prompt.input_ids)), built

    def fields(self, built: Any, result: Any) -> dict[str, Any]:
        """The record fields of one sample from the backend's result; a failed request is not scored."""
        return {
            "n_tokens": len(built.prompt),
            "score": self.score(result.text, built.answers) if result.ok else None,
            "prediction": result.text,
            "answer": built.answers,
            "needle_start": built.prompt.needle_start,
            **result.record_fields(),
        }


TASKS = Registry("tasks", "task", error=EvalError)


def register_task(cls: type[Task]) -> type[Task]:
    TASKS.add(cls.name, cls)
    return cls


def get_task(name: str) -> Task:
    return TASKS.get(name)()
