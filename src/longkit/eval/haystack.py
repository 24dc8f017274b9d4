"""Haystack text: real prose that needles are hidden in, and its token stream with sentence boundaries.

Default source: Python's own documentation topics (``pydoc_data.topics``, always installed, PSF licence,
~465K characters / ~110K SmolLM2 tokens). A user directory of ``.txt`` files can replace it
(``--haystack DIR``); files are read in sorted name order so a run is reproducible.
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


def directory_text(path: str | Path) -> str:
    """All ``.txt`` files under ``path`` (recursively, sorted), joined by blank lines."""
    root = Path(path)
    if not root.is_dir():
        raise EvalError(f"parameter 'haystack' must be a directory of .txt files; {root} is not a directory")
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise EvalError(f"parameter 'haystack': no .txt files under {root}")
    return "\n\n".join(f.read_text(errors="replace").strip() for f in files)


def haystack_text(source: str | Path | None = None) -> str:
    """The haystack text of ``source``: None or ``"pydoc"`` for the default, else a directory."""
    if source is None or str(source) == "pydoc":
        return pydoc_text()
    return directory_text(source)


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
