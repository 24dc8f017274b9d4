"""RULER's common words extraction (cwe): name the 10 words repeated most in a long numbered word list.

``num_cw`` common words appear ``freq_cw`` times and every other word ``freq_ucw`` times in a shuffled list
``"1. word 2. word ..."``; the list grows to the budget. A worked example (40 words, 10/3 repeats) with its
answer precedes the prompt; below 4096 tokens RULER uses 20-word 3/1 example and 6/1 repeats instead.

Follows the current official code, ``scripts/data/synthetic/common_words_extraction.py`` of NVIDIA/RULER (main,
commit c3f5e3b, 2025), not the 2024 release:

- the example is ``template + answer_prefix + " " + "1. w 2. w ..."`` and then ``"\\n"`` and the task; RULER
  applies the model's template to the example as well, so with a chat template the example is a user turn of
  its own with its answer after the assistant header (:class:`~longkit.eval.ruler.fit.Frame` renders it);
- a list of ``n`` distinct words draws from wonderwords' nouns + adjectives + verbs while ``n`` fits in them
  (8,166 words with wonderwords 2.2-3.0) and otherwise draws *all* ``n`` from RULER's ``english_words.json``.
  That file ships in no package (see :func:`~longkit.eval.ruler.words.english_words`); without it a length that
  needs more words raises EvalError instead of building a prompt short of the budget.

Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longkit.errors import EvalError
from longkit.eval.ruler.fit import Draft
from longkit.eval.ruler.templates import FAMILIES
from longkit.eval.ruler.words import common_words, english_words

#: Where RULER's second word list lives, for error messages.
ENGLISH_WORDS_SOURCE = "scripts/data/synthetic/json/english_words.json of NVIDIA/RULER (a Git LFS file)"


@dataclass
class CWEConfig:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    #: Path to RULER's english_words.json (needed only past the wonderwords vocabulary, ~200K tokens and up).
    english_words: str | None = None

    def validate(self) -> None:
        for name in ("freq_cw", "freq_ucw", "num_cw"):
            if not 1 <= int(getattr(self, name)) <= 10_000:
                raise EvalError(f"parameter '{name}' must be in [1, 10000] (got {getattr(self, name)!r})")
        if self.freq_ucw >= self.freq_cw:
            raise EvalError(f"parameter 'freq_ucw' must be < freq_cw = {self.freq_cw} (got {self.freq_ucw})")
        if self.english_words is not None:
            english_words(str(self.english_words))


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(words: list[str], common: int, uncommon: int, num_cw: int, run_seed: int) -> tuple[str, list[str]]:
    """RULER's list for drawn distinct ``words``: the first ``num_cw`` repeated ``common`` times, the rest
    ``uncommon`` times, shuffled by a generator seeded with the run seed alone (as RULER does), numbered."""
    cw, ucw = words[:num_cw], words[num_cw:]
    items = cw * common + ucw * uncommon
    random.Random(run_seed).shuffle(items)
    return numbered(items), cw


def cwe_prompt(
    example_words: list[str], words: list[str], cfg: CWEConfig, run_seed: int, short: bool
) -> tuple[str, list[tuple[str, str]], list[str]]:
    """The task text, the worked example as a (user, assistant) turn, and the gold words, for drawn words."""
    family = FAMILIES["common_words_extraction"]
    if short:
        ex_ctx, ex_answer = cwe_list(example_words, 3, 1, cfg.num_cw, run_seed)
        ctx, answer = cwe_list(words, 6, 1, cfg.num_cw, run_seed)
    else:
        ex_ctx, ex_answer = cwe_list(example_words, 10, 3, cfg.num_cw, run_seed)
        ctx, answer = cwe_list(words, cfg.freq_cw, cfg.freq_ucw, cfg.num_cw, run_seed)
    example = (family.template.format(context=ex_ctx, query=""), family.answer_prefix + " " + numbered(ex_answer))
    return family.template.format(context=ctx, query=""), [example], answer


class CWEBuilder:
    def __init__(self, cfg: CWEConfig, sample_seed: str, run_seed: int, length: int):
        cfg.validate()
        self.cfg, self.sample_seed, self.run_seed = cfg, sample_seed, run_seed
        words = list(common_words())
        # RULER shuffles its vocabulary once per run with the run seed.
        random.Random(run_seed).shuffle(words)
        self.words = words
        self.english = english_words(str(cfg.english_words)) if cfg.english_words is not None else None
        # RULER's short-context variant (max_seq_length < 4096): a smaller example and 6/1 repeats.
        self.short = length < 4096
        self.length = length

    def supply(self, n: int) -> list[str] | tuple[str, ...]:
        """The vocabulary a list of ``n`` distinct words is drawn from: RULER's rule (wonderwords while ``n`` fits
        in it, else the whole english_words.json list)."""
        if n <= len(self.words):
            return self.words
        if self.english is None:
            raise EvalError(self._needs_english())
        if n > len(self.english):
            raise EvalError(f"cwe needs {n} distinct words; the english_words list holds {len(self.english)}")
        return self.english

    def _needs_english(self) -> str:
        return (
            f"cwe at length {self.length} needs more than the {len(self.words)} distinct wonderwords words; RULER "
            f"then draws its list from {ENGLISH_WORDS_SOURCE}, which no package ships: pass its path as "
            "english_words=PATH (or set $LONGKIT_RULER_ENGLISH_WORDS), or use a shorter length"
        )

    @property
    def min_size(self) -> int:
        return self.cfg.num_cw + 1

    @property
    def max_size(self) -> int:
        return len(self.english) if self.english is not None else len(self.words)

    def build(self, n: int) -> Draft:
        rng = random.Random(f"{self.sample_seed}|words")
        example_words = rng.sample(self.words, 20 if self.short else 40)
        words = rng.sample(self.supply(n), n)
        text, examples, answer = cwe_prompt(example_words, words, self.cfg, self.run_seed, self.short)
        meta = {"haystack_size": n, "example_answer": example_words[: self.cfg.num_cw]}
        # The numbered list sits between the template's fixed text around {context} (cwe has no {query}).
        before, after = FAMILIES["common_words_extraction"].template.split("{context}")
        context = text[len(before):len(text) - len(after)]
        return Draft(text, FAMILIES["common_words_extraction"].answer_prefix, answer, meta, examples, context)

    def check_fit(self, size: int, n_tokens: int, budget: int, count) -> None:
        """Fail, rather than return a prompt short of the budget, where RULER would pass the wonderwords size.

        The search stops at ``max_size`` = the wonderwords size without the english list; if one more word
        (about the list's mean tokens per word) still fits, RULER's binary search would have gone on.
        """
        if self.english is not None or size < len(self.words):
            return
        base = count(self.build(self.min_size))
        per_word = (n_tokens - base) / (size - self.min_size)
        if n_tokens + per_word <= budget:
            raise EvalError(self._needs_english())
