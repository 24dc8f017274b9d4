"""RULER's common words extraction (cwe): name the 10 words repeated most in a long numbered word list.

``num_cw`` common words appear ``freq_cw`` times and every other word ``freq_ucw`` times in a shuffled list
``"1. word 2. word ..."``; the list grows to the budget. A worked example (40 words, 10/3 repeats) with its
answer precedes the prompt; below 4096 tokens RULER uses 20-word 3/1 example and 6/1 repeats instead.
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654),
``scripts/data/synthetic/common_words_extraction.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longkit.errors import EvalError
from longkit.eval.ruler.fit import Draft
from longkit.eval.ruler.templates import FAMILIES
from longkit.eval.ruler.words import common_words


@dataclass
class CWEConfig:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10

    def validate(self) -> None:
        for name in ("freq_cw", "freq_ucw", "num_cw"):
            if not 1 <= int(getattr(self, name)) <= 10_000:
                raise EvalError(f"parameter '{name}' must be in [1, 10000] (got {getattr(self, name)!r})")
        if self.freq_ucw >= self.freq_cw:
            raise EvalError(f"parameter 'freq_ucw' must be < freq_cw = {self.freq_cw} (got {self.freq_ucw})")


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CWEBuilder:
    def __init__(self, cfg: CWEConfig, sample_seed: str, run_seed: int, length: int):
        cfg.validate()
        self.cfg, self.sample_seed, self.run_seed = cfg, sample_seed, run_seed
        words = list(common_words())
        # RULER shuffles its vocabulary once per run with the run seed.
        random.Random(run_seed).shuffle(words)
        self.words = words
        # RULER's short-context variant (max_seq_length < 4096): a smaller example and 6/1 repeats.
        self.short = length < 4096
        self.family = FAMILIES["common_words_extraction"]

    def example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        chosen = rng.sample(self.words, num_words)
        cw, ucw = chosen[: self.cfg.num_cw], chosen[self.cfg.num_cw :]
        items = cw * common + ucw * uncommon
        # RULER shuffles each list with a generator seeded by the run seed alone.
        random.Random(self.run_seed).shuffle(items)
        return numbered(items), cw

    @property
    def min_size(self) -> int:
        return self.cfg.num_cw + 1

    @property
    def max_size(self) -> int:
        return len(self.words)

    def build(self, n: int) -> Draft:
        rng = random.Random(f"{self.sample_seed}|words")
        cfg = self.cfg
        if self.short:
            ex_ctx, ex_answer = self.example(rng, 20, 3, 1)
            ctx, answer = self.example(rng, n, 6, 1)
        else:
            ex_ctx, ex_answer = self.example(rng, 40, 10, 3)
            ctx, answer = self.example(rng, n, cfg.freq_cw, cfg.freq_ucw)
        template, prefix = self.family.template, self.family.answer_prefix
        # RULER's example: template + answer prefix, then the answer list with no space after the prefix's colon.
        shown = template.format(context=ex_ctx, query="") + prefix + numbered(ex_answer)
        text = shown + "\n" + template.format(context=ctx, query="")
        return Draft(text, prefix, answer, {"haystack_size": n, "example_answer": ex_answer})
