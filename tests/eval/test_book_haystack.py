"""Book haystacks (``--haystack kjv`` / ``austen``) read from the Debian packages' files (fixtures: see
tests/train/test_books.py)."""

from __future__ import annotations

import pytest

from conftest import FIXTURES
from longkit.errors import EvalError
from longkit.eval.haystack import check_haystack, haystack_text
from longkit.train.books import ROOT_ENV


def test_book_haystacks(monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(FIXTURES / "books"))
    check_haystack("kjv")
    kjv = haystack_text("kjv")
    # verses without their chapter:verse numbers, one a line under each book's name
    assert kjv.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.\nAnd the earth was")
    assert "\n\nJohn\n\nJesus wept.\n\nRevelation\n\n" in kjv and "1:1" not in kjv
    austen = haystack_text("austen")
    assert austen.startswith("SENSE AND SENSIBILITY") and "It is a truth universally acknowledged" in austen
    assert haystack_text(None) == haystack_text("pydoc") != kjv


def test_book_haystack_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    with pytest.raises(EvalError, match="'kjv' needs the Debian package bible-kjv-text"):
        check_haystack("kjv")
    with pytest.raises(EvalError, match="parameter 'haystack': source 'austen': .* r-cran-janeaustenr"):
        haystack_text("austen")
    # a directory named like a book is still a directory haystack
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "a.txt").write_text("Local prose. More of it.\n")
    monkeypatch.chdir(tmp_path)
    check_haystack("kjv")
    assert haystack_text("kjv") == "Local prose. More of it."
