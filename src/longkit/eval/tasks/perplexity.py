"""Perplexity versus context length over a text, by sliding windows."""

from __future__ import annotations

from pathlib import Path

from longkit.errors import EvalError
from longkit.eval.haystack import haystack_text
from longkit.eval.prompt import chat_frame, encode
from longkit.eval.tasks.base import Task, TaskContext, register_task


@register_task
class Perplexity(Task):
    """Perplexity at context length L by sliding windows (the convention of Position Interpolation / YaRN).

    Sample s is the window of L tokens starting at token s*L/2 of the text (BOS first when the tokenizer
    adds one). Only the last L/2 tokens of each window are scored, so every scored token sees between L/2
    and L-1 tokens of context. Reported per length: PPL = exp(sum NLL / number of scored tokens), pooled
    over all windows (token-weighted). Text: Python's documentation topics by default, or ``--ppl-text FILE``.
    Based on Chen et al. 2023 (https://arxiv.org/abs/2306.15595) and Peng et al. 2023 (YaRN).
    """

    name = "perplexity"
    scored = False
    uses_depth = False

    def window(self, ctx: TaskContext, length: int, sample: int) -> tuple[list[int], int]:
        """(input ids of the window, index of the first scored target token)."""
        ids = ctx.cache.get("ppl_ids")
        if ids is None:
            if ctx.ppl_text:
                path = Path(ctx.ppl_text)
                if not path.is_file():
                    raise EvalError(f"parameter 'ppl_text' must be a text file; {path} does not exist")
                text = path.read_text(errors="replace")
            else:
                text = haystack_text(None)
            ids = ctx.cache["ppl_ids"] = encode(ctx.tokenizer, text)
        head, _ = chat_frame(ctx.tokenizer, chat=False)
        body = length - len(head)
        stride = body // 2
        start = sample * stride
        if start + body > len(ids):
            raise EvalError(
                f"the perplexity text has {len(ids)} tokens; window {sample} at length {length} needs "
                f"{start + body}; use fewer samples, a shorter length or a longer --ppl-text"
            )
        return head + ids[start : start + body], len(head) + body - stride
