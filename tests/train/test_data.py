"""Long data: readers, the offline corpus, packing with per-document attention, length upsampling, statistics."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from longkit.errors import DataError
from longkit.train import data as D

PAD = 258


def _docs(lengths, source="s", start=0):
    g = torch.Generator().manual_seed(start)
    return [D.TokenizedDocument(tuple(torch.randint(0, 256, (n,), generator=g).tolist()), source, f"{source}{i}")
            for i, n in enumerate(lengths)]


def _sum_loss(logits, labels):
    # Sum (not mean) so that a packed row's loss is comparable with the documents' losses added up.
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def test_packed_rows_give_each_documents_own_loss_and_gradients(tiny_llama):
    model = copy.deepcopy(tiny_llama.model).train()
    docs = _docs([9, 14, 5, 20, 3, 11])
    packed = D.pack(docs, 32, pad_id=PAD)
    assert len(packed) > 1 and packed.input_ids.shape[1] == 32
    assert (packed.doc_ids.max(dim=1).values >= 1).all(), "every row should hold several documents"

    model.zero_grad()
    out = model(**D.model_inputs(packed[:]))
    packed_loss = _sum_loss(out.logits, packed.labels)
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    alone_loss = 0.0
    for d in docs:
        ids = torch.tensor([d.ids])
        loss = _sum_loss(model(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        alone_loss = alone_loss + loss.detach()
    torch.testing.assert_close(packed_loss.detach(), alone_loss, atol=1e-5, rtol=1e-5)
    for pg, p in zip(packed_grads, model.parameters(), strict=True):
        torch.testing.assert_close(pg, p.grad, atol=1e-5, rtol=1e-5)
    # The mean loss transformers computes from ``labels`` counts exactly the documents' own predictions.
    n_pred = sum(len(d.ids) - 1 for d in docs)
    torch.testing.assert_close(out.loss.detach(), alone_loss / n_pred, atol=1e-5, rtol=1e-5)


def test_no_attention_across_documents(tiny_llama):
    """Changing the first document must not change the second's logits; with a cache (the default use_cache of
    Llama configs) transformers skips packed detection and the second document does see the first."""
    a, b = _docs([10, 12])
    b_alone = tiny_llama.model(input_ids=torch.tensor([b.ids]), use_cache=False).logits
    for first in (a, _docs([10], start=7)[0]):
        packed = D.pack([first, b], 32, pad_id=PAD)
        assert packed.input_ids.shape[0] == 1
        with torch.no_grad():
            logits = tiny_llama.model(**D.model_inputs(packed[:])).logits
        torch.testing.assert_close(logits[0, 10:22], b_alone[0].detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        leaky = tiny_llama.model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
    assert (leaky[0, 10:22] - b_alone[0]).abs().max() > 1e-3


def test_position_ids_restart_and_labels_mask_boundaries():
    packed = D.pack(_docs([4, 3]), 10, pad_id=PAD)
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert packed.doc_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1, -1]
    labels = packed.labels[0].tolist()
    assert labels[0] == labels[4] == -100 and labels[7:] == [-100] * 3
    assert labels[1:4] == packed.input_ids[0, 1:4].tolist() and labels[5:7] == packed.input_ids[0, 5:7].tolist()
    mask = D.block_causal_mask(packed.doc_ids)[0, 0]
    assert mask[5, 4] and not mask[5, 3] and not mask[3, 5] and not mask[7, 6]


def test_every_row_is_exactly_length_and_documents_stay_whole():
    docs = _docs([7, 3, 9, 2, 5, 8, 1, 6])
    packed = D.pack(docs, 12, pad_id=PAD)
    assert packed.input_ids.shape == (len(packed), 12)
    found = Counter()
    for r in range(len(packed)):
        for j in range(int(packed.doc_ids[r].max()) + 1):
            found[tuple(packed.input_ids[r][packed.doc_ids[r] == j].tolist())] += 1
    assert found == Counter(d.ids for d in docs)
    assert packed.stats.pad_tokens == 12 * len(packed) - sum(len(d.ids) for d in docs)


def test_overlong_document_is_split_and_counted():
    docs = _docs([25, 4])
    packed = D.pack(docs, 10, pad_id=PAD)
    s = packed.stats.stats()
    assert s["split_documents"] == 1 and s["split_chunks"] == 3 and s["sources"]["s"]["split_documents"] == 1
    # chunks of 10, 10, 5 (+ the 4-token document): positions restart at each chunk
    flat = packed.input_ids[packed.doc_ids >= 0].tolist()
    assert sorted(flat) == sorted(docs[0].ids + docs[1].ids)
    assert int(packed.position_ids.max()) == 9


def test_upsampling_keeps_the_source_mix_and_raises_the_long_share():
    code = _docs([40] * 4 + [5] * 80, source="code")  # 160 long, 400 short tokens
    books = _docs([60] * 2 + [6] * 20, source="books", start=1)  # 120 long, 120 short tokens
    docs = code + books
    out = D.upsample_long(docs, total_tokens=8000, long_threshold=30, long_share=0.7, seed=3)
    assert out == D.upsample_long(docs, total_tokens=8000, long_threshold=30, long_share=0.7, seed=3)
    tokens = Counter()
    long_tokens = Counter()
    for d in out:
        tokens[d.source] += len(d.ids)
        long_tokens[d.source] += len(d.ids) * (len(d.ids) >= 30)
    total = sum(tokens.values())
    assert abs(tokens["code"] / total - 560 / 800) < 0.02 and abs(tokens["books"] / total - 240 / 800) < 0.02
    for src, before in (("code", 160 / 560), ("books", 120 / 240)):
        share = long_tokens[src] / tokens[src]
        assert before < 0.7 and abs(share - 0.7) < 0.03, (src, share)


def test_jsonl_and_text_dir_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    docs = D.read_source(tmp_path / "a.jsonl")
    assert [d.text for d in docs] == ["one", "two"] and docs[1].origin.endswith("a.jsonl:3")
    (tmp_path / "books" / "sub").mkdir(parents=True)
    (tmp_path / "books" / "x.txt").write_text("first book", encoding="utf-8")
    (tmp_path / "books" / "sub" / "y.md").write_text("second", encoding="utf-8")
    (tmp_path / "books" / "skip.bin").write_bytes(b"\x00\x01")
    docs = D.read_source(tmp_path / "books")
    assert [d.text for d in docs] == ["second", "first book"] and {d.source for d in docs} == {"books"}


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken"\n', "a.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2: no 'text' field (fields: body)"),
    ('{"text": ""}\n', "a.jsonl:1: field 'text' must be a non-empty string"),
    ('["text"]\n', "a.jsonl:1: expected a JSON object"),
    ("\n\n", "a.jsonl: empty JSONL file"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.read_jsonl(tmp_path / "a.jsonl")


def test_bad_text_sources(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not UTF-8"):
        D.read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no text files"):
        D.read_text_dir(tmp_path / "d")
    (tmp_path / "d" / "e.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="e.txt: empty text file"):
        D.read_text_dir(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        D.read_source(tmp_path / "missing.jsonl.gz")
    with pytest.raises(DataError, match="parameter 'length' must be >= 2"):
        D.pack(_docs([3]), 1, pad_id=PAD)
    with pytest.raises(DataError, match="parameter 'long_share' must be in"):
        D.upsample_long(_docs([3]), total_tokens=10, long_threshold=2, long_share=1.5)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None or importlib.util.find_spec("pyarrow") is not None,
                    reason="a parquet reader is installed")
def test_parquet_without_the_train_extra_names_it(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"pip install 'longkit\[train\]'"):
        D.read_source(tmp_path / "p.parquet")


def test_default_corpus_and_stats_file(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGKIT_BOOKS_ROOT", str(tmp_path))  # no Debian books here (tests/train/test_books.py)
    docs = D.default_corpus(max_chars=300)
    sources = Counter(d.source for d in docs)
    assert sources["python-stdlib"] > 50 and sources["python-docs"] > 30
    assert any(d.origin.endswith("json") and d.text.startswith("# file: json/__init__.py") for d in docs)
    packed = D.build(docs, tiny_llama.tokenizer, 256, total_tokens=20_000, long_threshold=200, long_share=0.5,
                     stats_path=tmp_path / "stats.json", verbose=True)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved == json.loads(json.dumps(packed.stats.stats()))
    assert saved["documents"] == len(docs) and set(saved["sources"]) == {"python-stdlib", "python-docs"}
    assert sum(saved["length_histogram"].values()) == len(docs)
    assert saved["split_documents"] > 0  # 300 characters are more than 256 byte tokens
    assert "python-docs:" in capsys.readouterr().out


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha doc", "beta doc"], "id": [1, 2]}), tmp_path / "p.parquet")
    docs = D.read_source(tmp_path / "p.parquet")
    assert [(d.text, d.source) for d in docs] == [("alpha doc", "p"), ("beta doc", "p")]
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="n.parquet: row 1: column 'text' must be a non-empty string"):
        D.read_source(tmp_path / "n.parquet")


def test_named_sources_pick_one_builtin_corpus(tmp_path, monkeypatch):
    # `--data python-stdlib` trains on code only, keeping the docs topics (the eval haystack) held out
    monkeypatch.setenv("LONGKIT_BOOKS_ROOT", str(tmp_path))  # no books: the default corpus is code + docs
    stdlib = D.read_source("python-stdlib")
    docs = D.read_source("python-docs")
    assert {d.source for d in stdlib} == {"python-stdlib"} and {d.source for d in docs} == {"python-docs"}
    assert len(stdlib) + len(docs) == len(D.default_corpus())
    # a real path of that name wins over the built-in corpus
    monkeypatch.chdir(tmp_path)
    (tmp_path / "python-docs").mkdir()
    (tmp_path / "python-docs" / "a.txt").write_text("mine", encoding="utf-8")
    assert [d.text for d in D.read_source("python-docs")] == ["mine"]
    with pytest.raises(DataError, match="nor a built-in corpus .python-stdlib, python-docs."):
        D.read_source(tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None


def test_a_share_is_met_to_the_token_even_by_one_long_document():
    # one 5,000-token "novel" against a 300-token share: the novel is cut to its first 300 tokens (whole, it would
    # make 5/6 of the data); an answer-only document is never cut (its answer is at its end)
    novel = D.TokenizedDocument(tuple(range(1, 5001)), "book", "novel")
    chat = D.TokenizedDocument(tuple(range(1, 501)), "chat", "c", tuple(i >= 490 for i in range(500)))
    code = _docs([50] * 40, source="code", start=9000)
    out = D.upsample_long([novel, chat, *code], total_tokens=1000, long_threshold=30, long_share=0.5, seed=0,
                          shares={"book": 0.3, "chat": 0.1})
    book = [d for d in out if d.source == "book"]
    assert sum(len(d.ids) for d in book) == 300 and book[0].ids == novel.ids[:300]
    assert [d for d in out if d.source == "chat"] == [chat]
    assert sum(len(d.ids) for d in out if d.source == "code") == 600
