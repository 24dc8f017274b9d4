"""Single-needle needle-in-a-haystack over real prose, in RULER's niah_single format."""

from __future__ import annotations

from longkit.eval.haystack import haystack_text, token_stream
from longkit.eval.metrics import postprocess_pred, string_match_all
from longkit.eval.prompt import fit_prompt
from longkit.eval.tasks.base import GenerationSample, Task, TaskContext, register_task

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE = " One of the special magic numbers for {key} is: {value}. "
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"

# Keys are adjective-noun pairs (as RULER's word keys); a fixed list keeps runs reproducible offline.
ADJECTIVES = (
    "ancient brave calm curious eager fierce gentle golden hidden humble icy jolly lively lucky "
    "mellow noble odd quiet rapid silent sturdy swift tender vivid wary witty young zealous"
).split()
NOUNS = (
    "anchor badger beacon canyon comet falcon garden harbor island lantern meadow mirror orchard "
    "otter pebble quarry raven river saddle spruce tunnel valley violin walrus willow"
).split()


@register_task
class Needle(Task):
    """Needle in a haystack: "One of the special magic numbers for {key} is: {value}." hidden in prose.

    The haystack is real prose (Python's documentation topics by default, or ``--haystack DIR``); the needle
    goes at the sentence boundary at or before ``depth`` of the context; the prompt is fitted to exactly
    ``length`` tokens, chat template included. Key: an adjective-noun pair; value: a 7-digit number. Score:
    RULER's string_match_all, 100 if the value occurs in the answer (case-insensitive), else 0.
    Based on Kamradt 2023 (NIAH, https://github.com/gkamradt/LLMTest_NeedleInAHaystack) and Hsieh et al.
    2024, RULER niah_single (https://arxiv.org/abs/2404.06654).
    """

    name = "needle"

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        rng = ctx.rng(self.name, length, depth, sample)
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        text = ctx.cache.get("haystack_text")
        if text is None:
            text = ctx.cache["haystack_text"] = haystack_text(ctx.haystack)
        prompt = fit_prompt(
            ctx.tokenizer,
            length,
            token_stream(ctx.tokenizer, text),
            instruction=INSTRUCTION,
            needle=NEEDLE.format(key=key, value=value),
            depth=0.5 if depth is None else depth,
            question=QUESTION.format(key=key),
            answer_prefix=ANSWER_PREFIX.format(key=key),
            chat=ctx.use_chat(self),
        )
        return GenerationSample(prompt, [value], max_new_tokens=12)

    def score(self, prediction: str, answers: list[str]) -> float:
        return string_match_all([postprocess_pred(prediction)], [answers])
