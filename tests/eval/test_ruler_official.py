"""Differential tests against NVIDIA/RULER's own code (main, commit in the fixture's ``source``).

``tests/fixtures/ruler_official.json`` holds values computed by running RULER's generator scripts
(``scripts/data/synthetic/*.py``) and its metrics (``scripts/eval/evaluate.py``, ``scripts/eval/synthetic/
constants.py``) in a scratch environment, with a byte tokenizer shim (a token per UTF-8 byte, as longkit's
byte tokenizer counts text) and small fixed inputs: the words RULER drew, fake SQuAD / HotpotQA files, a stand-in
english_words.json, fuzzed predictions. Where RULER draws from its global random state, the draws are recorded and
fed to longkit's formatting; everything else is compared as it comes out.
"""

import json

import pytest

from conftest import FIXTURES
from longkit.errors import EvalError
from longkit.eval import ruler
from longkit.eval.metrics import postprocess_pred, ruler_score, string_match_all, string_match_part
from longkit.eval.ruler.common_words import CWEBuilder, CWEConfig, cwe_prompt
from longkit.eval.ruler.fit import Draft, Frame
from longkit.eval.ruler.freq_words import FWEBuilder, FWEConfig
from longkit.eval.ruler.qa import QABuilder, read_hotpotqa, read_squad
from longkit.eval.ruler.words import common_words
from longkit.models.tokenizer import byte_tokenizer

OFFICIAL = json.loads((FIXTURES / "ruler_official.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def rendered(tok, draft: Draft, chat: bool) -> str:
    """The whole prompt as the model sees it, decoded (the byte tokenizer round-trips text exactly)."""
    frame = Frame(tok, chat)
    examples = draft.examples if frame.turns else ()
    return tok.decode(frame.ids(frame.user_text(draft), draft.answer_prefix, examples), skip_special_tokens=False)


@pytest.mark.parametrize("case", ["plain_8192", "plain_2048", "chat_8192", "chat_2048"])
def test_cwe_prompt_equals_rulers(tok, case):
    ref = OFFICIAL["cwe"][case]
    chat = case.startswith("chat")
    text, examples, answer = cwe_prompt(
        ref["example_words"], ref["words"], CWEConfig(), ref["seed"], short=ref["max_seq_length"] < 4096
    )
    draft = Draft(text, ref["answer_prefix"], answer, {}, examples)
    assert answer == ref["outputs"]
    # RULER's record is input + answer_prefix; with its template the chat frame is part of the input. The
    # harness used a ChatML model template, which is the byte tokenizer's chat template.
    assert rendered(tok, draft, chat).removeprefix("<|bos|>") == ref["input"] + ref["answer_prefix"]


def test_cwe_chat_example_is_its_own_turn(tok):
    s = ruler.generate("cwe", tok, 8192, 1, chat=True)[0]
    text = tok.decode(ruler.RulerGenerator("cwe", tok, chat=True).input_ids(s))
    assert len(s["examples"]) == 1 and not s["input"].startswith(s["examples"][0][0])
    user, answer = s["examples"][0]
    assert answer.startswith(" Answer: The top 10 words that appear most often in the list are: 1. ")
    turn = "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n" + answer + "\n"
    assert text == turn + "<|im_start|>user\n" + s["input"] + "<|im_end|>\n<|im_start|>assistant\n" + s["answer_prefix"]
    plain = ruler.generate("cwe", tok, 8192, 1)[0]
    assert plain["examples"] == [] and plain["input"].startswith(user + answer + "\n")


def test_cwe_word_supply_follows_rulers_rule(tmp_path):
    ref = OFFICIAL["cwe"]["supply"]
    assert len(common_words()) == ref["wonderwords_size"]
    english = {str(i): f"zq{i:05d}" for i in range(ref["english_size"])}
    path = tmp_path / "english_words.json"
    path.write_text(json.dumps(english))
    b = CWEBuilder(CWEConfig(english_words=str(path)), "s", 42, 300_000)
    for n, source in ref["source_by_num_words"].items():
        drawn = b.build(int(n)).outputs
        assert (drawn[0].startswith("zq")) == (source == "english"), (n, source)
    assert b.max_size == ref["english_size"]
    bare = CWEBuilder(CWEConfig(), "s", 42, 300_000)
    assert bare.max_size == ref["wonderwords_size"]
    with pytest.raises(EvalError, match="english_words"):
        bare.build(ref["wonderwords_size"] + 1)


def test_cwe_past_wonderwords_fails_clearly_or_uses_the_english_list(tmp_path):
    """At ~256K tokens RULER's list outgrows wonderwords; longkit must not return a short prompt.

    A whitespace tokenizer (one token a word) keeps this fast: "1. word" is 2 tokens, 3 repeats, so 8166 words
    take ~50K tokens; a 120K budget needs more words than wonderwords has."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words_tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    with pytest.raises(EvalError, match="needs more than the 8166 distinct wonderwords words.*english_words"):
        ruler.generate("cwe", words_tok, 120_000, 1)
    # below the wonderwords size it still fits without the list
    assert ruler.generate("cwe", words_tok, 40_000, 1)[0]["length"] > 39_000
    english = {str(i): f"zq{i:06d}" for i in range(30_000)}
    path = tmp_path / "english_words.json"
    path.write_text(json.dumps(english))
    s = ruler.generate("cwe", words_tok, 120_000, 1, english_words=str(path))[0]
    assert 120_000 - 200 < s["length"] <= 120_000 and all(w.startswith("zq") for w in s["outputs"])
    assert s["meta"]["haystack_size"] > 8166


def test_english_words_file_errors(tmp_path):
    bad = tmp_path / "pointer.json"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(EvalError, match="parameter 'english_words'"):
        CWEConfig(english_words=str(bad)).validate()
    with pytest.raises(EvalError, match="does not exist"):
        CWEConfig(english_words=str(tmp_path / "missing.json")).validate()


@pytest.mark.parametrize("length", ["1000", "1049", "1050", "4096", "131072"])
def test_fwe_vocab_size_is_rulers(length):
    ref = OFFICIAL["fwe"]["vocab_size_by_length"][length]
    b = FWEBuilder(FWEConfig(), "s", 42, int(length), 50)
    assert len(b.vocab) == ref["vocab_size"]


def test_fwe_text_equals_rulers(tok):
    ref = OFFICIAL["fwe"]["text_300"]
    b = FWEBuilder(FWEConfig(alpha=ref["alpha"]), "s", ref["seed"], 4096, 50, vocab=list(ref["vocab"]))
    d = b.build(ref["num_words"])
    assert d.text == ref["input"] and d.answer_prefix == ref["answer_prefix"] and d.outputs == ref["outputs"]


@pytest.mark.parametrize("length", ["2048", "4096", "8192"])
def test_fwe_size_is_rulers(tok, length):
    # byte counts do not depend on which 6-letter words were drawn, so RULER's fitted N carries over
    s = ruler.generate("fwe", tok, int(length), 1)[0]
    assert s["meta"]["haystack_size"] == OFFICIAL["fwe"]["fitted_num_words_bytes"][length]


@pytest.mark.parametrize("dataset", ["squad", "hotpotqa"])
def test_qa_repeats_documents_as_ruler(tmp_path, tok, dataset):
    ref = OFFICIAL["qa"][dataset]
    path = tmp_path / f"{dataset}.json"
    path.write_text(json.dumps(ref["file"]))
    items, docs = (read_squad if dataset == "squad" else read_hotpotqa)(str(path))
    assert len(docs) == ref["num_docs_in_file"]
    for n, p in ref["prompts"].items():
        d = QABuilder(items, docs, p["index"], "s", 42).build(int(n))
        assert d.text + d.answer_prefix == p["input"] + p["answer_prefix"] and d.outputs == p["outputs"]
    # RULER's fitted document count passes the file's 6 documents; longkit counts one BOS token more
    task = "qa_1" if dataset == "squad" else "qa_2"
    s = ruler.generate(task, tok, 4096, 1, data=str(path))[0]
    assert s["meta"]["haystack_size"] == ref["fitted_4096"]["num_documents"]
    assert s["length"] == ref["fitted_4096"]["length"] + 1


def test_postprocess_and_scores_equal_rulers_on_fuzzed_predictions():
    cases = OFFICIAL["metrics"]["cases"]
    assert len(cases) >= 100
    for c in cases:
        assert postprocess_pred(c["pred"]) == c["post"], c
        assert string_match_all([c["post"]], [c["refs"]]) == c["string_match_all"], c
        assert string_match_part([c["post"]], [c["refs"]]) == c["string_match_part"], c
        assert ruler_score("cwe", [c["pred"]], [c["refs"]]) == c["string_match_all"]
        assert ruler_score("qa_1", [c["pred"]], [c["refs"]]) == c["string_match_part"]
    batch = OFFICIAL["metrics"]["batch_40"]
    preds, refs = [c["pred"] for c in cases[:40]], [c["refs"] for c in cases[:40]]
    assert ruler_score("niah_single_1", preds, refs) == batch["string_match_all"]
    assert ruler_score("qa_2", preds, refs) == batch["string_match_part"]
    # the fuzz reaches the interesting branches: empty predictions, partial and full matches
    assert any(c["post"] == "" for c in cases)
    assert {0 < c["string_match_all"] < 100 for c in cases} == {True, False}
