"""Prompts fitted to an exact token count, with or without the model's chat template.

A prompt is assembled from token-id pieces: ``head + instruction + context + question + tail + answer_prefix``,
where head/tail are the chat template around the user turn (or just BOS without a chat template), and
``context`` is a slice of a haystack token stream with the needle inserted at a sentence boundary. The
haystack slice takes exactly the tokens the other pieces leave, so the prompt has exactly the requested
length. Pieces are encoded separately (no special tokens), as NIAH does, so no BOS lands mid-prompt.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from longkit.errors import EvalError
from longkit.eval.haystack import TokenStream

_SLOT = "\u0000LONGKIT_CONTENT\u0000"


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_frame(tokenizer: Any, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the user content: the chat template's, or BOS alone when ``chat`` is off."""
    if chat and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SLOT}], add_generation_prompt=True, tokenize=False
        )
        head, found, tail = text.partition(_SLOT)
        if not found:
            raise EvalError("the tokenizer's chat template drops the user content; run with chat=False")
        return encode(tokenizer, head), encode(tokenizer, tail)
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    # Keep whatever the tokenizer adds in front by default (BOS for Llama-style tokenizers).
    head = with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []
    return head, []


@dataclass
class PromptParts:
    """A prompt cut around its context, so that a memory method can replace the context (retrieval):
    ``front + context + question_ids + back`` is the prompt; ``question`` is the text to retrieve with."""

    #: Everything before the context (chat head, instruction).
    front: list[int]
    context: list[int]
    #: The question and whatever else sits between the context and the chat tail.
    question_ids: list[int]
    #: Chat tail and answer prefix.
    back: list[int]
    question: str

    def assemble(self, context: list[int], extra: list[int] | None = None) -> list[int]:
        """The prompt with ``context`` in place of the original one and ``extra`` ids right after the question."""
        return self.front + list(context) + self.question_ids + (extra or []) + self.back


@dataclass
class FittedPrompt:
    """A prompt of exactly ``len(input_ids)`` tokens, where its needle sits, and its parts where the task has them."""

    input_ids: list[int]
    needle_start: int | None
    depth: float | None
    #: (instruction, context, question) of the prompt; None for tasks without a question (perplexity).
    parts: PromptParts | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def fit_prompt(
    tokenizer: Any,
    length: int,
    stream: TokenStream,
    *,
    instruction: str,
    needle: str | None,
    depth: float | None,
    question: str,
    answer_prefix: str,
    chat: bool,
) -> FittedPrompt:
    """Assemble a prompt of exactly ``length`` tokens with ``needle`` at ``depth`` (0..1) of the context.

    The needle goes at the last sentence boundary at or before ``depth * context_tokens`` (NIAH's rule),
    so depth 0 puts it first; depth 1 puts it at the very end of the context, right before the question.
    """
    head, tail = chat_frame(tokenizer, chat)
    instruction_ids = encode(tokenizer, instruction)
    question_ids = encode(tokenizer, question)
    prefix_ids = encode(tokenizer, answer_prefix)
    needle_ids = encode(tokenizer, needle) if needle else []
    fixed = len(head) + len(instruction_ids) + len(question_ids) + len(tail) + len(prefix_ids) + len(needle_ids)
    budget = length - fixed
    if budget < 16:
        raise EvalError(
            f"parameter 'length' = {length} is too short: the prompt without haystack takes {fixed} tokens; "
            f"use length >= {fixed + 16}"
        )
    hay, bounds = stream.take(budget)
    needle_at = None
    if needle_ids:
        if depth is None or not 0.0 <= depth <= 1.0:
            raise EvalError(f"parameter 'depth' must be in [0, 1] (got {depth!r})")
        if depth >= 1.0:
            # NIAH: depth 100% appends the needle at the very end of the context.
            cut = budget
        else:
            target = int(round(depth * budget))
            i = bisect.bisect_right(bounds, target) - 1
            cut = bounds[i] if i >= 0 else 0
        hay = hay[:cut] + needle_ids + hay[cut:]
        needle_at = len(head) + len(instruction_ids) + cut
    parts = PromptParts(head + instruction_ids, hay, question_ids, tail + prefix_ids, question)
    ids = parts.assemble(hay)
    assert len(ids) == length, (len(ids), length)
    return FittedPrompt(ids, needle_at, depth, parts)
