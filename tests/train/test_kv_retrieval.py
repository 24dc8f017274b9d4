"""Synthetic key-value retrieval (Xiong et al. 2024): deterministic documents sized to a token budget, the answer
in the context exactly once, loss on the answer only, no evaluation wording; the named source and token shares."""

from __future__ import annotations

import re

import pytest

import longkit
from longkit.errors import DataError
from longkit.eval.ruler import templates as ruler
from longkit.eval.tasks import needle, passkey
from longkit.train import data as D
from longkit.train import kv_retrieval as K

LENGTH = 700


@pytest.fixture(scope="module")
def tok():
    return longkit.models.byte_tokenizer()


@pytest.fixture(scope="module")
def samples(tok):
    return K.kv_samples(tok, LENGTH, 6, seed=0)


def _count(number, text):
    # as a whole number: 765 inside 17652 is another number
    return len(re.findall(rf"(?<!\d){number}(?!\d)", text))


def test_same_seed_same_documents_other_seed_others(tok, samples):
    again = K.kv_samples(tok, LENGTH, 6, seed=0)
    assert [s.document for s in again] == [s.document for s in samples]
    # document i depends on (seed, i) only: a smaller count gives the first ones
    assert [s.document for s in K.kv_samples(tok, LENGTH, 2, seed=0)] == [s.document for s in samples[:2]]
    other = K.kv_samples(tok, LENGTH, 6, seed=1)
    assert not {s.document.text for s in other} & {s.document.text for s in samples}
    assert len({s.document.text for s in samples}) == 6


def test_answer_is_in_the_context_exactly_once(samples):
    for s in samples:
        prompt, answer = s.messages[0]["content"], s.messages[1]["content"]
        context = prompt.split("\n\n")[1]
        lines = context.split("\n")
        assert len(lines) == s.n_dicts >= 2 and [ln.split("]")[0] for ln in lines] == [
            f"Dictionary [{i}" for i in range(1, s.n_dicts + 1)]
        assert _count(s.value, prompt) == 1 and _count(s.key, context) == 1
        # the pair sits in the dictionary the answer names
        assert f"{s.key}: {s.value}" in lines[s.dictionary - 1]
        assert answer == f"The value of key {s.key} is {s.value} and it is in Dictionary [{s.dictionary}]."
        assert prompt.startswith(K.INSTRUCTION + "\n\n") and prompt.endswith(K.QUESTION.format(key=s.key))
        assert 100 <= s.key <= 9999 and 100 <= s.value <= 9999
    # the gold dictionary's place varies (uniform in the reference)
    assert len({s.dictionary for s in samples}) > 1


def test_documents_fill_the_token_budget_and_train_the_answer_only(tok, samples):
    docs = D.tokenize([s.document for s in samples], tok)
    for s, d in zip(samples, docs, strict=True):
        assert len(d.ids) == s.tokens
        # at most the budget, short of it by less than one more dictionary line (~60 byte tokens)
        assert LENGTH - 64 < s.tokens <= LENGTH, s.tokens
        trained = tok.decode([i for i, m in zip(d.ids, d.mask, strict=True) if m])
        assert trained == s.messages[1]["content"] + "<|im_end|>"
        assert s.document.source == "kv-retrieval" and s.document.text.startswith("<|im_start|>user\n")
    for length in (520, 1500):
        assert all(length - 64 < s.tokens <= length for s in K.kv_samples(tok, length, 3, seed=2))


def test_no_evaluation_task_wording(samples):
    evaluation = [passkey.INSTRUCTION, passkey.KEY_LINE, passkey.QUESTION, passkey.ANSWER_PREFIX, passkey.FILLER,
                  needle.INSTRUCTION, needle.NEEDLE, needle.QUESTION, needle.ANSWER_PREFIX,
                  ruler.FAMILIES["niah"].template, ruler.FAMILIES["niah"].answer_prefix, ruler.NEEDLE, ruler.NOISE]

    def trigrams(text):
        words = re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", text.lower()))
        return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}

    seen = set().union(*(trigrams(t) for t in evaluation))
    assert ("the", "pass", "key") in seen and ("special", "magic", "numbers") in seen  # the check can fail
    for s in samples:
        text = s.document.text
        assert not trigrams(text) & seen
        for phrase in ("pass key", "passkey", "magic number", "memorize", "quiz", "hidden"):
            assert phrase not in text.lower()


def test_without_a_chat_template_prompt_and_answer_join_as_a_completion(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    s = K.kv_samples(plain, LENGTH, 1)[0]
    assert s.document.text == s.messages[0]["content"] + "\n\n" + s.messages[1]["content"]
    assert s.document.spans == ((len(s.messages[0]["content"]) + 2, len(s.document.text)),)


def test_named_source_and_its_parameters(tok):
    docs = D.read_source("kv-retrieval", tokenizer=tok, row_length=LENGTH, params={"count": "3", "seed": "4"})
    assert docs == [s.document for s in K.kv_samples(tok, LENGTH, 3, seed=4)]
    shorter = D.read_source("kv-retrieval", tokenizer=tok, row_length=LENGTH, params={"count": "1", "length": "600"})
    assert len(D.tokenize(shorter, tok)[0].ids) <= 600
    spec = D.parse_source("kv-retrieval:length=600,count=3,share=0.25")
    assert spec == D.SourceSpec("kv-retrieval", 0.25, {"length": "600", "count": "3"})
    assert D.parse_source("python-stdlib") == D.SourceSpec("python-stdlib")


@pytest.mark.parametrize("params, message", [
    ({"lenght": "600"}, "source 'kv-retrieval' has no parameter 'lenght'; valid parameters: share, length, count, "
                        "seed"),
    ({"length": "900"}, "parameter 'length' = 900 must be at most the training row length 700"),
    ({"length": "100"}, "parameter 'length' = 100 is too small: the prompt with a single dictionary takes"),
    ({"count": "0"}, "parameter 'count' must be an int >= 1"),
    ({"count": "many"}, "parameter 'count' must be a whole number, got 'many'"),
    ({"seed": "-1"}, "parameter 'seed' must be an int >= 0"),
])
def test_bad_parameters_name_the_parameter(tok, params, message):
    with pytest.raises(DataError, match=re.escape(message)):
        D.read_source("kv-retrieval", tokenizer=tok, row_length=LENGTH, params=params)


@pytest.mark.parametrize("spec, message", [
    ("kv-retrieval:share=1.5", "parameter 'share' must be a number in (0, 1], got '1.5'"),
    ("kv-retrieval:share=0", "parameter 'share' must be a number in (0, 1], got '0'"),
    ("kv-retrieval:share=abc", "parameter 'share' must be a number in (0, 1], got 'abc'"),
    ("kv-retrieval:count=2,count=3", "parameter 'count' is given twice"),
    ("kv-retrieval:count=2,seed", "'seed' is not key=value"),
])
def test_bad_source_specs(spec, message):
    with pytest.raises(DataError, match=re.escape(message)):
        D.parse_source(spec)


def test_share_is_honoured_in_the_data_stats(tok, docs, tmp_path):
    """30% of the training tokens from kv-retrieval, the rest from the text directory (without a share the kv
    documents would take their corpus share, about 60%)."""
    got, shares = D.read_sources([str(docs), "kv-retrieval:count=8,share=0.3"], tokenizer=tok, row_length=LENGTH)
    assert shares == {"kv-retrieval": 0.3}
    total = 60 * LENGTH
    packed = D.build(got, tok, LENGTH, total_tokens=total, shares=shares, stats_path=tmp_path / "stats.json")
    stats = packed.stats.stats()["sources"]
    kv, text = stats["kv-retrieval"], stats[docs.name]
    drawn = kv["sampled_tokens"] + text["sampled_tokens"]
    # budgets are met to within one document
    assert abs(kv["sampled_tokens"] - 0.3 * total) <= LENGTH and abs(drawn - total) <= 2 * LENGTH
    assert abs(kv["sampled_share"] - 0.3) < 0.02 and kv["requested_share"] == 0.3
    assert "requested_share" not in text and abs(text["sampled_share"] - 0.7) < 0.02
    # the kv documents train their answers only; the text all its tokens
    assert kv["sampled_trained_tokens"] < kv["sampled_tokens"] / 10
    assert text["sampled_trained_tokens"] == text["sampled_tokens"]
    assert "asked 30.0%" in packed.stats.format()
    # without a share the same documents keep their corpus share
    corpus = kv["tokens"] / (kv["tokens"] + text["tokens"])
    plain = D.build(got, tok, LENGTH, total_tokens=total).stats.stats()["sources"]["kv-retrieval"]
    assert corpus > 0.5 and abs(plain["sampled_share"] - corpus) < 0.03


@pytest.mark.parametrize("shares, message", [
    ({"kv-retrieval": 0.5}, "every source has a share and they sum to 0.5; they must sum to 1"),
    ({"kv-retrieval": 0.6, "text": 0.6}, "every source has a share and they sum to 1.2"),
    ({"kv-retrieval": 1.0, "text": None}, "the shares sum to 1, which leaves no tokens for text"),
    ({"nope": 0.2, "text": None}, "no source 'nope' in the data"),
])
def test_bad_shares(shares, message):
    docs = [D.TokenizedDocument((1, 2, 3), name, name) for name in ("kv-retrieval", "text") if name in shares]
    given = {k: v for k, v in shares.items() if v is not None}
    with pytest.raises(DataError, match=re.escape(message)):
        D.upsample_long(docs, total_tokens=100, long_threshold=2, long_share=0.5, shares=given)
