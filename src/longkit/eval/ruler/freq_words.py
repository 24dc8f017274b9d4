"""RULER's frequent words extraction (fwe): the three most frequent coded words of a Zipf-distributed text.

A vocabulary of ``(length - tokens_to_generate) // 50`` random 6-letter words is ranked; rank k appears
``int(N k^-alpha / zeta(alpha))`` times in a shuffled text of about N words; rank 1 is the noise word ``...``,
so the answer is ranks 2-4. N is sized as RULER sizes it: start at ``budget // coded_wordlen``, grow in steps
of ``budget // 32`` until the prompt reaches the budget, take one step back, and step down while it is over
(``budget = length - tokens_to_generate``), so a prompt may end up to one step short of the budget, as RULER's.

Follows the current official code, ``scripts/data/synthetic/freq_words_extraction.py`` of NVIDIA/RULER (main,
commit c3f5e3b, 2025). RULER sizes N once on its first draw and reuses it; longkit sizes each sample on its own
vocabulary with the same steps (so sample i depends only on the seed, the length and i).
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654).
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


def vocab_size(cfg: FWEConfig, length: int, reserve: int) -> int:
    """RULER's vocabulary size: ``(max_seq_length - tokens_to_generate) // 50`` unless ``vocab_size`` is set."""
    size = (length - reserve) // 50 if cfg.vocab_size == -1 else int(cfg.vocab_size)
    if size < 5:
        # Ranks 2-4 are the answer and rank 5 the first non-answer: fewer words leave no question.
        raise EvalError(
            f"parameter 'length' = {length} is too short for fwe: its vocabulary (length - {reserve}) // 50 = {size} "
            f"needs at least 5 words; use length >= {250 + reserve}"
        )
    return size


class FWEBuilder:
    def __init__(
        self, cfg: FWEConfig, sample_seed: str, run_seed: int, length: int, reserve: int, vocab: list[str] | None = None
    ):
        cfg.validate()
        self.cfg, self.run_seed, self.length, self.reserve = cfg, run_seed, length, reserve
        if vocab is None:
            size = vocab_size(cfg, length, reserve)
            rng = random.Random(f"{sample_seed}|vocab")
            drawn: set[str] = set()
            while len(drawn) < size:
                drawn.add("".join(rng.choices(string.ascii_lowercase, k=cfg.coded_wordlen)))
            vocab = sorted(drawn)
            # RULER shuffles the sorted vocabulary with the run seed, then makes the top rank the noise "...".
            random.Random(run_seed).shuffle(vocab)
            vocab[0] = "..."
        self.vocab = vocab
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
        context = " ".join(items)
        text = family.template.format(context=context, query="")
        return Draft(text, family.answer_prefix, self.vocab[1:4], {"haystack_size": n, "counts": self.counts(n)[:5]},
                     context=context)

    def fit(self, count) -> tuple[Draft, int, int]:
        """RULER's sizing of N (see the module doc); ``count`` gives a draft's prompt tokens.

        Returns ``(draft, prompt_tokens, N)``; raises EvalError when no N >= ``min_size`` fits.
        """
        budget = self.length - self.reserve
        step = max(1, budget // 32)
        n = max(self.min_size, budget // self.cfg.coded_wordlen)
        while count(self.build(n)) < budget:
            n += step
        n -= step
        while n >= self.min_size:
            draft = self.build(n)
            tokens = count(draft)
            if tokens <= budget:
                return draft, tokens, n
            n -= step
        smallest = count(self.build(self.min_size))
        if smallest <= budget:
            draft = self.build(self.min_size)
            return draft, smallest, self.min_size
        raise EvalError(
            f"parameter 'length' = {self.length} is too short for RULER task 'fwe': its template with the smallest "
            f"text takes {smallest} tokens plus {self.reserve} reserved answer tokens; "
            f"use length >= {smallest + self.reserve}"
        )
