"""Passkey retrieval: a 5-digit key hidden in repeated filler sentences."""

from __future__ import annotations

import re

from longkit.eval.haystack import token_stream
from longkit.eval.prompt import fit_prompt
from longkit.eval.tasks.base import GenerationSample, Task, TaskContext, register_task

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"
_FIRST_INT = re.compile(r"\d+")


@register_task
class Passkey(Task):
    """Passkey retrieval as in Landmark Attention / YaRN / LongLoRA, fitted to an exact token length.

    Prompt: the classic task description, filler sentences, the key line at a sentence boundary at ``depth``,
    more filler, "What is the pass key?" and the answer prefix "The pass key is". The key is a uniform
    5-digit number. No chat template unless the run asks for one (``--chat``). Score: 100 if the first
    integer of the answer equals the key, else 0.
    Based on Mohtashami & Jaggi 2023, Landmark Attention (https://arxiv.org/abs/2305.16300).
    """

    name = "passkey"
    # The classic protocol is a plain completion; in a chat turn instruct models often explain what a
    # pass key is instead of completing the answer prefix (SmolLM2 at 2K: 3 of 5 depths), a format failure.
    chat_default = False

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        key = str(ctx.rng(self.name, length, depth, sample).randint(10000, 99999))
        # Enough filler for one pass over any window; the stream repeats beyond it.
        stream = token_stream(ctx.tokenizer, FILLER * 256)
        prompt = fit_prompt(
            ctx.tokenizer,
            length,
            stream,
            instruction=INSTRUCTION,
            needle=KEY_LINE.format(key=key),
            depth=0.5 if depth is None else depth,
            question=QUESTION,
            answer_prefix=ANSWER_PREFIX,
            chat=ctx.use_chat(self),
        )
        return GenerationSample(prompt, [key], max_new_tokens=8)

    def score(self, prediction: str, answers: list[str]) -> float:
        match = _FIRST_INT.search(prediction)
        return 100.0 if match is not None and match.group(0) == answers[0] else 0.0
