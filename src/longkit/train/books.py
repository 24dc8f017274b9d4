"""Books for the offline corpus, read from the data files of two Debian packages (nothing is downloaded):

- ``bible-kjv-text``: the King James Bible as ``/usr/lib/bible.data``, the "EC02 Compressed Data File" of the
  ``bible`` program (Debian source package ``bible-kjv``): a header, a table of window offsets, and the text cut
  into 64 KiB windows, each compressed on its own with Unix ``compress``'s LZW. Decoded by :func:`read_ec02`;
  the text is one verse a line (``Ge1:1 In the beginning ...``), after one title line.
- ``r-cran-janeaustenr``: Jane Austen's six novels as R lazy-load data
  (``/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` + ``.rdx``): the ``.rdx`` index is a gzip-compressed
  R serialization of ``list(variables=, references=, compressed=)``, each variable an ``(offset, length)`` key into
  the ``.rdb``, where an object is a 4-byte big-endian length and a zlib stream of R's XDR serialization. Each
  novel is a character vector of lines. Decoded by :func:`read_lazyload_db` and :func:`unserialize_r`.

The readers look under a root directory (default ``/``; the ``LONGKIT_BOOKS_ROOT`` environment variable or the
``root`` parameter point at another, e.g. a directory where the ``.deb`` files were unpacked with ``dpkg -x``).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longkit.errors import DataError

if TYPE_CHECKING:
    from longkit.train.data import Document

#: Environment variable naming the directory the Debian paths are looked up under (default ``/``).
ROOT_ENV = "LONGKIT_BOOKS_ROOT"
KJV_DATA = "usr/lib/bible.data"
AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr"


def books_root(root: str | Path | None = None) -> Path:
    """The directory that the packages' paths (``usr/lib/...``) are looked up under."""
    return Path(root if root is not None else os.environ.get(ROOT_ENV) or "/").expanduser()


def kjv_path(root: str | Path | None = None) -> Path:
    return books_root(root) / KJV_DATA


def austen_path(root: str | Path | None = None) -> Path:
    return books_root(root) / AUSTEN_DIR / "data" / "Rdata"


def kjv_installed(root: str | Path | None = None) -> bool:
    return kjv_path(root).is_file()


def austen_installed(root: str | Path | None = None) -> bool:
    base = austen_path(root)
    return base.with_suffix(".rdb").is_file() and base.with_suffix(".rdx").is_file()


# ------------------------------------------------------------------------------------------ compress's LZW

_CLEAR = 256  # the table-reset code of block mode
_FIRST = 257  # first free table entry in block mode


def lzw_decompress(data: bytes, *, maxbits: int = 16, block_mode: bool = True) -> bytes:
    """Decode a headerless Unix ``compress`` (LZW) code stream, as the ``bible`` program's ``cmp_decompress``.

    Codes are 9 to ``maxbits`` bits, packed least-significant bit first. The encoder writes codes in groups of
    ``n_bits`` bytes (eight codes) and pads the group when the code width changes or the table is cleared, so the
    reader must also read whole groups and drop the rest of one at those points; reading the stream as one
    continuous bit string would lose the alignment after the first width change."""
    if not 9 <= maxbits <= 16:
        raise DataError(f"parameter 'maxbits' must be in [9, 16], got {maxbits}")
    maxmaxcode = 1 << maxbits
    prefix = [0] * maxmaxcode
    suffix = bytearray(maxmaxcode)
    suffix[:256] = bytes(range(256))
    free_ent = _FIRST if block_mode else 256
    n_bits, maxcode = 9, (1 << 9) - 1
    pos, group, bit, group_bits, cleared = 0, 0, 0, 0, False
    out = bytearray()

    def next_code() -> int:
        nonlocal n_bits, maxcode, pos, group, bit, group_bits, cleared
        if cleared or bit >= group_bits or free_ent > maxcode:
            # A new group: the width grows when the next entry would not fit (the encoder grew it at the same
            # point) and returns to 9 bits after a clear.
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if cleared:
                n_bits, maxcode, cleared = 9, (1 << 9) - 1, False
            chunk = data[pos:pos + n_bits]
            pos += len(chunk)
            if not chunk:
                return -1
            group = int.from_bytes(chunk, "little")
            bit = 0
            # only whole codes: a short last group's trailing bits are padding
            group_bits = len(chunk) * 8 - (n_bits - 1)
        code = (group >> bit) & ((1 << n_bits) - 1)
        bit += n_bits
        return code

    old = next_code()
    if old < 0:
        return b""
    if old > 255:
        raise DataError(f"LZW stream starts with code {old}; the first code must be a byte")
    last = old
    out.append(last)
    while (code := next_code()) >= 0:
        if code == _CLEAR and block_mode:
            prefix[:256] = [0] * 256
            cleared = True
            free_ent = _FIRST - 1
            if (code := next_code()) < 0:
                break
        incoming = code
        stack = bytearray()
        if code >= free_ent:  # the KwKwK case: the code being defined by this very step
            if code > free_ent:
                raise DataError(f"corrupt LZW stream: code {code} before entry {free_ent} exists")
            stack.append(last)
            code = old
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        last = suffix[code]
        stack.append(last)
        stack.reverse()
        out += stack
        if free_ent < maxmaxcode:
            prefix[free_ent] = old
            suffix[free_ent] = last
            free_ent += 1
        old = incoming
    return bytes(out)


# ------------------------------------------------------------------------------------------------ EC02 files

_EC02_HEADER = struct.Struct(">2s2s80sII")  # magic "EC", version "02", description, window size, window count


def read_ec02(path: str | Path) -> bytes:
    """The uncompressed contents of a ``bible`` "EC02 Compressed Data File" (``tsl.h``'s layout: magic ``EC``,
    version ``02``, an 80-byte description, big-endian window size and count, count + 1 big-endian window offsets;
    the first window follows ``compress``'s 3-byte header). Every window but the last must decode to exactly the
    window size, which checks the decoding."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise DataError(f"{p}: cannot read ({err.strerror})") from None
    if len(data) < _EC02_HEADER.size or data[:2] != b"EC":
        raise DataError(f"{p}: not an EC02 compressed data file (bad magic {data[:2]!r})")
    magic, version, _, wsize, wnum = _EC02_HEADER.unpack_from(data)
    if version != b"02":
        raise DataError(f"{p}: EC data file version {version.decode('latin-1')!r}; only version '02' is supported")
    table_end = _EC02_HEADER.size + 4 * (wnum + 1)
    if wnum < 1 or wsize < 1 or table_end > len(data):
        raise DataError(f"{p}: corrupt EC02 header ({wnum} windows of {wsize} bytes in a {len(data)}-byte file)")
    offsets = struct.unpack_from(f">{wnum + 1}I", data, _EC02_HEADER.size)
    if list(offsets) != sorted(offsets) or offsets[0] < table_end or offsets[-1] > len(data):
        raise DataError(f"{p}: corrupt EC02 window table")
    # compress's header byte (0x1F 0x9D, then max bits | block flag) sits before window 0; the bible program
    # ignores it and decodes with 16 bits, block mode, which is what its squish tool writes.
    head = data[offsets[0] - 3:offsets[0]]
    maxbits, block = (head[2] & 0x1F, bool(head[2] & 0x80)) if head[:2] == b"\x1f\x9d" else (16, True)
    parts = []
    for w in range(wnum):
        text = lzw_decompress(data[offsets[w]:offsets[w + 1]], maxbits=maxbits, block_mode=block)
        if len(text) != wsize and w != wnum - 1:
            raise DataError(f"{p}: window {w} decodes to {len(text)} bytes, not the window size {wsize}")
        parts.append(text)
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------- the Bible

#: The 66 books in the file's order: the abbreviation the data file uses, and the book's name.
KJV_BOOKS = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"), ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"), ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"), ("2Ki", "2 Kings"), ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"),
    ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)
_KJV_NAMES = dict(KJV_BOOKS)


@dataclass(frozen=True)
class Verse:
    book: str  # the book's name, e.g. "Genesis"
    chapter: int
    verse: int
    text: str


def parse_kjv(text: str, *, origin: str = "bible.data") -> list[Verse]:
    """The verses of the decoded data file: a title line, then ``<abbr><chapter>:<verse> <text>`` a line."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Holy Bible"):
        raise DataError(f"{origin}: not the bible-kjv text (first line {lines[0][:40] if lines else ''!r})")
    verses = []
    for n, line in enumerate(lines[1:], 2):
        ref, _, body = line.partition(" ")
        head, colon, verse = ref.partition(":")
        # the abbreviation is letters after an optional leading digit (1Sm), the chapter the trailing digits
        split = len(head.rstrip("0123456789"))
        abbr, chapter = head[:split], head[split:]
        if not colon or not chapter or not verse.isdigit() or abbr not in _KJV_NAMES:
            raise DataError(f"{origin}: line {n} is not a verse: {line[:40]!r}")
        verses.append(Verse(_KJV_NAMES[abbr], int(chapter), int(verse), body))
    return verses


def kjv_verses(root: str | Path | None = None) -> list[Verse]:
    """Every verse of the King James Bible from the installed ``bible-kjv-text`` package."""
    path = kjv_path(root)
    if not path.is_file():
        raise DataError(f"source 'kjv': {path} not found; install the Debian package bible-kjv-text "
                        f"(apt-get install bible-kjv-text) or set {ROOT_ENV} to where it is unpacked")
    data = read_ec02(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: decoded text is not ASCII at byte {err.start}") from None
    return parse_kjv(text, origin=str(path))


def kjv_documents(root: str | Path | None = None) -> list[Document]:
    """One document per book of the Bible (source ``kjv``): the book's name, a blank line, then one verse a line
    as ``chapter:verse text``."""
    from longkit.train.data import Document

    path = kjv_path(root)
    books: dict[str, list[str]] = {}
    for v in kjv_verses(root):
        books.setdefault(v.book, []).append(f"{v.chapter}:{v.verse} {v.text}")
    return [Document(f"{name}\n\n" + "\n".join(lines) + "\n", "kjv", f"{path}#{name}")
            for name, lines in books.items()]


# ------------------------------------------------------------------------------------ R serialization (XDR)

_NILVALUE, _REFSXP, _SYMSXP, _LISTSXP, _CHARSXP = 254, 255, 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
# environments that are written as a bare flag word: global, empty, base, base namespace
_SPECIAL_ENVS = {253: "R_GlobalEnv", 242: "R_EmptyEnv", 241: "R_BaseEnv", 247: "R_BaseNamespace"}
_NA_INTEGER = -(2**31)
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
# encoding bits of a CHARSXP's "levels" (flags >> 12)
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6


@dataclass(frozen=True)
class RSymbol:
    name: str


class _Unserializer:
    """R's ``unserialize`` for the XDR format, for the plain data types text needs: NULL, symbols, pairlists,
    character, logical, integer, double, and list vectors. A vector with a ``names`` attribute becomes a dict;
    other attributes are dropped. Anything else (closures, environments, ALTREP, bytecode...) is refused."""

    def __init__(self, data: bytes, origin: str):
        self.data, self.pos, self.origin = data, 0, origin
        self.refs: list[Any] = []
        self.encoding = "utf-8"

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.origin}: {what} (R serialization, byte {self.pos})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("truncated data")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words, upper then lower half
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise self.fail(f"negative length {n}")
        return n

    def top(self) -> Any:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise self.fail(f"format {fmt!r} is not R's XDR serialization ('X\\n'); ascii and native formats are "
                            "not supported")
        version = self.int()
        self.take(8)  # the writer's R version and the oldest R that can read it
        if version == 3:
            self.encoding = self.take(self.int()).decode("ascii", "replace")
        elif version != 2:
            raise self.fail(f"serialization version {version}; versions 2 and 3 are supported")
        return self.item()

    def attributes(self) -> dict[str, Any]:
        pairs = self.item()
        return {tag: value for tag, value in pairs} if isinstance(pairs, list) else {}

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        encoding = "latin-1" if levels & _LATIN1 else "utf-8" if levels & (_UTF8 | _ASCII) else self.encoding
        try:
            return raw.decode("utf-8" if encoding.upper().replace("_", "-") in ("UTF-8", "UTF8") else encoding)
        except (UnicodeDecodeError, LookupError):
            raise self.fail(f"string not decodable as {encoding}") from None

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind in _SPECIAL_ENVS:
            return _SPECIAL_ENVS[kind]
        if kind == _REFSXP:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.refs):
                raise self.fail(f"reference {index} to an object not read yet")
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            sym = RSymbol(name if isinstance(name, str) else "")
            self.refs.append(sym)
            return sym
        if kind == _LISTSXP:
            # a pairlist: (tag, value) pairs, read iteratively along the CDR chain
            out = []
            while True:
                if flags & _HAS_ATTR:
                    self.attributes()
                tag = self.item() if flags & _HAS_TAG else None
                out.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
                flags = self.int()
                if flags & 0xFF == _NILVALUE:
                    return out
                if flags & 0xFF != _LISTSXP:
                    raise self.fail(f"pairlist ending in type {flags & 0xFF}")
        if kind == _CHARSXP:
            return self.charsxp(flags)
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            value: Any = [None if v == _NA_INTEGER else (bool(v) if kind == _LGLSXP else v)
                          for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif kind == _REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == _STRSXP:
            value = []
            for _ in range(self.length()):
                f = self.int()
                if f & 0xFF != _CHARSXP:
                    raise self.fail(f"character vector element of type {f & 0xFF}")
                value.append(self.charsxp(f))
        elif kind in (_VECSXP, _EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise self.fail(f"unsupported R object type {kind}")
        if flags & _HAS_ATTR:
            names = self.attributes().get("names")
            if isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value, strict=True))
        return value


def unserialize_r(data: bytes, *, origin: str = "R data") -> Any:
    """Python values from R's XDR serialization (``serialize()``, ``saveRDS`` without compression)."""
    return _Unserializer(data, origin).top()


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Every variable of an R lazy-load database ``base.rdb`` / ``base.rdx`` (``R CMD INSTALL``'s
    ``data/Rdata``), unserialized. Objects compressed with zlib (R's default) are supported; a database
    compressed with bzip2 or xz is refused by name."""
    base = Path(base)
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    try:
        index_raw, blob = rdx.read_bytes(), rdb.read_bytes()
    except OSError as err:
        raise DataError(f"{err.filename}: cannot read ({err.strerror})") from None
    try:
        index_raw = gzip.decompress(index_raw) if index_raw[:2] == b"\x1f\x8b" else index_raw
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{rdx}: corrupt gzip data ({err})") from None
    index = unserialize_r(index_raw, origin=str(rdx))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise DataError(f"{rdx}: not an R lazy-load index (no 'variables')")
    compressed = (index.get("compressed") or [1])[0]
    if compressed not in (1, True):
        raise DataError(f"{rdx}: lazy-load data compressed with method {compressed} (bzip2 or xz); only zlib "
                        "(method 1) is supported")
    out = {}
    for name, key in index["variables"].items():
        if not (isinstance(key, list) and len(key) == 2):
            raise DataError(f"{rdx}: bad key for {name!r}")
        offset, size = key
        chunk = blob[offset:offset + size]
        if len(chunk) != size or size < 4:
            raise DataError(f"{rdb}: object {name!r} at {offset}+{size} is past the end of the file")
        expected = struct.unpack(">I", chunk[:4])[0]
        try:
            raw = zlib.decompress(chunk[4:])
        except zlib.error as err:
            raise DataError(f"{rdb}: object {name!r}: corrupt zlib data ({err})") from None
        if len(raw) != expected:
            raise DataError(f"{rdb}: object {name!r} inflates to {len(raw)} bytes, its header says {expected}")
        out[name] = unserialize_r(raw, origin=f"{rdb}:{name}")
    return out


# ---------------------------------------------------------------------------------------------- Jane Austen

#: janeaustenr's variables and the novels' titles, in order of publication (as ``austen_books()``).
AUSTEN_NOVELS = (
    ("sensesensibility", "Sense & Sensibility"), ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"), ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)


def austen_lines(root: str | Path | None = None) -> dict[str, list[str]]:
    """Each novel's lines (title -> list of lines, as the package stores them) from the installed
    ``r-cran-janeaustenr`` package."""
    base = austen_path(root)
    if not austen_installed(root):
        raise DataError(f"source 'austen': {base}.rdb/.rdx not found; install the Debian package "
                        f"r-cran-janeaustenr (apt-get install r-cran-janeaustenr) or set {ROOT_ENV} to where it is "
                        "unpacked")
    data = read_lazyload_db(base)
    out = {}
    for var, title in AUSTEN_NOVELS:
        lines = data.get(var)
        if not isinstance(lines, list) or not all(isinstance(s, str | None) for s in lines):
            raise DataError(f"{base}.rdb: no character vector {var!r} (variables: {', '.join(data)})")
        out[title] = ["" if s is None else s for s in lines]
    return out


def austen_documents(root: str | Path | None = None) -> list[Document]:
    """One document per novel (source ``austen``): its lines joined by newlines."""
    from longkit.train.data import Document

    base = austen_path(root)
    return [Document("\n".join(lines).strip() + "\n", "austen", f"{base}.rdb#{title}")
            for title, lines in austen_lines(root).items()]


__all__ = [
    "AUSTEN_NOVELS",
    "KJV_BOOKS",
    "ROOT_ENV",
    "Verse",
    "austen_documents",
    "austen_installed",
    "austen_lines",
    "kjv_documents",
    "kjv_installed",
    "kjv_verses",
    "lzw_decompress",
    "parse_kjv",
    "read_ec02",
    "read_lazyload_db",
    "unserialize_r",
]
