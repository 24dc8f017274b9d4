"""Memory methods (retrieval, block memory, offload) register under kind ``memory``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from longkit.methods import Method


@dataclass
class MemoryMethod(Method):
    """Base of memory methods: override :meth:`apply` (hooks) and/or :meth:`make_cache`."""


@dataclass
class PromptMemory(MemoryMethod):
    """Base of the prompt-level memory methods (retrieval, prompt compression): the model is left as it is; the eval
    runner builds the prompt from :meth:`retrieve`, which turns a task's context and question into a shorter context
    (token ids of the evaluated model) and the cost fields of the sample's record."""

    #: Whether an unanswerable first answer is asked again with the full context (Self-Route).
    routes: ClassVar[bool] = False

    def apply(self, model: Any) -> Any:
        # The method rewrites the prompt (the eval runner asks retrieve()); the model runs unchanged.
        return lambda: None

    def check_context(self, n_tokens: int) -> None:
        """Refuse a context of ``n_tokens`` this method cannot shrink (the runner's preflight); default: any is fine."""

    def work_device(self) -> str | None:
        """The device :meth:`retrieve` computes on, when its peak memory is worth recording (a compressor model);
        None: not measured."""
        return None

    def retrieve(self, tokenizer: Any, context_ids: Sequence[int], query: str) -> Any:
        """The kept context for ``query``: an object with ``ids`` (token ids of ``tokenizer``) and ``fields()``
        (the record's cost fields)."""
        raise NotImplementedError(f"{type(self).__name__} must implement retrieve()")
