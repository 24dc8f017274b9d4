"""Lost in the middle: multi-document QA with the gold document at a swept position among N documents.

Liu et al.'s prompt ("Write a high-quality answer for the given question using only the provided search
results (some of which might be irrelevant).", then ``Document [i](Title: ...) text`` lines, the question and
"Answer:"). The number of documents N is as many as fit ``length`` tokens; the run's ``depth`` places the gold
document at position ``round(depth * (N - 1))`` (0: first, 1: last), so the length x depth grid is the
paper's number-of-documents x gold-position sweep. Documents are the offline synthetic QA passages of
:mod:`longkit.eval.ruler.qa` (invented organisations; Liu et al. use NaturalQuestions), distractors being
other organisations' passages. Score: 100 if the gold answer occurs in the answer (case-insensitive, RULER's
string_match_part; Liu et al.'s best-subspan EM also normalises punctuation and articles).
Based on Liu et al. 2023, Lost in the Middle (https://arxiv.org/abs/2307.03172).
"""

from __future__ import annotations

from longkit.errors import EvalError
from longkit.eval.metrics import postprocess_pred, string_match_part
from longkit.eval.prompt import FittedPrompt, PromptParts, chat_frame, encode
from longkit.eval.ruler.qa import synthetic_qa
from longkit.eval.tasks.base import GenerationSample, Task, TaskContext, register_task

INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant).\n\n"
)
DOCUMENT = "Document [{i}](Title: {title}) {text}\n"
QUESTION = "\nQuestion: {question}"
ANSWER_PREFIX = "Answer:"


@register_task
class LostInMiddle(Task):
    """Gold document position (depth) x number of documents (from length); string match of the answer."""

    name = "lost_in_middle"

    def build(self, ctx: TaskContext, length: int, depth: float | None, sample: int) -> GenerationSample:
        depth = 0.5 if depth is None else depth
        if not 0.0 <= depth <= 1.0:
            raise EvalError(f"parameter 'depth' must be in [0, 1] (got {depth!r})")
        items, docs = synthetic_qa(ctx.seed, hops=1)
        rng = ctx.rng(self.name, length, None, sample)
        # The gold item depends on the sample only, so every depth asks the same question about the same passage.
        gold = rng.randrange(len(items))
        others = [i for i in rng.sample(range(len(docs)), min(len(docs), 4096)) if i != items[gold].context[0]]
        tok = ctx.tokenizer
        head, tail = chat_frame(tok, ctx.use_chat(self))
        front = head + encode(tok, INSTRUCTION)
        # Liu et al. end the prompt with "Answer:"; with a chat template it follows the assistant header.
        question = QUESTION.format(question=items[gold].query)
        question_ids, after = encode(tok, question), tail + encode(tok, ANSWER_PREFIX)
        back = question_ids + after
        budget = length - len(front) - len(back)

        def doc_ids(n: int) -> tuple[list[int], int]:
            order = others[: n - 1]
            pos = round(depth * (n - 1))
            order.insert(pos, items[gold].context[0])
            ids: list[int] = []
            start = 0
            for i, d in enumerate(order):
                title, text = docs[d].split("\n", 1)
                if i == pos:
                    start = len(ids)
                ids += encode(tok, DOCUMENT.format(i=i + 1, title=title, text=text))
            return ids, start

        body, start = doc_ids(1)
        if len(body) > budget:
            raise EvalError(
                f"parameter 'length' = {length} is too short for {self.name}: one document and the question take "
                f"{len(body) + len(front) + len(back)} tokens"
            )
        # Start from the estimate budget / (tokens of one document), then step to the largest N that fits.
        n = max(1, min(len(others) + 1, budget // max(1, len(body))))
        body, start = doc_ids(n)
        while len(body) > budget and n > 1:
            n -= 1
            body, start = doc_ids(n)
        while n < len(others) + 1:
            bigger, bigger_start = doc_ids(n + 1)
            if len(bigger) > budget:
                break
            n, body, start = n + 1, bigger, bigger_start
        ids = front + body + back
        parts = PromptParts(front, body, question_ids, after, question)
        return GenerationSample(FittedPrompt(ids, len(front) + start, depth, parts), list(items[gold].outputs), 32)

    def score(self, prediction: str, answers: list[str]) -> float:
        return string_match_part([postprocess_pred(prediction)], [answers])
