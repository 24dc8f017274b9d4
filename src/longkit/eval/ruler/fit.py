"""Fitting a RULER sample to a token budget: RULER's binary search over the haystack size.

RULER grows the haystack (noise sentences, essay words, variables' noise lines, list words, documents) until
``prompt tokens + tokens_to_generate`` would pass ``max_seq_length``, by binary search over the haystack size
(``scripts/data/synthetic/niah.py``, ``generate_samples``). Here every trial of one sample redraws its content
from the same seed, so the keys, values and queries stay fixed and only the haystack grows; the search ends on
the largest size that fits. Prompt tokens are counted as the model sees them: the chat template's head and
tail around the user turn (or BOS alone), the user text, and the answer prefix after the template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from longkit.errors import EvalError
from longkit.eval.prompt import chat_frame, encode, has_chat_template


@dataclass
class Draft:
    """One candidate prompt: user text, answer prefix, gold answers, and facts for tests and reports."""

    text: str
    answer_prefix: str
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    #: Worked examples shown before the task, as (user text, assistant text) turns (cwe's one shot).
    examples: list[tuple[str, str]] = field(default_factory=list)
    #: The haystack part of ``text`` (it occurs in ``text`` once, after the instruction, before the question):
    #: what a retrieval memory method cuts into chunks; empty where a draft has none.
    context: str = ""


class Frame:
    """Counts prompt tokens for one tokenizer, with or without its chat template."""

    def __init__(self, tokenizer: Any, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self.head, self.tail = chat_frame(tokenizer, chat)
        # Worked examples get turns of their own only when a chat template frames the turns.
        self.turns = chat and has_chat_template(tokenizer)

    def user_text(self, draft: Draft) -> str:
        """The last user turn: without a chat template the worked examples are part of it (RULER's ``base``
        template), each as ``user + assistant + "\\n"``; with one they are turns of their own (see :meth:`ids`)."""
        if self.turns:
            return draft.text
        return "".join(user + answer + "\n" for user, answer in draft.examples) + draft.text

    def ids(self, text: str, answer_prefix: str, examples: list | tuple = ()) -> list[int]:
        """The prompt's token ids: head + user text + tail + answer prefix (pieces encoded separately).

        ``examples`` (chat only; :meth:`user_text` folds them in otherwise) come first, each wrapped in the whole
        chat frame and followed by its answer and a newline: RULER applies its model template to the example's
        template too (``common_words_extraction.py`` formats the few-shot with the full template), so the
        example is a user turn, its answer follows the assistant header, and the task's own frame comes next.
        """
        shots: list[int] = []
        for user, answer in examples:
            shots += self.head + encode(self.tokenizer, user) + self.tail + encode(self.tokenizer, answer + "\n")
        return shots + self.head + encode(self.tokenizer, text) + self.tail + encode(self.tokenizer, answer_prefix)

    def count(self, draft: Draft) -> int:
        examples = draft.examples if self.turns else ()
        return len(self.ids(self.user_text(draft), draft.answer_prefix, examples))


def fit_size(
    build: Callable[[int], Draft],
    frame: Frame,
    length: int,
    reserve: int,
    *,
    min_size: int,
    max_size: int | None = None,
    task: str = "?",
) -> tuple[Draft, int, int]:
    """The draft of the largest haystack size whose prompt plus ``reserve`` tokens fits ``length``.

    Returns ``(draft, prompt_tokens, size)``. Raises EvalError when even ``min_size`` does not fit.
    """
    budget = length - reserve
    smallest = build(min_size)
    n_small = frame.count(smallest)
    if n_small > budget:
        raise EvalError(
            f"parameter 'length' = {length} is too short for RULER task '{task}': its template with the smallest "
            f"haystack takes {n_small} tokens plus {reserve} reserved answer tokens; use length >= {n_small + reserve}"
        )
    # Bracket the budget from a linear estimate (tokens grow about linearly with the haystack size; RULER
    # also estimates tokens per haystack unit first), then narrow by interpolation, which needs a handful of
    # tokenizer calls where plain bisection needs a dozen.
    lo, lo_draft, lo_n = min_size, smallest, n_small
    size = max(min_size * 2, min_size + 8)
    hi = hi_n = None
    while hi is None:
        if max_size is not None:
            size = min(size, max_size)
        if size <= lo:
            return lo_draft, lo_n, lo
        draft = build(size)
        n = frame.count(draft)
        if n > budget:
            hi, hi_n = size, n
            break
        per_unit = (n - lo_n) / (size - lo) if n > lo_n else 1.0
        lo, lo_draft, lo_n = size, draft, n
        # Aim 5% past the estimate so the next probe usually brackets the budget.
        size = max(lo + 1, lo + int((budget - lo_n) / per_unit * 1.05) + 1, 2 * lo if per_unit <= 0 else 0)
    kept_same_end = 0
    last_end = None
    while hi - lo > 1:
        if kept_same_end >= 2 or hi_n <= lo_n:
            guess = (lo + hi) // 2
            kept_same_end = 0
        else:
            guess = lo + int((budget - lo_n) * (hi - lo) / (hi_n - lo_n))
            # Probe one past the interpolated point so a linear count lands the bracket on both sides.
            guess = min(max(guess + (1 if last_end == "lo" else 0), lo + 1), hi - 1)
        draft = build(guess)
        n = frame.count(draft)
        end = "lo" if n <= budget else "hi"
        if end == "lo":
            lo, lo_draft, lo_n = guess, draft, n
        else:
            hi, hi_n = guess, n
        kept_same_end = kept_same_end + 1 if end == last_end else 0
        last_end = end
    return lo_draft, lo_n, lo
