"""InfiniteBench against the official code (OpenBMB/InfiniteBench, src/): every expected value in
tests/fixtures/suites/infinitebench_fidelity/ was produced by running that code in a scratch environment
(``prompt.py`` / ``eval_utils.create_prompt`` for prompts, the open-model scripts' and ``eval_utils``'
``truncate_input`` for truncation, ``compute_scores.get_score_one`` for scores), never by longkit."""

from __future__ import annotations

import json
import lzma
import string

import pytest

from conftest import FIXTURES
from longkit.errors import EvalError
from longkit.eval.suites import get_suite, scoring
from longkit.eval.suites import infinitebench as ib

FIX = FIXTURES / "suites" / "infinitebench_fidelity"
WORDS = ("On", "Monday", "The", "the", "budget", "was", "approved", "and", "then", "vetoed")


def sentencepiece_like_tokenizer():
    """A Unigram tokenizer with Metaspace pre-tokenizer/decoder and a BOS, built offline: one piece per word of
    WORDS (with its leading "▁"), single characters otherwise. Its decode drops the leading space of the first
    piece, so decoding head and tail apart loses the space at the seam."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    pieces = [("<s>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + word, -1.0) for word in WORDS]
    pieces += [(ch, -10.0) for ch in string.printable if not ch.isspace()]
    model = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    model.decoder = tokenizers.decoders.Metaspace()
    model.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
