"""Books from Debian packages: the bible program's EC02 files (compress's LZW in windows) and R lazy-load data.

Fixtures (tests/fixtures/books/, laid out like the packages under a root directory):

- ``usr/lib/bible.data`` (2,048-byte windows) and ``bible_w8192.data`` (one short window): ``kjv_sample.txt``
  (real verses, in the package's text layout) compressed by the bible-kjv sources' own ``squish -w N`` and
  ``buildcmp``. The same tools, run on the text our reader decodes from the Debian ``bible.data``, rebuild that
  file byte for byte.
- ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdb,rdx}``: R's own bytes from r-cran-janeaustenr 1.0.0: each
  novel's serialization (header and character records as R wrote them) cut to its first 14 lines (Mansfield Park
  also keeps the line with "£", a UTF-8-flagged string), zlib-compressed; the real index with the new offsets.
- ``janeaustenr_Rdata.rdx``: the package's real index file, unchanged (values checked with the ``rdata`` package).

The tests against the installed packages run where they are installed (or LONGKIT_BOOKS_ROOT points at them).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections import Counter

import pytest

from conftest import FIXTURES
from longkit.errors import DataError
from longkit.train import books
from longkit.train import data as D

ROOT = FIXTURES / "books"
SAMPLE = (ROOT / "kjv_sample.txt").read_bytes()
GENESIS_1_1 = "In the beginning God created the heaven and the earth."
PRIDE_FIRST = ["It is a truth universally acknowledged, that a single man in possession",
               "of a good fortune, must be in want of a wife."]


# ------------------------------------------------------------------------------------------------ EC02 / LZW


@pytest.mark.parametrize("path", [ROOT / "usr/lib/bible.data", ROOT / "bible_w8192.data"], ids=["3-windows", "1"])
def test_ec02_decodes_exactly_what_the_bible_tools_compressed(path):
    # several windows, code widths growing from 9 to 12 bits within them: a reader that ignores compress's
    # group padding at width changes, or restarts the table wrongly per window, gets different bytes
    assert books.read_ec02(path) == SAMPLE


def test_kjv_verses_and_books_from_the_fixture():
    verses = books.kjv_verses(ROOT)
    assert len(verses) == 31 + 2 + 6 + 2 + 1 + 2
    assert verses[0] == books.Verse("Genesis", 1, 1, GENESIS_1_1)
    assert verses[30] == books.Verse("Genesis", 1, 31, "And God saw every thing that he had made, and, behold, it "
                                     "was very good. And the evening and the morning were the sixth day.")
    by_ref = {(v.book, v.chapter, v.verse): v.text for v in verses}
    assert by_ref["1 Samuel", 17, 49].startswith("And David put his hand in his bag, and took thence a stone")
    assert by_ref["Psalms", 23, 1] == "The LORD is my shepherd; I shall not want."
    assert by_ref["Song of Solomon", 1, 1] == "The song of songs, which is Solomon's."
    assert by_ref["John", 11, 35] == "Jesus wept."
    assert verses[-1] == books.Verse("Revelation", 22, 21, "The grace of our Lord Jesus Christ be with you all. Amen.")

    docs = books.kjv_documents(ROOT)
    assert [d.origin.rsplit("#", 1)[1] for d in docs] == ["Genesis", "1 Samuel", "Psalms", "Song of Solomon", "John",
                                                          "Revelation"]
    assert {d.source for d in docs} == {"kjv"}
    assert docs[0].text.startswith(f"Genesis\n\n1:1 {GENESIS_1_1}\n1:2 And the earth was without form")
    assert docs[3].text == ("Song of Solomon\n\n1:1 The song of songs, which is Solomon's.\n1:2 Let him kiss me "
                            "with the kisses of his mouth: for thy love is better than wine.\n")


def test_damaged_ec02_files_are_refused(tmp_path):
    data = (ROOT / "usr/lib/bible.data").read_bytes()
    bad = tmp_path / "bad.data"
    bad.write_bytes(b"XX" + data[2:])
    with pytest.raises(DataError, match="not an EC02 compressed data file"):
        books.read_ec02(bad)
    bad.write_bytes(data[:2] + b"03" + data[4:])
    with pytest.raises(DataError, match="version '03'"):
        books.read_ec02(bad)
    # every window but the last must fill the window size: here the header claims 4,096-byte windows
    bad.write_bytes(data[:84] + struct.pack(">I", 4096) + data[88:])
    with pytest.raises(DataError, match="window 0 decodes to 2048 bytes, not the window size 4096"):
        books.read_ec02(bad)
    bad.write_bytes(data[:-1])
    with pytest.raises(DataError, match="corrupt EC02 window table"):
        books.read_ec02(bad)
    with pytest.raises(DataError, match="maxbits"):
        books.lzw_decompress(b"", maxbits=17)


# ------------------------------------------------------------------------------------------- R lazy-load data


def test_unserialize_the_real_janeaustenr_index():
    index = books.unserialize_r(gzip.decompress((ROOT / "janeaustenr_Rdata.rdx").read_bytes()))
    assert index == {
        "variables": {"emma": [0, 352043], "mansfieldpark": [352043, 351373], "northangerabbey": [703416, 175196],
                      "persuasion": [878612, 185130], "prideprejudice": [1063742, 271037],
                      "sensesensibility": [1334779, 266556]},
        "references": {},
        "compressed": [True],
    }


def test_austen_novels_from_the_fixture():
    novels = books.austen_lines(ROOT)
    assert list(novels) == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                            "Northanger Abbey", "Persuasion"]
    assert novels["Pride & Prejudice"][:3] == ["PRIDE AND PREJUDICE", "", "By Jane Austen"]
    assert novels["Pride & Prejudice"][9:11] == PRIDE_FIRST
    assert novels["Emma"][:3] == ["EMMA", "", "By Jane Austen"]
    # a string R flagged UTF-8 (not ASCII) decodes as such
    assert novels["Mansfield Park"][-1] == "the command of her beauty, and her £20,000, any one who could satisfy the"
    docs = books.austen_documents(ROOT)
    assert {d.source for d in docs} == {"austen"} and len(docs) == 6
    assert docs[1].text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\n" + "\n".join(PRIDE_FIRST))


def test_lazyload_db_damage_and_other_compression_are_refused(tmp_path):
    src = ROOT / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    base = tmp_path / "Rdata"
    rdx = gzip.decompress(src.with_suffix(".rdx").read_bytes())
    rdb = src.with_suffix(".rdb").read_bytes()
    # compressed = 3 (xz) in the index instead of TRUE: refused by name rather than read as zlib
    one = struct.pack(">iii", 10, 1, 1)
    assert rdx.count(one) == 1
    base.with_suffix(".rdx").write_bytes(gzip.compress(rdx.replace(one, struct.pack(">iii", 13, 1, 3))))
    base.with_suffix(".rdb").write_bytes(rdb)
    with pytest.raises(DataError, match="compressed with method 3"):
        books.read_lazyload_db(base)
    # a damaged zlib stream
    base.with_suffix(".rdx").write_bytes(gzip.compress(rdx))
    base.with_suffix(".rdb").write_bytes(rdb[:10] + b"\x00" * 20 + rdb[30:])
    with pytest.raises(DataError, match="corrupt zlib data"):
        books.read_lazyload_db(base)
    # not R's XDR format
    with pytest.raises(DataError, match="not R's XDR serialization"):
        books.unserialize_r(b"A\n1\n")
    with pytest.raises(DataError, match="truncated"):
        books.unserialize_r(b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 16, 5))
    raw = zlib.decompress(rdb[4:94])
    assert books.unserialize_r(raw)[:3] == ["EMMA", "", "By Jane Austen"]


# ------------------------------------------------------------------------------- in the corpus, by name, missing


def test_named_sources_default_corpus_and_stats(monkeypatch, tiny_llama):
    monkeypatch.setenv(books.ROOT_ENV, str(ROOT))
    assert [d.origin for d in D.read_source("kjv")] == [d.origin for d in books.kjv_documents()]
    assert len(D.read_source("austen")) == 6
    docs = D.default_corpus(max_chars=200)
    sources = Counter(d.source for d in docs)
    assert sources["kjv"] == 6 and sources["austen"] == 6 and sources["python-stdlib"] > 50
    packed = D.build([d for d in docs if d.source in ("kjv", "austen")], tiny_llama.tokenizer, 256)
    stats = packed.stats.stats()["sources"]
    assert set(stats) == {"kjv", "austen"} and stats["kjv"]["documents"] == 6


def test_missing_packages_name_them(tmp_path, monkeypatch):
    monkeypatch.setenv(books.ROOT_ENV, str(tmp_path))
    assert not books.kjv_installed() and not books.austen_installed() and D.book_documents() == []
    with pytest.raises(DataError, match=r"source 'kjv': .*install the Debian package bible-kjv-text"):
        D.read_source("kjv")
    with pytest.raises(DataError, match=r"source 'austen': .*install the Debian package r-cran-janeaustenr"):
        D.read_source("austen")
    # a directory of that name is read as a directory, as before
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "a.txt").write_text("local text\n")
    monkeypatch.chdir(tmp_path)
    assert [d.text for d in D.read_source("kjv")] == ["local text\n"]


# --------------------------------------------------------------------------------------- the installed packages


@pytest.mark.skipif(not books.kjv_installed(), reason="bible-kjv-text is not installed (or LONGKIT_BOOKS_ROOT)")
def test_installed_kjv():
    verses = books.kjv_verses()
    assert len(verses) == 31102 and len({v.book for v in verses}) == 66
    assert verses[0] == books.Verse("Genesis", 1, 1, GENESIS_1_1)
    assert verses[-1].text == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert sum(v.book == "Psalms" for v in verses) == 2461


@pytest.mark.skipif(not books.austen_installed(), reason="r-cran-janeaustenr is not installed (or LONGKIT_BOOKS_ROOT)")
def test_installed_austen():
    novels = books.austen_lines()
    assert {k: len(v) for k, v in novels.items()} == {
        "Sense & Sensibility": 12624, "Pride & Prejudice": 13030, "Mansfield Park": 15349, "Emma": 16235,
        "Northanger Abbey": 7856, "Persuasion": 8328}
    assert novels["Pride & Prejudice"][9:11] == PRIDE_FIRST
