"""Word sources of the RULER tasks: wonderwords' lists (as RULER) and the essay haystack's words.

RULER draws keys as adjective-noun pairs and the common-words list from the word lists that ship inside the
``wonderwords`` package (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``); longkit reads the same
files (``pip install longkit[eval]``), so no word list is downloaded at run time. RULER's essay haystack is Paul
Graham's essays; longkit's default is public-domain prose (Python's documentation topics, see
:mod:`longkit.eval.haystack`) or a user directory of ``.txt`` files, split into words as RULER does.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from longkit.errors import EvalError
from longkit.eval.haystack import haystack_text

# A sentence ends at . ! or ? followed by white space; a stand-in for NLTK's punkt that RULER uses
# (punkt also knows abbreviations such as "e.g."; the difference only moves where a needle may go).
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=4)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' lists (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``), as RULER reads it."""
    try:
        from wonderwords import random_word
    except ImportError as exc:
        raise EvalError(
            "RULER's word keys and word lists come from the 'wonderwords' package; pip install 'longkit[eval]'"
        ) from exc
    return tuple(random_word._get_words_from_text_file(name))


@lru_cache(maxsize=1)
def key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted distinct adjectives and nouns: RULER's keys are a uniform choice of ``f"{adj}-{noun}"``.

    RULER materialises every pair (6.2M strings); choosing an adjective and a noun independently is the same
    uniform distribution over the distinct pairs without the memory.
    """
    return tuple(sorted(set(wonderwords_list("adjectivelist.txt")))), tuple(
        sorted(set(wonderwords_list("nounlist.txt")))
    )


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: nouns + adjectives + verbs, distinct and sorted (shuffled per run by the caller)."""
    words = wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt") + wonderwords_list("verblist.txt")
    return tuple(sorted(set(words)))


@lru_cache(maxsize=2)
def english_words(path: str) -> tuple[str, ...]:
    """RULER's second cwe vocabulary, ``scripts/data/synthetic/json/english_words.json``: a JSON object whose
    values are the words, read as RULER reads it (``list(json.load(f).values())``, order kept).

    RULER draws every word of a cwe list from it when the list needs more distinct words than wonderwords has
    (about 200K tokens and up). The file is a Git LFS object of NVIDIA/RULER and ships in no package, so longkit
    cannot bring it: users pass their copy (``english_words=`` / ``$LONGKIT_RULER_ENGLISH_WORDS``).
    """
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"parameter 'english_words': file {path} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(f"parameter 'english_words': {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data or not all(isinstance(w, str) and w for w in data.values()):
        raise EvalError(
            f"parameter 'english_words': {path} must be a non-empty JSON object of words, as RULER's "
            "english_words.json (got something else; a Git LFS pointer file is not the list)"
        )
    return tuple(data.values())


@lru_cache(maxsize=4)
def essay_words(source: str | None = None) -> tuple[str, ...]:
    """The essay haystack as RULER keeps it: white space collapsed, split into words."""
    text = haystack_text(source)
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


def essay_text(words: tuple[str, ...], n: int) -> str:
    """The first ``n`` words of the essay, repeating it when ``n`` exceeds its length (as RULER does)."""
    if not words:
        raise EvalError("the essay haystack is empty")
    reps = -(-n // len(words))
    return " ".join((list(words) * reps)[:n]) if reps > 1 else " ".join(words[:n])


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT.split(text.strip()) if s]


def source_label(source: str | Path | None) -> str:
    return "pydoc" if source is None or str(source) == "pydoc" else str(source)
