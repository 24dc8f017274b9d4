"""LongBench v1 / LongBench-E / LongBench v2 against the official code (THUDM/LongBench): the middle truncation's
seam on a SentencePiece-style tokenizer, prompts, and scores computed by running the official scorers."""

from __future__ import annotations

import importlib.util
import json
import string

import pytest

from conftest import FIXTURES
from longkit.eval.suites import get_suite, truncate_middle
from longkit.eval.suites import longbench_v2 as v2
from longkit.eval.suites.scoring import extract_choice_v2

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


def test_truncated_prompts_equal_the_official_pred_py_paths():
    """truncation.json holds the prompt LongBench/pred.py get_pred (v1) and pred.py query_llm (v2) hand to the
    model, run with metaspace_tokenizer() at many lengths (a fake model / API client captured it)."""
    official = json.loads((FIXTURES / "suites" / "longbench_official" / "truncation.json").read_text("utf-8"))
    tok = metaspace_tokenizer()
    v1, v2_suite = get_suite("longbench"), get_suite("longbench_v2")
    for dataset, by_length in official["v1"].items():
        for length, expected in by_length.items():
            assert v1.prompt(dataset, official["record_v1"], tok, int(length), chat=True).text == expected
    for length, expected in official["v2"].items():
        assert v2_suite.prompt("all", official["item_v2"], tok, int(length), chat=None).text == expected


# ----------------------------------------------------------------------- differential tables (official code)
# Expected values produced by running THUDM/LongBench's own code (LongBench/eval.py + metrics.py with jieba,
# rouge, fuzzywuzzy + python-Levenshtein; pred.py's template and answer extraction; result.py) on fixed inputs
# and fuzzed predictions; each file's "source" names the commit.
OFFICIAL = FIXTURES / "suites" / "longbench_official"
V1_SCORES = json.loads((OFFICIAL / "v1_scores.json").read_text(encoding="utf-8"))
V1_PROMPTS = json.loads((OFFICIAL / "v1_prompts.json").read_text(encoding="utf-8"))
V2 = json.loads((OFFICIAL / "v2.json").read_text(encoding="utf-8"))
ZH = {"multifieldqa_zh", "dureader", "vcsum"}  # jieba-segmented metrics


def _needs_jieba(dataset):
    if dataset in ZH:
        pytest.importorskip("jieba", reason="the Chinese LongBench metrics segment with jieba")


def _case_id(case):
    return f"{case['dataset']}:{case['prediction'][:24]!r}"


@pytest.mark.parametrize("case", V1_SCORES["cases"], ids=_case_id)
def test_v1_per_sample_scores_equal_the_official_scorer(case):
    _needs_jieba(case["dataset"])
    record = {"answers": case["answers"], "all_classes": case["all_classes"]}
    score = get_suite("longbench").score(case["dataset"], case["prediction"], record)
    # eval.py's per-sample value (unrounded, 0..1) and eval.scorer on the one sample (100x, 2 dp)
    assert score == pytest.approx(100 * case["score"], abs=1e-9)
    assert round(score, 2) == case["scorer"]
    # LongBench-E scores its datasets with the same metric
    if f"{case['dataset']}_e" in get_suite("longbench").tasks:
        assert get_suite("longbench").score(f"{case['dataset']}_e", case["prediction"], record) == score


def _records(suite, cases, task_of):
    out = []
    for case in cases:
        task = task_of(case)
        record = {"answers": case["answers"], "all_classes": case["all_classes"]}
        if "e_length" in case:
            record["length"] = case["e_length"]
        row = {"method": "m", "length": 0, "task": task, "error": None}
        row["score"] = suite.score(task, case["prediction"], record)
        row.update(suite.meta(task, record))
        out.append(row)
    return out


def test_v1_dataset_means_equal_eval_py_scorer():
    suite = get_suite("longbench")
    datasets = [d for d in V1_SCORES["batch"] if d not in ZH or importlib.util.find_spec("jieba")]
    cases = [c for c in V1_SCORES["cases"] if c["dataset"] in datasets]
    summary = suite.summarize(_records(suite, cases, lambda c: c["dataset"]))["m"][0]
    assert {d: summary[d]["score"] for d in datasets} == {d: V1_SCORES["batch"][d] for d in datasets}


def test_longbench_e_bucket_means_equal_eval_py_scorer_e():
    suite = get_suite("longbench")
    cases = [c for c in V1_SCORES["cases"] if "e_length" in c]
    summary = suite.summarize(_records(suite, cases, lambda c: c["dataset"] + "_e"))["m"][0]
    assert set(V1_SCORES["e_batch"]) == set(V1_PROMPTS["e_datasets"])
    for dataset, buckets in V1_SCORES["e_batch"].items():
        assert summary[dataset + "_e"]["buckets"] == buckets, dataset


def test_v1_prompts_budgets_and_task_lists_equal_the_official_config():
    from longkit.eval.suites import longbench as lb

    official = V1_PROMPTS
    assert set(lb.PROMPTS) == set(official["prompts"])
    assert lb.MAX_NEW_TOKENS == official["max_new_tokens"]
    assert lb.E_DATASETS == tuple(official["e_datasets"])
    assert lb.NO_CHAT == frozenset(official["no_chat"])
    assert lb.FIRST_LINE == frozenset(official["first_line"])
    suite = get_suite("longbench")
    tok = metaspace_tokenizer()
    record = official["record"]
    for dataset, expected in official["prompts"].items():
        assert lb.PROMPTS[dataset].format(context=record["context"], input=record["input"]) == expected, dataset
        for task in (dataset, f"{dataset}_e"):
            if task not in suite.tasks:
                continue
            prompt = suite.prompt(task, record, tok, 10**6, chat=True)
            assert prompt.text == expected and not prompt.truncated
            assert prompt.max_new_tokens == official["max_new_tokens"][dataset]
            assert prompt.chat == (dataset not in official["no_chat"])
            assert prompt.stop_newline == (dataset == "samsum")


def test_v2_prompt_equals_pred_py_template_filling():
    suite = get_suite("longbench_v2")
    tok = metaspace_tokenizer()
    for item, expected in zip(V2["items"], V2["prompts"], strict=True):
        assert v2.fill_template(item) == expected
        prompt = suite.prompt("all", item, tok, 10**6, chat=None)
        assert prompt.text == expected and not prompt.truncated and prompt.max_new_tokens == 128


@pytest.mark.parametrize("case", V2["extract"], ids=lambda c: repr(c["response"][:30]))
def test_v2_answer_extraction_equals_pred_py(case):
    assert extract_choice_v2(case["response"]) == case["letter"]
    for answer in "ABCD":
        expected = 100.0 if case["letter"] == answer else 0.0
        assert get_suite("longbench_v2").score("all", case["response"], {"answer": answer}) == expected


def test_v2_summary_splits_equal_result_py():
    suite = get_suite("longbench_v2")
    rows = []
    for r in V2["records"]:
        record = dict(r, _id=r["_id"])
        row = {"method": "m", "length": 0, "task": "all", "error": None}
        row["score"] = suite.score("all", r["response"], record)
        assert row["score"] == (100.0 if r["judge"] else 0.0)
        row.update(suite.meta("all", record))
        rows.append(row)
    cell = suite.summarize(rows)["m"][0]["all"]
    official = V2["result_py"]
    splits = {k.lower(): v for k, v in official.items() if k != "Overall"}
    assert cell["splits"] == splits
    # result.py rounds Overall to 1 dp, the summary's score to 2 dp
    assert round(cell["score"], 1) == official["Overall"]
