"""Parallel-window memory: a long context cut into windows that each fit the model's trained length, the windows
read independently and their evidence combined for the question (PCW, :mod:`longkit.memory.pcw`; NBCE,
:mod:`longkit.memory.nbce`).

A prompt reaches these methods as a :class:`WindowedPrompt`, ``front + context + task``: ``front`` is what comes
before the context (BOS, chat head, instruction), ``task`` what comes after it (question, chat tail, answer
prefix). The eval runner builds it from a task's prompt parts and the local backend runs the method's
:meth:`ParallelWindows.start` / :meth:`ParallelWindows.step` loop (:func:`longkit.runtime.windows.parallel_generate`).

Window size: ``window`` context tokens per window, or ``n_windows`` windows of equal size; by default as many
context tokens as fit ``front + window + task + max_new_tokens`` into the trained length, the positions each window
(and the question after it) reaches. Windows are consecutive token spans of the context, balanced so that their
sizes differ by at most one token (the longest window sets the question's positions in PCW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from longkit.errors import MethodError
from longkit.memory.base import MemoryMethod
from longkit.models.introspect import trained_length
from longkit.registry import param


@dataclass
class WindowedPrompt:
    """A prompt cut around its context: ``front + context + task`` is the ordinary prompt."""

    front: list[int]
    context: list[int]
    task: list[int]

    @property
    def ids(self) -> list[int]:
        return self.front + self.context + self.task


@dataclass
class WindowState:
    """What a parallel-window generation holds between steps: the next-token ``scores`` (V,) it picks greedily
    from, and its cost so far (token positions run through the model; windows and their sizes)."""

    scores: Any
    caches: list[Any]
    windows: list[tuple[int, int]]
    #: Token positions run through the model so far (every window, every fed-back token, in every cache).
    processed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def balanced_spans(n_tokens: int, n_windows: int) -> list[tuple[int, int]]:
    """``n_windows`` consecutive ``[start, end)`` spans covering ``0..n_tokens`` exactly, sizes differing by at most
    one (the longer ones first)."""
    size, extra = divmod(n_tokens, n_windows)
    spans, start = [], 0
    for i in range(n_windows):
        end = start + size + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans


@dataclass
class ParallelWindows(MemoryMethod):
    """Base of the parallel-window methods: the context split into windows that each fit the trained length."""

    window: int | None = param(None, ge=1, help="context tokens per window (None: as many as fit the trained length)")
    n_windows: int | None = param(None, ge=1, help="split the context into this many equal windows (instead of window)")

    #: The model's trained length, read on apply (windows must fit it).
    _trained: int | None = field(default=None, init=False, repr=False, compare=False)
    shown: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and self.n_windows is not None:
            self.fail("n_windows", f"= {self.n_windows} and 'window' = {self.window} both set the window size; give "
                      "one of them")

    def check_model(self, model: Any) -> None:
        from transformers.cache_utils import get_layer_types_and_kwargs

        text = model.config.get_text_config(decoder=True)
        kinds = sorted(set(get_layer_types_and_kwargs(text)[0]) - {"full_attention"})
        if kinds:
            # A sliding-window layer's cache forgets the earliest windows (and PCW's shared positions would put
            # several windows inside one band): the windows' evidence would silently not reach the question.
            raise MethodError(f"memory method '{self.name}' supports full-attention layers only; this model has "
                              f"{', '.join(kinds)} layers")

    def apply(self, model: Any) -> Any:
        self.check_model(model)
        self._trained = trained_length(model)
        # The windows are laid out per prompt by the generation loop (start/step); the model runs unchanged.
        return lambda: None

    # ---- the windows of one prompt ----

    def spans(self, prompt: WindowedPrompt, max_new_tokens: int, trained: int | None = None) -> list[tuple[int, int]]:
        """The windows of ``prompt``'s context as ``[start, end)`` token spans, each fitting
        ``front + window + task + max_new_tokens <= trained`` (default: the model's trained length, read on apply)."""
        trained = trained or self._trained
        if trained is None:
            raise MethodError(f"memory method '{self.name}' reads the model's trained length on apply; apply it first")
        if not prompt.task:
            raise MethodError(f"memory method '{self.name}' needs a question after the context (the tokens that read "
                              "the windows); the prompt has none")
        n = len(prompt.context)
        if n == 0:
            raise MethodError(f"memory method '{self.name}' got an empty context: zero windows to read")
        fixed = len(prompt.front) + len(prompt.task) + max_new_tokens
        room = trained - fixed
        what = (f"the prompt without context ({len(prompt.front) + len(prompt.task)} tokens) plus {max_new_tokens} new "
                f"tokens")
        if room < 1:
            raise MethodError(f"memory method '{self.name}': {what} already fill the trained length {trained}; no "
                              "context fits a window")
        if self.n_windows is not None:
            if self.n_windows > n:
                self.fail("n_windows", f"= {self.n_windows} is more than the context's {n} tokens: a window would be "
                          f"empty; use n_windows <= {n}")
            size = math.ceil(n / self.n_windows)
            if size > room:
                self.fail("n_windows", f"= {self.n_windows} makes windows of {size} tokens; with {what} a window "
                          f"exceeds the trained length {trained}; use n_windows >= {math.ceil(n / room)}")
            return balanced_spans(n, self.n_windows)
        if self.window is not None and self.window > room:
            self.fail("window", f"= {self.window} is larger than the trained length {trained} allows with {what}; "
                      f"use window <= {room}")
        return balanced_spans(n, math.ceil(n / (self.window or room)))

    # ---- the generation loop's two verbs (implemented by PCW and NBCE) ----

    def start(self, model: Any, prompt: WindowedPrompt, max_new_tokens: int, new_cache: Any) -> WindowState:
        """Read the windows and the task tokens; ``scores`` of the state rank the first new token. ``new_cache``
        makes a fresh KV cache (the applied combination's)."""
        raise NotImplementedError

    def step(self, model: Any, state: WindowState, token: int) -> None:
        """Feed the chosen ``token`` back; ``state.scores`` then rank the next one."""
        raise NotImplementedError
