"""RULER's 13 tasks: ``longkit eval --task niah_single_1 --task vt ...``.

Each task builds its sample with a :class:`~longkit.eval.ruler.RulerGenerator` (RULER's recipe, fitted to the run's length with
the answer reserve) and scores with RULER's metric on the post-processed prediction, so the per-length mean of
the records is RULER's task score. The depth grid does not apply (RULER draws its own insertion depths).

cwe reads RULER's ``english_words.json`` from ``$LONGKIT_RULER_ENGLISH_WORDS`` when set (lengths past ~200K
tokens need it). qa_1 / qa_2 read SQuAD / HotpotQA JSON from ``$LONGKIT_RULER_SQUAD`` / ``$LONGKIT_RULER_HOTPOTQA``; the offline
synthetic stand-ins are the separate tasks ``qa_1_synthetic`` / ``qa_2_synthetic``, so every record and report
names what ran.
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from longkit.errors import EvalError
from longkit.eval.metrics import METRICS, RULER_TASK_METRICS, postprocess_pred
from longkit.eval.prompt import FittedPrompt, PromptParts, encode
from longkit.eval.ruler import TASKS as RULER_TASKS
from longkit.eval.ruler import RulerGenerator
from longkit.eval.tasks.base import GenerationSample, Task, TaskContext, register_task

#: Where qa_1 / qa_2 find their data.
DATA_ENV = {"qa_1": "LONGKIT_RULER_SQUAD", "qa_2": "LONGKIT_RULER_HOTPOTQA"}
#: Where cwe finds RULER's english_words.json (optional: only lengths past the wonderwords vocabulary need it).
ENGLISH_WORDS_ENV = "LONGKIT_RULER_ENGLISH_WORDS"


class Ruler(Task):
    """Base of the RULER tasks; ``ruler_task`` names RULER's recipe (qa_1 for qa_1_synthetic), ``synthetic`` the
    offline qa data."""

    uses_depth = False
    chat_default = True
    ruler_task: ClassVar[str] = "?"
    synthetic: ClassVar[bool] = False

    def _data(self) -> dict[str, Any]:
        if self.ruler_task == "cwe":
            path = os.environ.get(ENGLISH_WORDS_ENV)
            return {"english_words": path} if path else {}
        if self.ruler_task not in DATA_ENV or self.synthetic:
            return {}
        env = DATA_ENV[self.ruler_task]
        path = os.environ.get(env)
        if not path:
            raise EvalError(
                f"task '{self.name}' reads its data from ${env} (a {'SQuAD' if self.ruler_task == 'qa_1' else 'HotpotQA'} "
                f"JSON file), which is not set; run '{self.name}_synthetic' for the offline synthetic stand-in"
            )
        return {"data": path}

    def __init__(self) -> None:
        self.data = self._data()

    def generator(self, ctx: TaskContext) -> RulerGenerator:
        chat = ctx.use_chat(self)
        key = ("ruler", self.name, chat, ctx.haystack, ctx.seed, id(ctx.tokenizer))
        if key not in ctx.cache:
            ctx.cache[key] = RulerGenerator(
                self.ruler_task, ctx.tokenizer, seed=ctx.seed, chat=chat, haystack=ctx.haystack, **self.data
            )
        return ctx.cache[key]

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        gen = self.generator(ctx)
        s = gen.sample(length, sample)
        ids = gen.input_ids(s)
        return GenerationSample(
            FittedPrompt(ids, None, None, self.parts(gen, s)), list(s["outputs"]), max_new_tokens=s["tokens_to_generate"]
        )

    @staticmethod
    def parts(gen: RulerGenerator, s: dict[str, Any]) -> PromptParts | None:
        """The sample cut around its haystack (the last occurrence in the user text: vt's worked example before it
        has a haystack of its own); the text after the haystack (the question) is what retrieval queries with.
        The pieces are encoded separately, so their ids may differ from the whole prompt's at the two cuts."""
        user, context = s["input"], s.get("context", "")
        at = user.rfind(context) if context else -1
        if at < 0:
            return None
        tok, tail = gen.frame.tokenizer, gen.frame.tail
        examples = [tuple(e) for e in s.get("examples", [])]
        # frame.ids(text, "") ends with the chat tail: what is before it is shots + head + the text before the context
        front_and_tail = gen.frame.ids(user[:at], "", examples)
        question = user[at + len(context):]
        return PromptParts(front_and_tail[: len(front_and_tail) - len(tail)], encode(tok, context),
                           encode(tok, question), tail + encode(tok, s["answer_prefix"]), question.strip())

    def score(self, prediction: str, answers: list[str]) -> float:
        metric = METRICS[RULER_TASK_METRICS[self.ruler_task]]
        return metric([postprocess_pred(prediction)], [answers])


def _make(name: str, ruler_task: str, synthetic: bool) -> type[Task]:
    doc = f"RULER task {ruler_task}" + (
        " on the offline synthetic QA data (not a RULER qa score)." if synthetic else "."
    )
    cls = type(
        f"Ruler_{name}",
        (Ruler,),
        {"name": name, "ruler_task": ruler_task, "synthetic": synthetic, "__doc__": doc, "__module__": __name__},
    )
    return register_task(cls)


for _task in RULER_TASKS:
    _make(_task, _task, synthetic=False)
for _task in DATA_ENV:
    _make(f"{_task}_synthetic", _task, synthetic=True)
