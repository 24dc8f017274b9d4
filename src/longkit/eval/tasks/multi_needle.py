"""Multi-needle needle-in-a-haystack: N needles for one key, spread from a start depth to the end of the context.

As in Kamradt's multi-needle test: the first needle goes at the run's ``depth``, the others at equal steps
``(1 - depth) / N`` after it, each at the sentence boundary at or before its position; the haystack is real
prose (``--haystack DIR`` or Python's documentation topics) and the prompt is fitted to exactly ``length``
tokens. Needles use RULER's line ("One of the special magic numbers for {key} is: {value}.") and the
question asks for all of them (RULER's niah_multivalue wording). Score: RULER's string_match_all, the
percentage of the N values found in the answer.
Based on Kamradt 2024, multi-needle NIAH (https://github.com/gkamradt/LLMTest_NeedleInAHaystack) and
Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654).
"""

from __future__ import annotations

import bisect

from longkit.errors import EvalError
from longkit.eval.haystack import haystack_text, token_stream
from longkit.eval.metrics import postprocess_pred, string_match_all
from longkit.eval.prompt import FittedPrompt, PromptParts, chat_frame, encode
from longkit.eval.ruler.niah import NiahConfig, niah_templates, random_needle
from longkit.eval.ruler.templates import NEEDLE
from longkit.eval.tasks.base import GenerationSample, Task, TaskContext, register_task


def needle_depths(start: float, n: int) -> list[float]:
    """Kamradt's spread: the first needle at ``start``, then steps of ``(1 - start) / n``."""
    if not 0.0 <= start <= 1.0:
        raise EvalError(f"parameter 'depth' must be in [0, 1] (got {start!r})")
    step = (1.0 - start) / n
    return [start + i * step for i in range(n)]


@register_task
class MultiNeedle(Task):
    """N = 4 needles with one key and four 7-digit values, spread from ``depth`` to the end; string_match_all."""

    name = "multi_needle"
    num_needles = 4

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        rng = ctx.rng(self.name, length, depth, sample)
        cfg = NiahConfig(type_needle_v="numbers", num_needle_v=self.num_needles)
        key = random_needle(rng, "words")
        values: list[str] = []
        while len(values) < self.num_needles:
            value = random_needle(rng, "numbers")
            if value not in values:
                values.append(value)
        template, prefix, type_v = niah_templates(cfg)
        before, after = template.format(type_needle_v=type_v, context="\u0000", query=key).split("\u0000")
        tok = ctx.tokenizer
        head, tail = chat_frame(tok, ctx.use_chat(self))
        needles = [encode(tok, " " + NEEDLE.format(type_needle_v="numbers", key=key, value=v) + " ") for v in values]
        after_ids, back = encode(tok, after), tail + encode(tok, prefix.format(type_needle_v=type_v, query=key))
        pieces = (head + encode(tok, before), after_ids + back)
        fixed = len(pieces[0]) + len(pieces[1]) + sum(map(len, needles))
        budget = length - fixed
        if budget < 16:
            raise EvalError(
                f"parameter 'length' = {length} is too short for {self.name}: the prompt without haystack takes "
                f"{fixed} tokens; use length >= {fixed + 16}"
            )
        text = ctx.cache.get("haystack_text")
        if text is None:
            text = ctx.cache["haystack_text"] = haystack_text(ctx.haystack)
        hay, bounds = token_stream(tok, text).take(budget)
        cuts = []
        for d in needle_depths(0.0 if depth is None else depth, self.num_needles):
            i = bisect.bisect_right(bounds, int(round(d * budget))) - 1
            cuts.append(bounds[i] if i >= 0 else 0)
        # Insert from the deepest needle back so earlier cut indices stay valid.
        for cut, needle in sorted(zip(cuts, needles, strict=True), key=lambda x: x[0], reverse=True):
            hay = hay[:cut] + needle + hay[cut:]
        ids = pieces[0] + hay + pieces[1]
        assert len(ids) == length, (len(ids), length)
        parts = PromptParts(pieces[0], hay, after_ids, back, after)
        return GenerationSample(FittedPrompt(ids, len(pieces[0]) + min(cuts), depth, parts), values, max_new_tokens=64)

    def score(self, prediction: str, answers: list[str]) -> float:
        return string_match_all([postprocess_pred(prediction)], [answers])
