"""Prompt-level memory in the eval runner (retrieval: rag, self_route; prompt compression: longllmlingua): a task's
prompt rebuilt from the context a memory method keeps, and the cost fields of its records.

A task whose prompts expose (instruction, context, question) (:class:`~longkit.eval.prompt.PromptParts`) gets the
prompt ``front + retrieved chunks + question (+ Self-Route's instruction) + chat tail + answer prefix``; the
question is the retrieval query. Self-Route asks a second time with the task's full prompt when the first answer
contains "unanswerable" (:func:`longkit.memory.rag.is_refusal`). Record fields of such a sample:

- ``prompt_tokens``: prompt tokens the model processed, summed over its requests; ``tokens_processed`` adds the
  generated tokens (the baseline's counterpart is ``n_tokens + new_tokens``);
- ``retrieval_s``: seconds of chunking, scoring and selection; ``context_tokens`` / ``retrieved_tokens``: the
  context's tokens before and after retrieval; ``chunks`` / ``retrieved_chunks``: the number of chunks and the
  indices kept (document order);
- prompt compression (:mod:`longkit.memory.longllmlingua`): ``compress_s``, ``compressed_tokens``, ``documents`` /
  ``kept_documents``, ``compressor_tokens`` (tokens the compressor model processed) and ``memory_peak_mem_bytes``
  (peak memory of the compression above its start: CUDA allocator, or CPU resident set);
- ``route`` (Self-Route): ``rag`` when the retrieval answer stands, ``long`` when the full context answered, and
  ``rag_prediction``, the retrieval answer;
- ``prefill_s`` / ``decode_s`` summed over the requests, ``peak_mem_bytes`` / ``kv_bytes`` their maximum.
"""

from __future__ import annotations

from typing import Any

import torch

from longkit.errors import EvalError
from longkit.eval.backends.base import GenerationRequest
from longkit.eval.prompt import encode
from longkit.memory.base import PromptMemory
from longkit.memory.rag import REFUSAL_INSTRUCTION, is_refusal
from longkit.runtime.generate import PeakMemory
from longkit.seam import MethodSpec

__all__ = ["check_memory_run", "is_refusal", "memory_fields", "refuse_without_question", "retrieval_memory",
           "retrieval_request"]


def retrieval_memory(spec: MethodSpec) -> PromptMemory | None:
    """The combination's memory method when it works on the prompt (retrieval, compression), else None."""
    return spec.memory if isinstance(spec.memory, PromptMemory) else None


def check_memory_run(specs: list[MethodSpec], tasks: list[Any], suite: str | None) -> None:
    """Refuse a run where a retrieval memory method meets a task without a question (perplexity) or a suite (its
    prompts are built as text, not as instruction / context / question)."""
    for memory in filter(None, map(retrieval_memory, specs)):
        refuse_without_question(memory, tasks, suite, "to retrieve with")


def refuse_without_question(memory: Any, tasks: list[Any], suite: str | None, purpose: str) -> None:
    """An EvalError when ``memory`` (a method that builds its prompt from the task's (instruction, context,
    question)) meets a suite or a task without a question; ``purpose`` says what the question is for."""
    if suite:
        raise EvalError(f"memory method '{memory.name}' needs tasks that expose (instruction, context, question); "
                        f"the suite '{suite}' does not: run it without --memory")
    for task in tasks:
        if not task.has_question:
            raise EvalError(f"task '{task.name}' has no question {purpose}, so memory method "
                            f"'{memory.name}' cannot run on it: run '{task.name}' without --memory")


def _parts(task: str, memory: PromptMemory, built: Any) -> Any:
    parts = built.prompt.parts
    if parts is None:
        raise EvalError(f"task '{task}' built a prompt without (instruction, context, question), so memory method "
                        f"'{memory.name}' has nothing to retrieve from")
    return parts


def check_context(memory: PromptMemory, task: str, built: Any) -> None:
    """What :func:`retrieval_request` would refuse about this sample, without retrieving (the runner's preflight)."""
    memory.check_context(len(_parts(task, memory, built).context))


def retrieval_request(memory: PromptMemory, tokenizer: Any, task: str, built: Any) -> tuple[GenerationRequest, Any]:
    """The generation request of a built sample under prompt memory, and what the memory method kept."""
    parts = _parts(task, memory, built)
    device = memory.work_device()
    if device is None:
        got = memory.retrieve(tokenizer, parts.context, parts.question)
    else:
        with PeakMemory(torch.device(device)) as peak:
            got = memory.retrieve(tokenizer, parts.context, parts.question)
        got.peak_mem_bytes = peak.peak_bytes
    extra = encode(tokenizer, REFUSAL_INSTRUCTION) if memory.routes else []
    return GenerationRequest(built.max_new_tokens, input_ids=parts.assemble(got.ids, extra)), got


def _total(values: list[Any], how: Any) -> Any:
    present = [v for v in values if v is not None]
    return how(present) if present else None


def memory_fields(memory: PromptMemory, built: Any, got: Any, results: list[Any]) -> dict[str, Any]:
    """The cost fields of one sample answered through prompt memory (``results``: its requests' results, in
    order)."""
    prompt = sum(r.prompt_tokens or 0 for r in results)
    generated = sum(r.completion_tokens or 0 for r in results)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "tokens_processed": prompt + generated,
        "context_tokens": len(built.prompt.parts.context),
        **got.fields(),
        "prefill_s": _total([r.stats.get("prefill_s") for r in results], lambda v: round(sum(v), 4)),
        "decode_s": _total([r.stats.get("decode_s") for r in results], lambda v: round(sum(v), 4)),
        "peak_mem_bytes": _total([r.stats.get("peak_mem_bytes") for r in results], max),
        "kv_bytes": _total([r.stats.get("kv_bytes") for r in results], max),
    }
    if memory.routes:
        out["route"] = "long" if len(results) > 1 else "rag"
        out["rag_prediction"] = results[0].text
    return out
