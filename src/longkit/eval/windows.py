"""Parallel-window memory (PCW, NBCE) in the eval runner: a task's prompt cut around its context and handed to the
local backend, which runs the method's window loop (:func:`longkit.runtime.windows.parallel_generate`).

A task whose prompts expose (instruction, context, question) (:class:`~longkit.eval.prompt.PromptParts`) gets
``front + context + task`` with ``task = question + chat tail + answer prefix``. Record fields of such a sample
(besides the usual ``prefill_s``, ``decode_s``, ``peak_mem_bytes``, ``kv_bytes``: the bytes of every cache after the
prefill, summed over NBCE's per-window caches):

- ``tokens_processed``: token positions run through the model, prompt and fed-back tokens (NBCE: summed over its
  window prompts and the context-free prompt; PCW: the prompt once, then each fed-back token);
- ``context_tokens``: the context's tokens; ``windows``: how many windows it was cut into; ``window_tokens``: the
  longest window's context tokens.
"""

from __future__ import annotations

from typing import Any

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest
from longkit.eval.retrieval import refuse_without_question
from longkit.memory.windows import ParallelWindows, WindowedPrompt
from longkit.seam import MethodSpec

__all__ = ["check_windowed_run", "check_windows", "windowed_memory", "windowed_request"]


def windowed_memory(spec: MethodSpec) -> ParallelWindows | None:
    """The combination's memory method when it reads the context in parallel windows, else None."""
    return spec.memory if isinstance(spec.memory, ParallelWindows) else None


def check_windowed_run(specs: list[MethodSpec], tasks: list[Any], suite: str | None) -> None:
    """Refuse a run where a parallel-window method meets a task without a question (perplexity) or a suite (its
    prompts are built as text, not as instruction / context / question)."""
    for memory in filter(None, map(windowed_memory, specs)):
        refuse_without_question(memory, tasks, suite, "to read the windows with")


def windowed_prompt(memory: ParallelWindows, task: str, built: Any) -> WindowedPrompt:
    parts = built.prompt.parts
    if parts is None:
        raise EvalError(f"task '{task}' built a prompt without (instruction, context, question), so memory method "
                        f"'{memory.name}' has no context to cut into windows")
    return WindowedPrompt(list(parts.front), list(parts.context), list(parts.question_ids) + list(parts.back))


def check_windows(memory: ParallelWindows, task: str, built: Any, trained: int) -> None:
    """What the method would refuse about this sample's windows (the runner's preflight), without running it."""
    memory.spans(windowed_prompt(memory, task, built), built.max_new_tokens, trained)


def windowed_request(memory: ParallelWindows, task: str, built: Any) -> GenerationRequest:
    """The generation request of a built sample under a parallel-window method."""
    prompt = windowed_prompt(memory, task, built)
    return GenerationRequest(built.max_new_tokens, input_ids=prompt.ids, windows=prompt)
