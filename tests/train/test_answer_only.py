"""Answer-only loss through the data pipeline: chat rows (loss on the assistant turns), prompt/completion rows (loss
on the completion), the mask kept through tokenising, splitting, packing and PoSE."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import longkit
from longkit.errors import DataError, MethodError
from longkit.train import create_recipe
from longkit.train import data as D
from longkit.train.pose import pose_sample

IGNORE = -100
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}]


@pytest.fixture(scope="module")
def tok():
    return longkit.models.byte_tokenizer()


def _id(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _chat_doc(tok, messages=CHAT):
    text, spans = D.render_chat(messages, tok)
    return D.Document(text, "chat", "test", spans)


def _expected_chat_labels(tok):
    # "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" is 21 byte/special tokens, then the answer "OK",
    # its end-of-turn token, the template's newline and the packer's EOS: only O, K and <|im_end|> are targets.
    return [IGNORE] * 21 + [_id(tok, "O"), _id(tok, "K"), _id(tok, "<|im_end|>")] + [IGNORE, IGNORE]


def _expected_pc_labels(tok):
    # "Q: 2+2?\nA:" is 10 tokens; the completion " 4" and the EOS after it are trained (it ends the document)
    return [IGNORE] * 10 + [_id(tok, " "), _id(tok, "4"), tok.eos_token_id]


def test_chat_row_trains_the_assistant_turn_and_its_end_token_only(tok):
    doc = _chat_doc(tok)
    assert doc.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nOK<|im_end|>\n"
    assert [doc.text[a:b] for a, b in doc.spans] == ["OK<|im_end|>"]
    packed = D.pack(D.tokenize([doc], tok), 26, pad_id=tok.pad_token_id)
    assert packed.input_ids.shape == (1, 26) and packed.stats.pad_tokens == 0
    assert packed.labels[0].tolist() == _expected_chat_labels(tok)


def test_prompt_completion_row_trains_the_completion_and_eos(tok):
    text, spans = D.prompt_completion("Q: 2+2?\nA:", " 4")
    packed = D.pack(D.tokenize([D.Document(text, "pc", "t", spans)], tok), 13, pad_id=tok.pad_token_id)
    assert packed.labels[0].tolist() == _expected_pc_labels(tok)


def test_multi_turn_chat_has_one_span_per_assistant_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a?"},
                {"role": "assistant", "content": "A."}, {"role": "user", "content": "b?"},
                {"role": "assistant", "content": "B."}]
    doc = _chat_doc(tok, messages)
    assert [doc.text[a:b] for a, b in doc.spans] == ["A.<|im_end|>", "B.<|im_end|>"]
    ids, mask = D.tokenize_document(doc, tok, tok.eos_token_id)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "A.<|im_end|>B.<|im_end|>"
    # the pieces are tokenised apart, and a byte tokenizer gives the same ids as the whole text
    assert list(ids[:-1]) == tok(doc.text, add_special_tokens=False)["input_ids"]


def _sum_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


def test_packing_two_answer_only_documents_keeps_each_ones_labels_and_loss(tok, tiny_llama):
    text, spans = D.prompt_completion("Q: 2+2?\nA:", " 4")
    docs = D.tokenize([_chat_doc(tok), D.Document(text, "pc", "t", spans)], tok)
    packed = D.pack(docs, 48, pad_id=tok.pad_token_id)
    assert packed.input_ids.shape == (1, 48) and packed.doc_ids[0].tolist() == [0] * 26 + [1] * 13 + [-1] * 9
    assert packed.labels[0].tolist() == _expected_chat_labels(tok) + _expected_pc_labels(tok) + [IGNORE] * 9
    # the packed row's loss is the sum of each document's own answer-only loss
    model = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        row = _sum_loss(model(**D.model_inputs(packed[:])).logits, packed.labels)
        alone = 0.0
        for d in docs:
            one = D.pack([d], len(d.ids), pad_id=tok.pad_token_id)
            alone += _sum_loss(model(input_ids=one.input_ids, use_cache=False).logits, one.labels)
    torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_split_document_keeps_the_mask_of_each_chunk(tok):
    doc = D.tokenize([_chat_doc(tok)], tok)[0]
    packed = D.pack([doc], 22, pad_id=tok.pad_token_id)
    assert packed.stats.split_chunks == 2
    flat_labels = packed.labels[packed.doc_ids >= 0].tolist()
    expected = _expected_chat_labels(tok)
    # the cut falls inside the answer ("O" | "K"): the second chunk's first token loses its label (no prediction
    # across the cut); every other token keeps its mask
    expected[22] = IGNORE
    assert flat_labels == expected and expected[21] != IGNORE and expected[23] != IGNORE


def test_pose_window_takes_tokens_and_mask_together():
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=g)[:100] + 1000
    mask = torch.rand(100, generator=g) > 0.5
    for seed in range(20):
        s = pose_sample(100, 32, 256, rng=seed)
        got_ids, got_mask = s.take(ids, mask)
        assert got_ids.tolist() == ids[s.token_index].tolist()
        # every selected token carries its own mask entry (ids are distinct: find each one's place)
        place = {int(t): i for i, t in enumerate(ids)}
        assert got_mask.tolist() == [bool(mask[place[int(t)]]) for t in got_ids]
    with pytest.raises(MethodError, match="shorter than the sampled document"):
        s.take(ids[:10])


def test_pose_transform_keeps_answer_only_labels_on_their_tokens(tok):
    recipe = create_recipe("pose:window=64")
    recipe.train_length(1024)
    text, spans = D.prompt_completion("Q: 2+2?\nA:", " 4")
    docs = D.tokenize([_chat_doc(tok), D.Document(text, "pc", "t", spans)], tok)
    packed = D.pack(docs, 64, pad_id=tok.pad_token_id)
    row = {k: packed[0][k] for k in ("input_ids", "labels", "position_ids")}
    for i in range(10):
        got = recipe.transform(row, i, seed=3)
        assert torch.equal(got["input_ids"], row["input_ids"]) and torch.equal(got["labels"], row["labels"])
        # both documents have a target, so both get skip-wise positions; the padding keeps its own
        assert got["position_ids"][39:].tolist() == list(range(25))
    assert any(int(recipe.transform(row, i, seed=3)["position_ids"][:39].max()) > 64 for i in range(10))


def test_jsonl_reader_takes_text_chat_and_prompt_completion_rows(tmp_path, tok):
    rows = [{"text": "plain"}, {"messages": CHAT}, {"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    docs = D.read_source(tmp_path / "mix.jsonl", tokenizer=tok)
    assert [d.spans for d in docs] == [None, _chat_doc(tok).spans, ((10, 12),)]
    assert docs[1].text == _chat_doc(tok).text and docs[2].text == "Q: 2+2?\nA: 4"
    packed = D.build(docs, tok, 64)
    stats = packed.stats.stats()["sources"]["mix"]
    # plain: 6 tokens, chat: 3 of 26, prompt/completion: 3 of 13
    assert stats["sampled_tokens"] == 6 + 26 + 13 and stats["sampled_trained_tokens"] == 6 + 3 + 3
    with pytest.raises(DataError, match=r"mix.jsonl:2: a chat row .'messages'. is rendered with the model's chat "
                                        "template; pass the tokenizer"):
        D.read_source(tmp_path / "mix.jsonl")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' turn"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\] must be an object"),
    ({"prompt": "Q"}, "field 'completion' must be a non-empty string"),
    ({"prompt": "", "completion": "A"}, "field 'prompt' must be a non-empty string"),
    ({"body": "x"}, "no 'text' field .fields: body.; set text_field, or give chat rows"),
])
def test_bad_answer_only_rows_name_file_and_line(tmp_path, tok, row, message):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="a.jsonl:2: " + message):
        D.read_jsonl(tmp_path / "a.jsonl", tokenizer=tok)


def test_chat_rows_need_a_chat_template_and_spans_are_checked(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        D.render_chat(CHAT, plain)
    with pytest.raises(DataError, match="parameter 'spans' must be sorted, non-overlapping"):
        D.Document("abc", "s", "o", ((1, 2), (0, 3)))
    with pytest.raises(DataError, match="parameter 'spans' must be sorted"):
        D.Document("abc", "s", "o", ((1, 4),))
