"""Haystack text: real prose that needles are hidden in, and its token stream with sentence boundaries.

Default source: Python's own documentation topics (``pydoc_data.topics``, always installed, PSF licence,
~465K characters / ~110K SmolLM2 tokens). A user directory of ``.txt`` files can replace it
(``--haystack DIR``); files are read in sorted name order so a run is reproducible. ``--haystack kjv`` or
``--haystack austen`` take books from the Debian packages ``bible-kjv-text`` / ``r-cran-janeaustenr`` when they
are installed (read by :mod:`longkit.train.books`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from longkit.errors import EvalError

# Heading underlines such as "*****" or "=====" in the pydoc topics carry no prose.
_RULE = re.compile(r"^\s*([*=\-~^])\1{2,}\s*$")
_SENTENCE_END = (".", "!", "?", "\n")


def pydoc_text() -> str:
    """Python's documentation topics as one text, topics in sorted order, heading underlines removed."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    parts = []
    for key in sorted(topics):
        lines = [line for line in topics[key].splitlines() if not _RULE.match(line)]
        parts.append("\n".join(lines).strip())
    return "\n\n".join(parts)


def read_text_file(path: str | Path, parameter: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); an EvalError naming ``parameter`` for a
    missing, unreadable, binary or non-UTF-8 file.

    Decoding with replacement characters would turn a binary file into a haystack of U+FFFD and score models on
    it; a file that is not UTF-8 text is refused instead."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise EvalError(f"parameter '{parameter}' must be a text file (UTF-8); {path} {what}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EvalError(f"parameter '{parameter}': cannot read {path} ({err.strerror or err})") from None
    # NUL bytes never occur in text (UTF-16 text has them too: it is not UTF-8)
    if b"\x00" in data:
        raise EvalError(f"parameter '{parameter}': {path} is binary (it holds NUL bytes), not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise EvalError(
            f"parameter '{parameter}': {path} is not UTF-8 text (byte {err.start} cannot be decoded); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def directory_text(path: str | Path) -> str:
    """All ``.txt`` files under ``path`` (recursively, sorted), joined by blank lines."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file" if root.is_file() else "does not exist"
        raise EvalError(f"parameter 'haystack' must be a directory of .txt files; {root} {what}")
    files = sorted(f for f in root.rglob("*.txt") if f.is_file())
    if not files:
        raise EvalError(f"parameter 'haystack': no .txt files under {root}")
    text = "\n\n".join(read_text_file(f, "haystack").strip() for f in files)
    if not text.strip():
        raise EvalError(f"parameter 'haystack': the .txt files under {root} hold no text")
    return text


#: Haystacks read from installed Debian packages, by name (a directory of that name takes precedence).
BOOK_HAYSTACKS = {"kjv": "bible-kjv-text", "austen": "r-cran-janeaustenr"}


def _book_name(source: str | Path) -> str | None:
    return str(source) if str(source) in BOOK_HAYSTACKS and not Path(source).exists() else None


def book_text(name: str) -> str:
    """A book haystack: ``kjv`` is the Bible's verses without their chapter:verse numbers (numbers in the haystack
    would be distractors for the numeric needles), one a line under each book's name; ``austen`` is the six
    novels as the package stores them."""
    from longkit.errors import DataError
    from longkit.train import books

    try:
        if name == "kjv":
            by_book: dict[str, list[str]] = {}
            for v in books.kjv_verses():
                by_book.setdefault(v.book, []).append(v.text)
            return "\n\n".join(f"{book}\n\n" + "\n".join(lines) for book, lines in by_book.items())
        if name == "austen":
            return "\n\n".join(d.text.strip() for d in books.austen_documents())
    except DataError as err:
        raise EvalError(f"parameter 'haystack': {err}") from None
    raise EvalError(f"parameter 'haystack': no book haystack {name!r} (books: {', '.join(BOOK_HAYSTACKS)})")


def check_haystack(source: str | Path | None) -> None:
    """Fail early (without reading a whole book) when ``source`` cannot give a haystack."""
    if source is None or str(source) == "pydoc":
        return
    name = _book_name(source)
    if name is None:
        directory_text(source)
        return
    from longkit.train import books

    if not (books.kjv_installed() if name == "kjv" else books.austen_installed()):
        raise EvalError(f"parameter 'haystack': {name!r} needs the Debian package {BOOK_HAYSTACKS[name]} "
                        f"(apt-get install {BOOK_HAYSTACKS[name]}), or set {books.ROOT_ENV} to where it is unpacked")


def haystack_text(source: str | Path | None = None) -> str:
    """The haystack text of ``source``: None or ``"pydoc"`` for the default, ``"kjv"`` / ``"austen"`` for a book
    haystack, else a directory."""
    if source is None or str(source) == "pydoc":
        return pydoc_text()
    name = _book_name(source)
    return book_text(name) if name else directory_text(source)


def ppl_text(source: str | Path | None = None) -> str:
    """The perplexity task's text: a UTF-8 text file, or None for the default (as the haystack's)."""
    if source is None:
        return pydoc_text()
    text = read_text_file(source, "ppl_text")
    if not text.strip():
        raise EvalError(f"parameter 'ppl_text': {source} holds no text")
    return text


@dataclass(frozen=True)
class TokenStream:
    """A text as token ids, and the indices i where a sentence ends just before token i."""

    ids: tuple[int, ...]
    boundaries: tuple[int, ...]

    def take(self, n: int) -> tuple[list[int], list[int]]:
        """The first ``n`` ids (the stream repeats if shorter) and the sentence boundaries inside them."""
        if not self.ids:
            raise EvalError("the haystack text is empty")
        reps = -(-n // len(self.ids))
        ids = list(self.ids) * reps
        bounds = [b + r * len(self.ids) for r in range(reps) for b in self.boundaries]
        # Each repetition starts a new document, so its start is a boundary too.
        bounds += [r * len(self.ids) for r in range(reps)]
        return ids[:n], sorted(b for b in set(bounds) if 0 <= b <= n)


def _token_texts(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    unique = sorted(set(ids))
    texts = tokenizer.batch_decode([[i] for i in unique], clean_up_tokenization_spaces=False)
    return dict(zip(unique, texts, strict=True))


def token_stream(tokenizer: Any, text: str) -> TokenStream:
    """Encode ``text`` once (no special tokens) and find its sentence boundaries."""
    return _cached_stream(tokenizer, text)


@lru_cache(maxsize=8)
def _cached_stream(tokenizer: Any, text: str) -> TokenStream:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    texts = _token_texts(tokenizer, ids)
    bounds = [i + 1 for i, t in enumerate(ids) if texts[t].rstrip(" ").endswith(_SENTENCE_END)]
    return TokenStream(tuple(ids), tuple(bounds))
