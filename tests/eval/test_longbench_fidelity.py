"""LongBench v1 / LongBench-E / LongBench v2 against the official code (THUDM/LongBench): the middle truncation's
seam on a SentencePiece-style tokenizer, prompts, and scores computed by running the official scorers."""

from __future__ import annotations

import string

import pytest

from longkit.eval.suites import get_suite, truncate_middle
from longkit.eval.suites import longbench_v2 as v2

WORDS = ("On", "Monday", "The", "the", "budget", "was", "approved")


def metaspace_tokenizer():
    """A SentencePiece-like tokenizer (Unigram pieces with a Metaspace pre-tokenizer and decoder, BOS added) built
    offline: whole-word pieces for WORDS, single characters for anything else."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = [("<s>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -10.0) for c in string.printable if not c.isspace()]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_metaspace_seam_joined_keeps_the_space_separate_decodes_drop_it():
    tok = metaspace_tokenizer()
    text = "On Monday The the budget was approved"
    assert tok.convert_ids_to_tokens(tok(text).input_ids)[:3] == ["<s>", "\u2581On", "\u2581Monday"]
    # 8 tokens (BOS + 7 words); L = 7 keeps ids[:3] = <s> On Monday and ids[-4:] = the budget was approved.
    # LongBench v2 pred.py decodes the joined ids once: the tail's "▁the" keeps its space.
    assert truncate_middle(tok, text, 7, style="floor", joined=True) == ("On Monday the budget was approved", 8, True)
    # LongBench v1 pred.py decodes the halves separately: each decode strips its first piece's space.
    assert truncate_middle(tok, text, 6, style="longbench", joined=False) == (
        "On Mondaybudget was approved",
        8,
        True,
    )
    assert truncate_middle(tok, text, 7, style="floor", joined=False)[0] == "On Mondaythe budget was approved"
    # the default is v1's separate decodes (the behaviour every caller had before the option)
    assert truncate_middle(tok, text, 6, style="longbench") == truncate_middle(
        tok, text, 6, style="longbench", joined=False
    )


def test_longbench_v2_prompt_uses_the_joined_decode_and_v1_the_separate_one():
    tok = metaspace_tokenizer()
    record = {
        "_id": "x", "question": "Was the budget approved?", "choice_A": "yes", "choice_B": "no", "choice_C": "maybe",
        "choice_D": "later", "answer": "A", "context": " ".join(["On Monday The the budget was approved"] * 40),
        "difficulty": "easy", "length": "short",
    }  # fmt: skip
    text = v2.fill_template(record)
    n = len(tok(text).input_ids)
    # lengths where the two decodes differ at the seam (a space-carrying tail piece after a word)
    differ = [
        L
        for L in range(40, n, 7)
        if truncate_middle(tok, text, L, style="floor", joined=True)[0]
        != truncate_middle(tok, text, L, style="floor", joined=False)[0]
    ]
    assert differ
    suite = get_suite("longbench_v2")
    for L in differ:
        prompt = suite.prompt("all", record, tok, L, chat=False)
        assert prompt.truncated and prompt.text == truncate_middle(tok, text, L, style="floor", joined=True)[0]

    v1 = get_suite("longbench")
    rec1 = {"context": record["context"], "input": "Was the budget approved?", "answers": ["yes"]}
    from longkit.eval.suites.longbench import PROMPTS

    text1 = PROMPTS["hotpotqa"].format(context=rec1["context"], input=rec1["input"])
    differ1 = [
        L
        for L in range(40, len(tok(text1).input_ids), 7)
        if truncate_middle(tok, text1, L, style="longbench", joined=True)[0]
        != truncate_middle(tok, text1, L, style="longbench", joined=False)[0]
    ]
    assert differ1
    for L in differ1:
        assert (
            v1.prompt("hotpotqa", rec1, tok, L, chat=False).text
            == truncate_middle(tok, text1, L, style="longbench", joined=False)[0]
        )
