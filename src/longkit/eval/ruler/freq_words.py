"""RULER's frequent words extraction (fwe): the three most frequent coded words of a Zipf-distributed text.

A vocabulary of ``length // 50`` random 6-letter words is ranked; rank k appears ``int(N k^-alpha / zeta(alpha))``
times in a shuffled text of about N words; rank 1 is the noise word ``...``, so the answer is ranks 2-4.
N grows to the budget.
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654),
``scripts/data/synthetic/freq_words_extraction.py``.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

from longkit.errors import EvalError
from longkit.eval.ruler.fit import Draft
from longkit.eval.ruler.templates import FAMILIES


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1: a partial sum plus the Euler-Maclaurin tail (error far below 1e-12 at 1000 terms).

    RULER calls scipy.special.zeta; this avoids scipy as a dependency.
    """
    if s <= 1:
        raise EvalError(f"parameter 'alpha' must be > 1 (got {s})")
    partial = math.fsum(k**-s for k in range(1, terms))
    n = float(terms)
    tail = n ** (1 - s) / (s - 1) + 0.5 * n**-s + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    return partial + tail


@dataclass
class FWEConfig:
    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1

    def validate(self) -> None:
        if not 1.0 < float(self.alpha) <= 10.0:
            raise EvalError(f"parameter 'alpha' must be in (1, 10] (got {self.alpha!r})")
        if not 2 <= int(self.coded_wordlen) <= 20:
            raise EvalError(f"parameter 'coded_wordlen' must be in [2, 20] (got {self.coded_wordlen!r})")
        if self.vocab_size != -1 and not 5 <= int(self.vocab_size) <= 1_000_000:
            raise EvalError(
                f"parameter 'vocab_size' must be -1 (length // 50) or in [5, 1e6] (got {self.vocab_size!r})"
            )


class FWEBuilder:
    def __init__(self, cfg: FWEConfig, sample_seed: str, run_seed: int, length: int):
        cfg.validate()
        self.cfg, self.run_seed = cfg, run_seed
        size = max(5, length // 50) if cfg.vocab_size == -1 else cfg.vocab_size
        rng = random.Random(f"{sample_seed}|vocab")
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=cfg.coded_wordlen)))
        words = sorted(vocab)
        # RULER shuffles the sorted vocabulary with the run seed, then makes the top rank the noise "...".
        random.Random(run_seed).shuffle(words)
        words[0] = "..."
        self.vocab = words
        self.z = zeta(cfg.alpha)

    def counts(self, n: int) -> list[int]:
        return [int(n * k**-self.cfg.alpha / self.z) for k in range(1, len(self.vocab) + 1)]

    @property
    def min_size(self) -> int:
        # Rank 4 at least twice: then int counts of ranks 2..4 are strictly above rank 5's (no ties in the answer).
        return math.ceil(32 * self.z)

    def build(self, n: int) -> Draft:
        items = [w for w, c in zip(self.vocab, self.counts(n), strict=True) for _ in range(c)]
        # RULER shuffles with a generator seeded by the run seed alone.
        random.Random(self.run_seed).shuffle(items)
        family = FAMILIES["freq_words_extraction"]
        text = family.template.format(context=" ".join(items), query="")
        return Draft(text, family.answer_prefix, self.vocab[1:4], {"haystack_size": n, "counts": self.counts(n)[:5]})
