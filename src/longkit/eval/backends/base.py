"""What a backend is: a generation request (text, chat messages or token ids) in, generated text + token usage +
error out; or, on a local model, a perplexity window in, its summed NLL out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
    #: The sample asking (its record id), named in retry warnings.
    label: str | None = None
    #: The prompt cut around its context (:class:`longkit.memory.windows.WindowedPrompt`) for a parallel-window
    #: memory method (PCW, NBCE): the local backend hands it to the applied method instead of one forward.
    windows: Any = None

    def send(self, backend: Backend) -> GenerationResult:
        return backend.generate(self)


@dataclass
class NLLRequest:
    """A teacher-forced window to score (perplexity): a backend with the model's log-probabilities only."""

    input_ids: list[int]
    #: Index in ``input_ids`` of the first scored target token.
    first_target: int
    #: The task asking, named in the error of a backend that has no log-probabilities.
    task: str

    def send(self, backend: Backend) -> dict[str, Any]:
        return backend.nll(self)


@dataclass
class GenerationResult:
    """Generated text, token counts, and an error message when the request failed (text is then empty).

    A failed request is never an empty answer: its record keeps ``error`` and no score, the report counts it,
    and a resumed run sends it again.
    """

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

    def record_fields(self) -> dict[str, Any]:
        """The generation fields of a run record; a failed request keeps ``error`` (its record is never scored)."""
        fields: dict[str, Any] = {"prefill_s": None, "decode_s": None, "new_tokens": self.completion_tokens,
                                  "peak_mem_bytes": None, "kv_bytes": None}
        fields.update(self.stats)
        if not self.ok:
            fields.update(error=self.error, attempts=self.attempts)
        elif self.attempts > 1:
            fields["attempts"] = self.attempts
        return fields


@runtime_checkable
class Backend(Protocol):
    """Anything that turns :class:`GenerationRequest` into :class:`GenerationResult` (and :class:`NLLRequest` into
    the record fields of a perplexity window, or a clear error where it has no log-probabilities).

    ``generate_many`` takes requests of either kind, built lazily as it consumes them, and yields ``(index, result)``
    pairs in completion order, so a backend may run requests concurrently; a failed generation is returned with
    ``error`` set, never raised.
    """

    name: str

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def nll(self, request: NLLRequest) -> dict[str, Any]: ...

    def generate_many(self, requests: Iterable[GenerationRequest | NLLRequest]) -> Iterator[tuple[int, Any]]: ...


def messages_for(text: str, system: str | None = None) -> list[dict[str, str]]:
    """A user turn (after an optional system turn)."""
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": text}]
