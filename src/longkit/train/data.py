"""Long training data: local corpora, per-source length upsampling, and packing with per-document attention.

Pipeline: read documents (:func:`read_text_dir`, :func:`read_jsonl`, :func:`read_parquet`, the offline
:func:`default_corpus`, or a generated source such as ``kv-retrieval``; :func:`read_sources` reads ``--data`` specs)
-> :func:`tokenize` -> optionally :func:`upsample_long` (with per-source token shares) -> :func:`pack`.
:func:`build` runs all of it and keeps the :class:`DataStats`.

Packing conventions (what the model sees):

- each document is ``tokens + [eos]``; a document longer than the pack length is split into chunks of exactly
  ``length`` tokens (the tail is packed like a short document) and each chunk is its own attention document;
  ``DataStats`` counts the split documents and their chunks;
- documents are packed whole, first-fit, into rows of exactly ``length`` tokens; the rest of a row is padding;
- ``position_ids`` restart at 0 at every document (and at the padding, which forms its own block);
- ``labels`` are the input ids with the first token of every document (and all padding) set to -100: the
  models shift labels by one, so this is the label the previous document's last token would otherwise be
  trained to predict across the boundary. The loss of a packed row is then exactly the sum of its documents'
  own losses (the first token of a lone document has no prediction either);
- answer-only loss: a :class:`Document` may name the character spans whose tokens are trained (a chat row's
  assistant turns, a prompt/completion row's completion); every other token's label is -100 too, on top of the
  rule above. The spans travel as a per-token mask (:class:`TokenizedDocument`) through upsampling, splitting and
  packing, and PoSE (which only rewrites position ids) keeps the labels where they are.

No attention across documents: the seam is transformers' packed-sequence detection from ``position_ids``
(``masking_utils.find_packed_sequence_indices``, the format ``DataCollatorWithFlattening`` produces): with
``attention_mask=None`` and no cache, ``create_causal_mask`` ANDs the causal mask with "same document", for
sdpa, eager and flex attention, and flash-attention reads the same position ids as varlen boundaries. It needs
no O(length²) mask in the batch. Detection is skipped when a cache exists, and Llama-style configs default to
``use_cache=True``, so call the model with :func:`model_inputs` (which sets ``use_cache=False``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longkit.errors import DataError
from longkit.train import books

#: Text files a text directory contributes (one document per file).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Document:
    """One raw document: its text, the source (domain) it counts under, and where it came from.

    ``spans``: the ``[start, end)`` character ranges of ``text`` whose tokens are trained (answer-only loss: the
    assistant turns of a chat, the completion of a prompt/completion row), sorted and not overlapping; every other
    token gets label -100. None (the default): every token is trained, as for plain text."""

    text: str
    source: str
    origin: str
    spans: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.spans is None:
            return
        at = 0
        for span in self.spans:
            if len(span) != 2 or not at <= span[0] < span[1] <= len(self.text):
                raise DataError(f"{self.origin}: parameter 'spans' must be sorted, non-overlapping, non-empty "
                                f"[start, end) ranges inside the {len(self.text)} characters of the text; got "
                                f"{list(self.spans)}")
            at = span[1]
        if not self.spans:
            raise DataError(f"{self.origin}: parameter 'spans' is empty: the document has nothing to train on")


@dataclass(frozen=True)
class TokenizedDocument:
    """Token ids (ending in EOS) and, for answer-only documents, ``mask``: per token, whether it is a training
    target (its label is kept); None means every token is."""

    ids: tuple[int, ...]
    source: str
    origin: str
    mask: tuple[bool, ...] | None = None

    def trained_tokens(self) -> int:
        return len(self.ids) if self.mask is None else sum(self.mask)


# ---------------------------------------------------------------------------------------------------- readers


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); training data must be UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def read_text_dir(path: str | Path, *, source: str | None = None,
                  suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Document]:
    """Every text file under ``path`` (recursively, sorted) as one document; the source defaults to the
    directory's name. An empty file or a directory without text files is an error."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"parameter 'path': {root} is not a directory of text files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{root}: no text files ({', '.join(suffixes)}) in the directory")
    name = source or root.name
    docs = []
    for f in files:
        text = _read_utf8(f)
        if not text.strip():
            raise DataError(f"{f}: empty text file (remove it or put text in it)")
        docs.append(Document(text, name, str(f)))
    return docs


def read_jsonl(path: str | Path, *, text_field: str = "text", source: str | None = None,
               tokenizer: Any = None) -> list[Document]:
    """One JSON object per line; blank lines are skipped. Errors name the file and line. The source defaults to the
    file's stem. Three kinds of row (they may be mixed):

    - ``{text_field: "..."}``: plain text, every token trained;
    - ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with ``tokenizer``'s chat template,
      loss on the assistant turns only (:func:`render_chat`; needs ``tokenizer``);
    - ``{"prompt": "...", "completion": "..."}``: the two strings concatenated, loss on the completion only
      (:func:`prompt_completion`).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"parameter 'path': no JSONL file {p}")
    try:
        raw = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text; training data must be UTF-8") from None
    name = source or p.stem
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
        if text_field in record:
            text = record[text_field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field {text_field!r} must be a non-empty string, got {text!r:.40}")
            docs.append(Document(text, name, where))
        elif "messages" in record:
            if tokenizer is None:
                raise DataError(f"{where}: a chat row ('messages') is rendered with the model's chat template; pass "
                                "the tokenizer")
            text, spans = render_chat(record["messages"], tokenizer, where=where)
            docs.append(Document(text, name, where, spans))
        elif "prompt" in record or "completion" in record:
            text, spans = prompt_completion(record.get("prompt"), record.get("completion"), where=where)
            docs.append(Document(text, name, where, spans))
        else:
            raise DataError(f"{where}: no {text_field!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
                            "set text_field, or give chat rows ('messages') or 'prompt'/'completion' rows")
    if not docs:
        raise DataError(f"{p}: empty JSONL file (no records)")
    return docs


def read_parquet(path: str | Path, *, text_field: str = "text", source: str | None = None) -> list[Document]:
    """A parquet file's ``text_field`` column, one document per row, through the ``datasets`` library's local
    parquet loader (or pyarrow directly when only pyarrow is installed)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"parameter 'path': no parquet file {p}")
    name = source or p.stem
    if importlib.util.find_spec("datasets") is not None:
        from datasets import load_dataset

        try:
            table = load_dataset("parquet", data_files=str(p), split="train")
        except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise many types for a bad file
            raise DataError(f"{p}: cannot read as parquet ({str(err).splitlines()[0] if str(err) else err!r})") from None
        columns = table.column_names
        texts = table[text_field] if text_field in columns else None
    elif importlib.util.find_spec("pyarrow") is not None:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as err:  # noqa: BLE001 - see above
            raise DataError(f"{p}: cannot read as parquet ({str(err).splitlines()[0] if str(err) else err!r})") from None
        columns = table.column_names
        texts = table.column(text_field).to_pylist() if text_field in columns else None
    else:
        raise DataError(f"{p}: reading parquet needs the 'datasets' library: pip install 'longkit[train]'")
    if texts is None:
        raise DataError(f"{p}: no {text_field!r} column (columns: {', '.join(columns)}); set text_field")
    docs = []
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: row {row}: column {text_field!r} must be a non-empty string, got {text!r:.40}")
        docs.append(Document(text, name, f"{p}#row{row}"))
    if not docs:
        raise DataError(f"{p}: empty parquet file (no rows)")
    return docs


def read_source(path: str | Path, *, text_field: str = "text", source: str | None = None, tokenizer: Any = None,
                row_length: int | None = None, params: dict[str, str] | None = None) -> list[Document]:
    """Dispatch on what ``path`` is: a directory of text files, ``.jsonl``/``.json`` lines, ``.parquet``, or the
    name of a built-in source (:data:`NAMED_SOURCES`: the offline corpora ``python-stdlib``, ``python-docs``,
    ``kjv``, ``austen``, and the generated ``kv-retrieval``) when no such path exists. ``tokenizer`` renders chat
    rows and sizes generated documents; ``row_length`` is the packed row length (a generated source's default
    document length); ``params``: a built-in source's parameters (strings, as parsed from ``--data``)."""
    p = Path(path).expanduser()
    if str(path) in NAMED_SOURCES and not p.exists():
        named = NAMED_SOURCES[str(path)]
        unknown = sorted(set(params or {}) - set(named.params))
        if unknown:
            raise DataError(f"source {str(path)!r} has no parameter {unknown[0]!r}; valid parameters: "
                            f"{', '.join(('share', *named.params))}")
        return named.load(tokenizer=tokenizer, row_length=row_length, **(params or {}))
    if params:
        raise DataError(f"source {str(path)!r} has no parameter {sorted(params)[0]!r}; valid parameters: share")
    if p.is_dir():
        return read_text_dir(p, source=source)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(p, text_field=text_field, source=source, tokenizer=tokenizer)
    if suffix == ".parquet":
        return read_parquet(p, text_field=text_field, source=source)
    if not p.exists():
        raise DataError(f"parameter 'path': {p} does not exist")
    raise DataError(f"parameter 'path': {p} is not a text directory, .jsonl or .parquet file, nor a built-in corpus "
                    f"({', '.join(NAMED_SOURCES)})")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` entry: ``PATH_OR_NAME[:key=value,...]``. ``share``: the fraction of the training tokens
    drawn from this source (None: the sources without a share split what is left in proportion to their size);
    ``params``: a built-in source's own parameters (``kv-retrieval``: ``length``, ``count``, ``seed``)."""

    path: str
    share: float | None = None
    params: dict[str, str] = field(default_factory=dict)


def parse_source(spec: str) -> SourceSpec:
    """``"kv-retrieval:length=2048,count=500,share=0.3"`` -> its :class:`SourceSpec`. A path that exists is taken
    whole (even with a ``:`` in it); else the text after the last ``:`` is the parameter list when it holds a
    ``key=value``. Errors name the entry and the parameter."""
    text = str(spec).strip()
    if not text:
        raise DataError("parameter 'data': empty source; expected a directory, a .jsonl/.parquet file or a built-in "
                        f"source ({', '.join(NAMED_SOURCES)}), optionally with :key=value,...")
    head, sep, tail = text.rpartition(":")
    if Path(text).expanduser().exists() or not sep or "=" not in tail:
        return SourceSpec(text)
    params: dict[str, str] = {}
    for item in tail.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key or not value:
            raise DataError(f"parameter 'data': bad source {text!r}: {item.strip()!r} is not key=value")
        if key in params:
            raise DataError(f"parameter 'data': bad source {text!r}: parameter {key!r} is given twice")
        params[key] = value
    share = params.pop("share", None)
    if share is not None:
        try:
            value = float(share)
        except ValueError:
            value = math.nan
        if not 0.0 < value <= 1.0:
            raise DataError(f"parameter 'data': source {head!r}: parameter 'share' must be a number in (0, 1], "
                            f"got {share!r}")
        share = value
    return SourceSpec(head.strip(), share, params)


def read_sources(specs: Sequence[str], *, tokenizer: Any = None, row_length: int | None = None,
                 text_field: str = "text") -> tuple[list[Document], dict[str, float]]:
    """The documents of every ``--data`` entry (:func:`parse_source`, :func:`read_source`) and the token shares
    asked for, by source name (for :func:`upsample_long`). A source with a share must have a name of its own."""
    docs: list[Document] = []
    shares: dict[str, float] = {}
    names_of: list[tuple[str, set[str], float | None]] = []
    for raw in specs:
        spec = parse_source(raw)
        got = read_source(spec.path, text_field=text_field, tokenizer=tokenizer, row_length=row_length,
                          params=spec.params)
        names = {d.source for d in got}
        for other, other_names, other_share in names_of:
            clash = sorted(names & other_names)
            if clash and (spec.share is not None or other_share is not None):
                raise DataError(f"parameter 'data': sources {other!r} and {raw!r} both count as {clash[0]!r}; a "
                                "source with a share needs a name of its own (rename a directory or file)")
        names_of.append((raw, names, spec.share))
        if spec.share is not None:
            for name in names:
                # a source that reads several named corpora: its share split by their sizes
                part = sum(len(d.text) for d in got if d.source == name) / sum(len(d.text) for d in got)
                shares[name] = spec.share * part
        docs += got
    return docs, shares


# ------------------------------------------------------------------------------------------ offline corpus

#: Standard-library packages left out of the code source: the test suite and bundled third-party code
#: (dominated by generated data, not repository-level code).
_STDLIB_SKIP = frozenset({"test", "idlelib", "lib2to3", "ensurepip", "site-packages", "dist-packages", "__pycache__",
                          "tkinter", "turtledemo"})


def stdlib_documents(*, max_chars: int | None = None) -> list[Document]:
    """The Python standard library's sources, one document per package (its ``.py`` files concatenated in
    path order, each under a ``# file:`` header) and per top-level module: repository-level code, as ProLong uses code repositories.
    Source ``python-stdlib``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for pkg in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        if pkg.name in _STDLIB_SKIP:
            continue
        parts = []
        for f in sorted(pkg.rglob("*.py")):
            rel = f.relative_to(root)
            if any(part in _STDLIB_SKIP or part in ("tests", "test") for part in rel.parts[:-1]):
                continue
            try:
                parts.append(f"# file: {rel.as_posix()}\n{f.read_text(encoding='utf-8')}")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib files are deliberately not UTF-8 (encoding tests); not code to learn from
        text = "\n\n".join(parts)
        if text.strip():
            docs.append(Document(text[:max_chars] if max_chars else text, "python-stdlib", str(pkg)))
    # Top-level modules (os.py, typing.py...) are single-file packages: one document each.
    for f in sorted(root.glob("*.py")):
        try:
            text = f"# file: {f.name}\n{f.read_text(encoding='utf-8')}"
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(Document(text[:max_chars] if max_chars else text, "python-stdlib", str(f)))
    return docs


def pydoc_documents() -> list[Document]:
    """Python's documentation topics (``pydoc_data.topics``), one document per topic. Source ``python-docs``."""
    from pydoc_data.topics import topics

    return [Document(text, "python-docs", f"pydoc_data.topics[{key!r}]")
            for key, text in sorted(topics.items()) if text.strip()]


def book_documents() -> list[Document]:
    """The books of the Debian packages that are installed (``bible-kjv-text``: source ``kjv``;
    ``r-cran-janeaustenr``: source ``austen``), none when neither is. See :mod:`longkit.train.books`."""
    docs = []
    if books.kjv_installed():
        docs += books.kjv_documents()
    if books.austen_installed():
        docs += books.austen_documents()
    return docs


def default_corpus(*, max_chars: int | None = None) -> list[Document]:
    """The offline corpus that needs nothing downloaded: stdlib code per package plus the pydoc topics, and the
    books of ``bible-kjv-text`` / ``r-cran-janeaustenr`` when those Debian packages are installed.
    ``max_chars`` truncates each document (quick experiments)."""
    docs = stdlib_documents(max_chars=max_chars) + [
        Document(d.text[:max_chars] if max_chars else d.text, d.source, d.origin)
        for d in pydoc_documents() + book_documents()]
    if not docs:
        raise DataError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']} "
                        f"(Python {sys.version.split()[0]})")
    return docs


def _kv_retrieval(*, tokenizer: Any, row_length: int | None, **params: str) -> list[Document]:
    from longkit.train import kv_retrieval

    return kv_retrieval.from_params(tokenizer, row_length, params)


@dataclass(frozen=True)
class NamedSource:
    """A built-in ``--data`` source: ``load(tokenizer=..., row_length=..., **params)`` gives its documents;
    ``params`` names the parameters it takes (besides ``share``, which every source takes)."""

    load: Callable[..., list[Document]]
    params: tuple[str, ...] = ()


#: Built-in sources by name, for ``--data NAME``: the offline corpora (e.g. train on code only and keep the
#: documentation topics, the evaluation's default haystack and perplexity text, held out; ``kjv`` and ``austen``
#: need their Debian packages, a DataError names the package when it is not installed) and the generated
#: ``kv-retrieval`` (:mod:`longkit.train.kv_retrieval`).
NAMED_SOURCES = {
    "python-stdlib": NamedSource(lambda **_: stdlib_documents()),
    "python-docs": NamedSource(lambda **_: pydoc_documents()),
    "kjv": NamedSource(lambda **_: books.kjv_documents()),
    "austen": NamedSource(lambda **_: books.austen_documents()),
    "kv-retrieval": NamedSource(_kv_retrieval, ("length", "count", "seed")),
}


# ------------------------------------------------------------------------------------- answer-only documents


def _chat_text(tokenizer: Any, messages: list[dict[str, str]], where: str, **kwargs: Any) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - jinja and the tokenizer raise many types for a template that fails
        raise DataError(f"{where}: the tokenizer's chat template fails on this row "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the tokenizer's chat template did not render text (got {type(text).__name__})")
    return text


def render_chat(messages: Any, tokenizer: Any, *, where: str = "chat") -> tuple[str, tuple[tuple[int, int], ...]]:
    """A chat as the model sees it: ``(text, spans)`` with ``text`` rendered by ``tokenizer``'s chat template and
    ``spans`` the character ranges of the assistant turns, each from the end of the prompt that the template would
    give for generating it (``add_generation_prompt=True`` on the turns before) to the end of the turn's own
    rendering, trailing whitespace left out: the model is trained on the answer and its end-of-turn token (where it
    must stop), not on the template's text around it, nor on the newline that follows the end-of-turn token.

    ``messages``: a non-empty list of ``{"role": str, "content": str}`` with at least one ``assistant`` turn. The
    template must render every prefix of the conversation as a prefix of the whole (ChatML templates such as
    SmolLM2's and Qwen2's do); one that does not is refused rather than guessed at."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a chat row needs a tokenizer with a chat template; this one has none (use "
                        "'prompt'/'completion' rows instead)")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
                or not m["content"].strip()):
            raise DataError(f"{where}: messages[{i}] must be an object with a string 'role' and a non-empty string "
                            f"'content', got {m!r:.60}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no 'assistant' turn in 'messages': a chat row trains on the assistant's answers")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _chat_text(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        upto = _chat_text(tokenizer, messages[:i + 1], where)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation up to "
                            f"messages[{i}] as a prefix of the whole; cannot tell which tokens are the answer")
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, tuple(spans)


def prompt_completion(prompt: Any, completion: Any, *, where: str = "row") -> tuple[str, tuple[tuple[int, int], ...]]:
    """``(prompt + completion, spans)`` with the completion as the one trained span (it ends the document, so the
    EOS that follows it is trained too: the model learns to stop)."""
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.40}")
    return prompt + completion, ((len(prompt), len(prompt) + len(completion)),)


def tokenize_document(doc: Document, tokenizer: Any, eos: int) -> tuple[tuple[int, ...], tuple[bool, ...] | None]:
    """``(ids, mask)`` of one document: ``tokens + [eos]`` and, when the document has ``spans``, whether each token
    is trained (None otherwise).

    A document with spans is tokenised piece by piece, cut at the span boundaries (no special tokens added), so
    that no token straddles a boundary and the mask is exact for any tokenizer. It is also how the model meets a
    chat at inference: the prompt up to the assistant header is encoded, then the answer generated after it. The
    EOS is trained when the last span reaches the end of the text (a completion), not after a chat template's
    closing newline."""
    if doc.spans is None:
        return (*tokenizer(doc.text, add_special_tokens=False)["input_ids"], eos), None
    cuts: list[tuple[int, int, bool]] = []
    at = 0
    for start, end in doc.spans:
        cuts += [(at, start, False), (start, end, True)]
        at = end
    cuts.append((at, len(doc.text), False))
    cuts = [c for c in cuts if c[1] > c[0]]
    # one batched call: the pieces are tokenised independently either way
    pieces = tokenizer([doc.text[a:b] for a, b, _ in cuts], add_special_tokens=False)["input_ids"]
    ids = [i for piece in pieces for i in piece]
    mask = [trained for piece, (_, _, trained) in zip(pieces, cuts, strict=True) for _ in piece]
    return (*ids, eos), (*mask, doc.spans[-1][1] == len(doc.text))


# ---------------------------------------------------------------------------------------------- tokenising


def tokenize(docs: Iterable[Document], tokenizer: Any, *, eos_id: int | None = None) -> list[TokenizedDocument]:
    """``tokens + [eos]`` per document (no BOS: the EOS already marks the boundary for the model), with the loss
    mask of documents that have trained spans (:func:`tokenize_document`)."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise DataError("parameter 'eos_id': the tokenizer has no eos_token_id; pass eos_id")
    out = []
    for d in docs:
        ids, mask = tokenize_document(d, tokenizer, eos)
        out.append(TokenizedDocument(ids, d.source, d.origin, mask))
    if not out:
        raise DataError("parameter 'docs': no documents to tokenise")
    return out


# ---------------------------------------------------------------------------------------------- statistics


def _bin(n: int) -> str:
    """Power-of-two length bin, e.g. ``1024-2047``."""
    lo = 1 << max(0, n.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


@dataclass
class DataStats:
    """Token counts per source, documents, split documents, a length histogram, and packing efficiency."""

    length: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(Counter))
    histogram: Counter = field(default_factory=Counter)
    split_documents: int = 0
    split_chunks: int = 0
    sequences: int = 0
    pad_tokens: int = 0
    #: Rows with no token to predict (an answer-only document split so that a row holds only its prompt): they
    #: weigh zero in the loss (the training loop gives them a zero loss, not 0/0).
    rows_without_targets: int = 0
    #: The token shares asked for per source (``--data NAME:share=F``), shown beside the shares drawn.
    shares: dict[str, float] = field(default_factory=dict)

    def count_corpus(self, docs: Sequence[TokenizedDocument]) -> None:
        for d in docs:
            s = self.sources[d.source]
            s["documents"] += 1
            s["tokens"] += len(d.ids)
            self.histogram[_bin(len(d.ids))] += 1

    def count_sampled(self, docs: Sequence[TokenizedDocument]) -> None:
        for d in docs:
            s = self.sources[d.source]
            s["sampled_documents"] += 1
            s["sampled_tokens"] += len(d.ids)
            # tokens with a loss (all of them but for answer-only documents; before the per-document first token)
            s["sampled_trained_tokens"] += d.trained_tokens()

    def stats(self) -> dict[str, Any]:
        total = self.sequences * self.length
        hist = sorted(self.histogram.items(), key=lambda kv: int(kv[0].split("-")[0]))
        sampled = sum(v["sampled_tokens"] for v in self.sources.values())
        sources = {k: dict(v) for k, v in sorted(self.sources.items())}
        for name, v in sources.items():
            if sampled:
                v["sampled_share"] = v.get("sampled_tokens", 0) / sampled
            if name in self.shares:
                v["requested_share"] = self.shares[name]
        return {
            "length": self.length,
            "sources": sources,
            "tokens": sum(v["tokens"] for v in self.sources.values()),
            "documents": sum(v["documents"] for v in self.sources.values()),
            "split_documents": self.split_documents,
            "split_chunks": self.split_chunks,
            "sequences": self.sequences,
            "pad_tokens": self.pad_tokens,
            "pad_fraction": self.pad_tokens / total if total else 0.0,
            "rows_without_targets": self.rows_without_targets,
            "length_histogram": dict(hist),
        }

    def format(self) -> str:
        s = self.stats()
        lines = [f"{s['documents']} documents, {s['tokens']} tokens -> {s['sequences']} sequences of {s['length']} "
                 f"({s['pad_fraction']:.1%} padding); {s['split_documents']} documents longer than {s['length']} "
                 f"split into {s['split_chunks']} chunks (counted after sampling)"]
        if s["rows_without_targets"]:
            lines.append(f"  {s['rows_without_targets']} of {s['sequences']} sequences have no token to predict (an "
                         "answer-only document split across rows): they weigh zero in the loss")
        for name, v in s["sources"].items():
            asked = f", asked {v['requested_share']:.1%}" if "requested_share" in v else ""
            trained = (f", {v['sampled_trained_tokens']} with a loss"
                       if v.get("sampled_trained_tokens", 0) != v.get("sampled_tokens", 0) else "")
            lines.append(f"  {name}: {v.get('documents', 0)} docs, {v.get('tokens', 0)} tokens; sampled "
                         f"{v.get('sampled_documents', 0)} docs, {v.get('sampled_tokens', 0)} tokens "
                         f"({v.get('sampled_share', 0.0):.1%} of the sample{asked}){trained}")
        lines.append("  length histogram (tokens: documents): " +
                     ", ".join(f"{k}: {n}" for k, n in s["length_histogram"].items()))
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.stats(), indent=2) + "\n", encoding="utf-8")
        return p


# ------------------------------------------------------------------------------------------------ sampling


def check_shares(shares: Mapping[str, float], names: Iterable[str]) -> None:
    """Refuse token shares that cannot be met: each in (0, 1], for sources that exist, summing to at most 1, and to
    exactly 1 when every source has one (else below 1, so that the others get tokens)."""
    names = sorted(set(names))
    for name, share in shares.items():
        if name not in names:
            raise DataError(f"parameter 'share': no source {name!r} in the data (sources: {', '.join(names)})")
        if not 0.0 < share <= 1.0:
            raise DataError(f"parameter 'share' of source {name!r} must be in (0, 1], got {share}")
    total = sum(shares.values())
    rest = [n for n in names if n not in shares]
    if rest and total >= 1.0 - 1e-9:
        raise DataError(f"parameter 'share': the shares sum to {total:g}, which leaves no tokens for "
                        f"{', '.join(rest)}; give shares that sum to less than 1")
    if not rest and abs(total - 1.0) > 1e-6:
        raise DataError(f"parameter 'share': every source has a share and they sum to {total:g}; they must sum to 1 "
                        "(or leave a source without a share to take the rest)")


def _prefix(doc: TokenizedDocument, n: int) -> TokenizedDocument:
    """The first ``n`` tokens of ``doc`` (no loss mask: every token trained), under the same source and origin."""
    return TokenizedDocument(doc.ids[:n], doc.source, doc.origin)


def upsample_long(docs: Sequence[TokenizedDocument], *, total_tokens: int, long_threshold: int,
                  long_share: float, seed: int = 0,
                  shares: Mapping[str, float] | None = None) -> list[TokenizedDocument]:
    """Per-source length upsampling (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
    Context"): each source keeps its share of the corpus's tokens, and within each source documents of at least
    ``long_threshold`` tokens make up ``long_share`` of its tokens (or their original share if that is higher),
    the rest short documents: a mixture of short and long. Documents are drawn without replacement from a seeded
    shuffle of each pool, reshuffled when a pool runs out (so small pools repeat). Deterministic given ``seed``.

    ``shares``: source name -> fraction of ``total_tokens`` drawn from it (e.g. 30% synthetic retrieval), instead
    of its corpus share; the sources without one split the rest in proportion to their tokens
    (:func:`check_shares` says what is valid). A source's budget is met to the token: the document that would
    overshoot it is cut to its first tokens (a 220K-token novel must not fill a 61K-token share); answer-only
    documents (with a loss mask) are taken whole, so their budget is met to within one of them."""
    if total_tokens < 1:
        raise DataError(f"parameter 'total_tokens' must be >= 1, got {total_tokens}")
    if long_threshold < 1:
        raise DataError(f"parameter 'long_threshold' must be >= 1, got {long_threshold}")
    if not 0.0 <= long_share <= 1.0 or math.isnan(long_share):
        raise DataError(f"parameter 'long_share' must be in [0, 1], got {long_share}")
    if not docs:
        raise DataError("parameter 'docs': no documents to sample from")
    rng = random.Random(seed)
    by_source: dict[str, list[TokenizedDocument]] = defaultdict(list)
    for d in docs:
        by_source[d.source].append(d)
    shares = dict(shares or {})
    check_shares(shares, by_source)
    # the sources without a share split what the shares leave, in proportion to their tokens
    rest_tokens = sum(len(d.ids) for d in docs if d.source not in shares)
    rest_budget = total_tokens * (1.0 - sum(shares.values())) if shares else total_tokens
    out: list[TokenizedDocument] = []
    for name in sorted(by_source):
        pool = by_source[name]
        if name in shares:
            budget = total_tokens * shares[name]
        else:
            budget = rest_budget * sum(len(d.ids) for d in pool) / rest_tokens
        long = [d for d in pool if len(d.ids) >= long_threshold]
        short = [d for d in pool if len(d.ids) < long_threshold]
        original = sum(len(d.ids) for d in long) / sum(len(d.ids) for d in pool)
        share = max(long_share, original) if long else 0.0
        if not short:
            share = 1.0
        for group, group_budget in ((long, budget * share), (short, budget * (1.0 - share))):
            taken, order = 0, []
            while group and taken < group_budget:
                if not order:
                    order = list(group)
                    rng.shuffle(order)
                d = order.pop()
                left = math.ceil(group_budget - taken)
                if left < len(d.ids) and d.mask is None:  # an answer-only document is taken whole: cut, it
                    d = _prefix(d, max(left, 2))          # would lose its answer (its trained tokens)
                out.append(d)
                taken += len(d.ids)
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """Packed rows of exactly ``length`` tokens. ``doc_ids`` numbers the documents within a row (padding -1);
    it is for inspection and masks, not a model input. Index it for one example, or use :meth:`batches`."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    stats: DataStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k)[i] for k in ("input_ids", "labels", "position_ids", "doc_ids")}

    def batches(self, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise DataError(f"parameter 'batch_size' must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield {k: getattr(self, k)[i:i + batch_size] for k in ("input_ids", "labels", "position_ids", "doc_ids")}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments for a Hugging Face causal LM: ids, labels and the restarting position ids, with no
    ``attention_mask`` and ``use_cache=False`` so that transformers detects the packed documents (see module doc)."""
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"],
            "use_cache": False}


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean mask, True where a query may attend: causal and within its document (padding
    attends within the padding block). The explicit form of what transformers derives from the position ids."""
    if doc_ids.ndim == 1:
        doc_ids = doc_ids.unsqueeze(0)
    n = doc_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal).unsqueeze(1)


def _pieces(docs: Sequence[TokenizedDocument], length: int,
            stats: DataStats) -> list[tuple[tuple[int, ...], tuple[bool, ...] | None]]:
    """``(ids, mask)`` per attention document: the documents, those longer than ``length`` split into chunks."""
    pieces = []
    for d in docs:
        if len(d.ids) > length:
            # Split, and count it: a chunk is its own attention document, so the model never sees the whole.
            starts = range(0, len(d.ids), length)
            stats.split_documents += 1
            stats.split_chunks += len(starts)
            stats.sources[d.source]["split_documents"] += 1
            pieces.extend((d.ids[i:i + length], None if d.mask is None else d.mask[i:i + length]) for i in starts)
        else:
            pieces.append((d.ids, d.mask))
    return pieces


def pack(docs: Sequence[TokenizedDocument], length: int, *, pad_id: int, max_open: int = 256,
         stats: DataStats | None = None) -> Packed:
    """First-fit packing of whole documents (split first if longer than ``length``) into rows of exactly
    ``length`` tokens, in the given order; at most ``max_open`` partly filled rows are kept open (the oldest is
    closed when more are needed), which bounds the work per document. A document's loss mask (answer-only
    documents) sets the labels of its untrained tokens to -100, besides its first token's."""
    if length < 2:
        raise DataError(f"parameter 'length' must be >= 2, got {length}")
    if max_open < 1:
        raise DataError(f"parameter 'max_open' must be >= 1, got {max_open}")
    if not docs:
        raise DataError("parameter 'docs': no documents to pack")
    stats = stats if stats is not None else DataStats()
    stats.length = length
    rows: list[list[tuple[tuple[int, ...], tuple[bool, ...] | None]]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for piece in _pieces(docs, length, stats):
        k = len(piece[0])
        target = next((r for r in open_rows if free[r] >= k), None)
        if target is None:
            rows.append([])
            free.append(length)
            target = len(rows) - 1
            open_rows.append(target)
            if len(open_rows) > max_open:
                open_rows.pop(0)
        rows[target].append(piece)
        free[target] -= k
        if free[target] == 0:
            open_rows.remove(target)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    doc_ids = torch.full((n, length), -1, dtype=torch.long)
    for r, pieces in enumerate(rows):
        at = 0
        for j, (piece, mask) in enumerate(pieces):
            k = len(piece)
            ids = torch.tensor(piece, dtype=torch.long)
            input_ids[r, at:at + k] = ids
            target = ids[1:]
            if mask is not None:
                target = target.masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), -100)
            labels[r, at + 1:at + k] = target
            position_ids[r, at:at + k] = torch.arange(k)
            doc_ids[r, at:at + k] = j
            at += k
        position_ids[r, at:] = torch.arange(length - at)
        stats.pad_tokens += length - at
    stats.sequences = n
    stats.rows_without_targets = int(((labels != -100).sum(-1) == 0).sum())
    return Packed(input_ids, labels, position_ids, doc_ids, stats)


def build(docs: Sequence[Document], tokenizer: Any, length: int, *, total_tokens: int | None = None,
          long_threshold: int | None = None, long_share: float = 0.5, seed: int = 0,
          shares: Mapping[str, float] | None = None, stats_path: str | Path | None = None,
          verbose: bool = False) -> Packed:
    """Tokenise, upsample long documents per source when ``total_tokens`` is given (``long_threshold`` defaults
    to half the pack length; ``shares`` gives sources a fixed fraction of the tokens), shuffle with ``seed``, pack,
    and record the statistics (written as JSON to ``stats_path`` and printed when ``verbose``)."""
    if shares and total_tokens is None:
        raise DataError("parameter 'share': token shares apply to sampled training data (total_tokens); this data "
                        "is packed whole (held-out data takes no share)")
    tokenized = tokenize(docs, tokenizer)
    stats = DataStats(shares=dict(shares or {}))
    stats.count_corpus(tokenized)
    if total_tokens is not None:
        sampled = upsample_long(tokenized, total_tokens=total_tokens, long_threshold=long_threshold or length // 2,
                                long_share=long_share, seed=seed, shares=shares)
    else:
        sampled = list(tokenized)
        random.Random(seed).shuffle(sampled)
    stats.count_sampled(sampled)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = pack(sampled, length, pad_id=pad, stats=stats)
    if stats_path is not None:
        stats.write(stats_path)
    if verbose:
        print(stats.format())
    return packed


__all__ = [
    "NAMED_SOURCES",
    "DataStats",
    "Document",
    "NamedSource",
    "Packed",
    "SourceSpec",
    "TokenizedDocument",
    "block_causal_mask",
    "book_documents",
    "build",
    "check_shares",
    "default_corpus",
    "model_inputs",
    "pack",
    "parse_source",
    "prompt_completion",
    "pydoc_documents",
    "read_jsonl",
    "read_parquet",
    "read_source",
    "read_sources",
    "read_text_dir",
    "render_chat",
    "stdlib_documents",
    "tokenize",
    "tokenize_document",
    "upsample_long",
]
