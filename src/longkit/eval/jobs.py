"""The runner's work items: one job per sample of a run, whatever defines it (a task, a suite record).

A :class:`Job` names its sample (``id``, the key of ``samples.jsonl`` that a resumed run skips), the method
combination it runs under and the task it reports as; ``request`` is what to send a backend (a generation request,
or a perplexity window to score) and ``record`` turns the backend's result into the sample's record. The runner
sends every job through one loop, to the local model or to an endpoint alike; new kinds of work join it by
implementing this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest, GenerationResult, NLLRequest, messages_for
from longkit.eval.records import sample_id
from longkit.eval.retrieval import is_refusal, memory_fields, retrieval_memory, retrieval_request
from longkit.eval.suites import Suite, get_suite
from longkit.eval.tasks import TaskContext, get_task
from longkit.eval.windows import windowed_memory, windowed_request
from longkit.memory.base import PromptMemory
from longkit.memory.windows import ParallelWindows
from longkit.seam import MethodSpec

if TYPE_CHECKING:
    from longkit.eval.runner import EvalConfig


class Job(Protocol):
    #: Method-combination label: the runner applies each combination once, for all of its jobs.
    method: str
    #: Task name in records and reports.
    task: str
    #: Context length in tokens (the progress bar counts these).
    length: int

    @property
    def id(self) -> str: ...

    def request(self, ctx: TaskContext) -> GenerationRequest | NLLRequest: ...

    def record(self, result: Any) -> dict[str, Any]:
        """The sample's record from the backend's result of this job's last ``request``."""
        ...

    def follow_up(self, result: Any) -> GenerationRequest | None:
        """A second request this sample needs after ``result`` (Self-Route's long-context answer), or None; the
        runner sends it and passes its result to :meth:`record`."""
        ...


@dataclass
class TaskJob:
    """One sample of a registered task (:data:`longkit.eval.tasks.TASKS`)."""

    method: str
    task: str
    length: int
    depth: float | None
    sample: int
    #: The combination's prompt-level memory method (RAG, Self-Route, LongLLMLingua): the prompt is built from the
    #: context it keeps.
    memory: PromptMemory | None = field(default=None, repr=False)
    #: The combination's parallel-window memory method (PCW, NBCE): the backend reads the context in windows.
    windowed: ParallelWindows | None = field(default=None, repr=False)
    #: (task, built sample, retrieval or None, earlier results) between ``request`` and ``record``.
    _pending: Any = field(default=None, init=False, repr=False)

    @property
    def id(self) -> str:
        return sample_id(self.method, self.task, self.length, self.depth, self.sample)

    def request(self, ctx: TaskContext) -> GenerationRequest | NLLRequest:
        task = get_task(self.task)
        if self.windowed is not None:
            built = task.build(ctx, self.length, self.depth, self.sample)
            self._pending = (task, built, None, [])
            return windowed_request(self.windowed, task.name, built)
        if self.memory is None:
            request, built = task.request(ctx, self.length, self.depth, self.sample)
            self._pending = (task, built, None, [])
            return request
        built = task.build(ctx, self.length, self.depth, self.sample)
        request, got = retrieval_request(self.memory, ctx.tokenizer, task.name, built)
        self._pending = (task, built, got, [])
        return request

    def follow_up(self, result: Any) -> GenerationRequest | None:
        task, built, got, earlier = self._pending
        if got is None or earlier or not self.memory.routes or not result.ok or not is_refusal(result.text):
            return None
        # Self-Route: the retrieved chunks did not answer; ask again with the full context (the original prompt).
        earlier.append(result)
        return GenerationRequest(built.max_new_tokens, input_ids=list(built.prompt.input_ids))

    def record(self, result: Any) -> dict[str, Any]:
        (task, built, got, earlier), self._pending = self._pending, None
        out = {"id": self.id, "method": self.method, "task": self.task, "length": self.length,
               "depth": self.depth, "sample": self.sample, **task.fields(built, result)}
        if got is not None:
            out.update(memory_fields(self.memory, built, got, [*earlier, result]))
        return out


@dataclass
class SuiteJob:
    """A suite record to run: ``sample`` is its index in the suite task's file (at this length for BABILong)."""

    method: str
    task: str
    length: int
    sample: int
    suite: Suite = field(repr=False)
    suite_task: str
    data: dict[str, Any] = field(repr=False)
    #: The prompt between ``request`` and ``record``.
    _prompt: Any = field(default=None, init=False, repr=False)

    @property
    def id(self) -> str:
        return sample_id(self.method, self.task, self.length, None, self.sample)

    def request(self, ctx: TaskContext) -> GenerationRequest:
        prompt = self._prompt = self.suite.prompt(self.suite_task, self.data, ctx.tokenizer, self.length, ctx.chat)
        if prompt.chat:
            return GenerationRequest(prompt.max_new_tokens, messages=messages_for(prompt.text, prompt.system),
                                     stop_newline=prompt.stop_newline)
        return GenerationRequest(prompt.max_new_tokens, prompt=prompt.text, stop_newline=prompt.stop_newline)

    def follow_up(self, result: GenerationResult) -> None:
        return None

    def record(self, result: GenerationResult) -> dict[str, Any]:
        prompt, self._prompt = self._prompt, None
        return {
            "id": self.id, "method": self.method, "task": self.task, "length": self.length, "depth": None,
            "sample": self.sample, "suite": self.suite.name, "n_tokens_full": prompt.n_tokens_full,
            "truncated": prompt.truncated, "chat": prompt.chat, **self.suite.meta(self.suite_task, self.data),
            "n_tokens": result.prompt_tokens,
            "score": self.suite.score(self.suite_task, result.text, self.data) if result.ok else None,
            "prediction": result.text,
            "answer": self.suite.answers(self.suite_task, self.data),
            **result.record_fields(),
        }


def plan(config: EvalConfig, labels: list[str]) -> list[Job]:
    """Every sample of the run, grouped by method (one apply per method), short lengths first."""
    if config.suite:
        return plan_suite(config, labels)
    tasks = [(name, get_task(name)) for name in config.tasks]
    return [
        TaskJob(label, name, length, depth, sample, retrieval_memory(MethodSpec.parse(label)),
                windowed_memory(MethodSpec.parse(label)))
        for label in labels
        for length in sorted(int(n) for n in config.lengths)
        for name, task in tasks
        for depth in (config.depths if task.uses_depth else [None])
        for sample in range(config.samples)
    ]


def plan_suite(config: EvalConfig, labels: list[str]) -> list[Job]:
    """Every (method, length, suite task, record) of a suite run; records loaded and validated here."""
    suite = get_suite(config.suite or "")
    lengths = sorted(int(n) for n in config.lengths)
    split = suite.length_kind == "split"
    cache: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    jobs: list[Job] = []
    for label in labels:
        for length in lengths:
            for task in config.tasks:
                key = (task, length if split else None)
                if key not in cache:
                    if split and not _has_split(suite, config, task, length):
                        # BABILong: not every task is published (or downloaded) at every length.
                        cache[key] = []
                        continue
                    records = suite.load(config.data_dir or "", task, key[1])
                    cache[key] = records[: config.limit] if config.limit else records
                for index, record in enumerate(cache[key]):
                    jobs.append(SuiteJob(label, f"{suite.name}/{task}", length, index, suite, task, record))
    if not jobs:
        raise EvalError(f"no {suite.name} records for tasks {config.tasks} at lengths {lengths} in {config.data_dir}")
    return jobs


def _has_split(suite: Suite, config: EvalConfig, task: str, length: int) -> bool:
    try:
        suite.data_file(Path(config.data_dir or ""), task, length)
    except EvalError:
        return False
    return True
