"""What a generation backend is: text or chat messages in, generated text + token usage + error out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class GenerationRequest:
    """One prompt: plain ``prompt`` text (a completion), chat ``messages``, or ready ``input_ids`` (local only)."""

    max_new_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    #: Stop at the first newline of the generated text.
    stop_newline: bool = False


@dataclass
class GenerationResult:
    """Generated text, token counts, and an error message when the request failed (text is then empty)."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    attempts: int = 1
    #: Backend-specific measurements copied into the run record (timings, memory, KV bytes...).
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    """Anything that turns :class:`GenerationRequest` into :class:`GenerationResult`.

    ``generate_many`` yields ``(index, result)`` pairs in completion order, so a backend may run requests
    concurrently; a failed request is returned with ``error`` set, never raised.
    """

    name: str

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_many(self, requests: list[GenerationRequest]) -> Any: ...


def messages_for(text: str, system: str | None = None) -> list[dict[str, str]]:
    """A user turn (after an optional system turn)."""
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": text}]
