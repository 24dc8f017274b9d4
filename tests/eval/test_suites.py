"""LongBench v1/-E/v2, InfiniteBench and BABILong: metrics against hand-computed values, loaders, prompts,
truncation, and a suite run on the tiny model through the runner (resumable, official summary)."""

import json

import pytest

from conftest import FIXTURES
from longkit.errors import EvalError
from longkit.eval.records import load_records
from longkit.eval.runner import EvalConfig, evaluate
from longkit.eval.suites import babilong as bl
from longkit.eval.suites import get_suite, scoring, truncate_middle
from longkit.eval.suites import longbench as lb
from longkit.eval.suites import longbench_v2 as v2
from longkit.eval.suites.infinitebench import format_prompt as ib_format

FIX = FIXTURES / "suites"


class WordTokenizer:
    """One token per whitespace word, a BOS id first (as HF tokenizers add special tokens), decode without spaces
    between the two decoded halves (as the suites concatenate them)."""

    bos_token_id = 0
    chat_template = None

    def __init__(self):
        self.vocab = ["<s>"]

    def __call__(self, text):
        ids = [0]
        for word in text.split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))

        class Enc:
            input_ids = ids

        return Enc()

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


# ------------------------------------------------------------------------------------------------- metrics
def test_normalize_and_qa_f1_by_hand():
    assert scoring.normalize_answer("The  Cat, sat! an apple") == "cat sat apple"
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert scoring.qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert scoring.qa_f1_score("dog", "cat") == 0.0
    # repeated tokens count once per occurrence on both sides (bag intersection)
    assert scoring.f1_tokens(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)


def test_rouge_l_uses_the_rouge_package_with_its_unique_word_counts():
    pytest.importorskip("rouge")
    # LCS 'the cat on the mat' = 5 of 6 tokens, but the rouge package counts unique words: 4 / 5 = 0.8
    assert scoring.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert scoring.rouge_score("", "reference") == 0.0


def test_rouge_lsum_summary_level_by_hand():
    # union LCS over the two candidate lines covers 5 of the 6 reference tokens; P = 5/5, R = 5/6 -> F = 10/11
    assert scoring.rouge_lsum("on the mat\nthe cat", "the cat is on the mat") == pytest.approx(10 / 11)
    assert scoring.rouge_lsum("The cat sat.", "the cat sat") == pytest.approx(1.0)
    assert scoring.rouge_lsum("", "x") == 0.0


def test_rouge_lsum_matches_rouge_score_when_installed():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeLsum"], use_stemmer=False)
    for pred, ref in [("on the mat\nthe cat", "the cat is on the mat"), ("a b c\nd e", "e d\nc b a x")]:
        assert scoring.rouge_lsum(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeLsum"].fmeasure)


def test_code_similarity_first_code_line_and_indel_ratio():
    # 16 + 16 characters, LCS 15 -> round(100 * 30 / 32) = 94
    assert scoring.fuzz_ratio("    return a * b", "    return a + b") == 94
    assert scoring.fuzz_ratio("", "") == 100 and scoring.fuzz_ratio("", "x") == 0
    # the line with a backtick is skipped, the next one is scored
    assert scoring.code_sim_score("\n```python\n    return a * b\n", "    return a + b") == pytest.approx(0.94)
    assert scoring.code_sim_score("# only a comment", "x = 1") == 0.0


def test_fuzz_ratio_matches_rapidfuzz_when_installed():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    for a, b in [("kitten", "sitting"), ("    return a * b", "x = foo(a, b)"), ("abc", "cba")]:
        assert scoring.fuzz_ratio(a, b) == round(fuzz.ratio(a, b))


def test_chinese_metrics_need_jieba_or_say_so():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(EvalError, match="install jieba"):
            scoring.qa_f1_zh_score("北京", "北京")
        return
    assert scoring.qa_f1_zh_score("北京。", "北京") == 1.0
    assert scoring.normalize_zh_answer("北京， 市！") == "北京市"


def test_classification_count_retrieval_by_hand():
    classes = ["City", "Distance", "Individual", "Date"]
    assert scoring.classification_score("Individual", "Individual", classes) == 1.0
    assert scoring.classification_score("City or Individual", "Individual", classes) == 0.5
    assert scoring.classification_score("Date", "Individual", classes) == 0.0
    # a class name inside the gold one is dropped: only 'New York' remains
    assert scoring.classification_score("New York", "New York", ["York", "New York"]) == 1.0
    assert scoring.count_score("There are 3 paragraphs, so 3.", "3") == 1.0
    assert scoring.count_score("3 or 4", "3") == 0.5 and scoring.count_score("none", "3") == 0.0
    assert scoring.retrieval_score("Paragraph 1 and Paragraph 12", "Paragraph 12") == 0.5
    assert scoring.retrieval_score("段落3", "段落3", zh=True) == 1.0


def test_longbench_first_line_for_few_shot_tasks_and_max_over_answers():
    assert lb.sample_score("trec", "\nIndividual\nQuestion: next", ["Individual"], ["Individual", "City"]) == 1.0
    # hotpotqa scores the whole prediction, so the extra line lowers F1
    assert lb.sample_score("hotpotqa", "Paris\nParis is nice", ["Paris"], None) < 1.0
    assert lb.sample_score("hotpotqa", "Fuji", ["Mount Fuji", "Fuji"], None) == 1.0


def test_longbench_e_buckets():
    assert [lb.bucket(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


@pytest.mark.parametrize(
    "response,letter",
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is C**", "C"),
        ("Reasoning... The correct answer is (D).", "D"),
        ("the correct answer is (A)", None),
        ("The correct answer is (E)", None),
        ("I pick (A)", None),
    ],
)
def test_longbench_v2_answer_extraction(response, letter):
    assert scoring.extract_choice_v2(response) == letter


def test_infinitebench_scorers_by_hand():
    assert scoring.ib_first_int("The pass key is 71432.", ["71432"])
    assert not scoring.ib_first_int("key 7143 2", ["71432"])
    assert scoring.ib_kv_retrieval('"0d3a-value".', ["0d3a-value"])
    assert scoring.ib_longbook_choice("B", ["Lyon", "B"])
    assert not scoring.ib_longbook_choice("The answer is: C", ["Lyon", "B"])
    assert scoring.ib_code_run("The value is 42.", [42]) and not scoring.ib_code_run("41", [42])
    assert scoring.ib_math_calc("[1, 4, 9, 10]", [1, 4, 8, 10]) == pytest.approx(2 / 4)
    assert scoring.ib_math_find("It is 17", [17]) and not scoring.ib_math_find("none", [17])
    assert scoring.ib_longdialogue("I think it is hamlet", ["HAMLET"])
    assert scoring.qa_f1_zh_chars("北京市", "北京") == pytest.approx(0.8)


def test_babilong_label_matching():
    qa1 = scoring.BABILONG_LABELS["qa1"]
    assert scoring.babilong_compare("office", "The most recent location of Mary is office.", "Where is Mary?", qa1)
    assert not scoring.babilong_compare("office", "office or kitchen", "Where is Mary?", qa1)
    # only the first sentence counts
    assert scoring.babilong_compare("office", "Office. The kitchen was earlier", "Where is Mary?", qa1)
    # labels named in the question are ignored
    assert scoring.babilong_compare(
        "bathroom", "Before the kitchen the apple was in the bathroom", "Where was the apple before the kitchen?", qa1
    )
    qa8 = scoring.BABILONG_LABELS["qa8"]
    assert scoring.babilong_compare("apple,milk", "apple, milk", "What is Daniel carrying?", qa8)
    assert not scoring.babilong_compare("apple,milk", "apple", "What is Daniel carrying?", qa8)
    assert set(scoring.BABILONG_LABELS) == {f"qa{i}" for i in range(1, 21)} == set(bl.PROMPTS)


# ------------------------------------------------------------------------------------------------ truncation
def test_middle_truncation_styles_on_tokens():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(1, 10))  # BOS + 9 words = 10 tokens
    assert truncate_middle(tok, text, 10, style="longbench") == (text, 10, False)
    # LongBench: int(5/2) = 2 from each end (BOS skipped in decoding), halves joined as decoded
    assert truncate_middle(tok, text, 5, style="longbench") == ("w1w8 w9", 10, True)
    # v2 / InfiniteBench: ids[:5//2] + ids[-5//2:] keeps 2 + 3
    assert truncate_middle(tok, text, 5, style="floor") == ("w1w7 w8 w9", 10, True)
    assert truncate_middle(tok, text, 4, style="floor") == ("w1w8 w9", 10, True)


# ------------------------------------------------------------------------------------------- loaders/prompts
def test_longbench_prompt_chat_rules_and_budget():
    suite, tok = get_suite("longbench"), WordTokenizer()
    rec = suite.load(FIX / "longbench", "hotpotqa")[0]
    p = suite.prompt("hotpotqa", rec, tok, 10_000, chat=True)
    assert p.chat and p.max_new_tokens == 32 and not p.truncated
    assert p.text.startswith("Answer the question based on the given passages.")
    assert p.text.endswith("Question: In which city is the Eiffel Tower?\nAnswer:")
    trec = suite.load(FIX / "longbench", "trec")[0]
    assert not suite.prompt("trec", trec, tok, 10_000, chat=True).chat
    short = suite.prompt("hotpotqa", rec, tok, 8, chat=False)
    assert short.truncated and len(short.text.split()) <= 8
    samsum = {"context": "Dialogue: A: hi", "input": "Summary:", "answers": ["x"]}
    assert suite.prompt("samsum", samsum, tok, 100, chat=None).stop_newline


def test_malformed_files_name_file_and_line(tmp_path):
    suite = get_suite("longbench")
    with pytest.raises(EvalError, match=r"hotpotqa\.jsonl:2: not valid JSON"):
        suite.load(FIX / "longbench_bad", "hotpotqa")
    with pytest.raises(EvalError, match=r"qasper\.jsonl:2: field 'answers' must be list"):
        suite.load(FIX / "longbench_bad", "qasper")
    with pytest.raises(EvalError, match="valid tasks: narrativeqa"):
        suite.load(FIX / "longbench", "hotpot")
    with pytest.raises(EvalError, match="no LongBench file for task 'musique'"):
        suite.load(FIX / "longbench", "musique")
    bad = json.loads((FIX / "longbench_v2" / "data.json").read_text())
    bad[1]["answer"] = "E"
    (tmp_path / "data.json").write_text(json.dumps(bad))
    with pytest.raises(EvalError, match=r"record 1: field 'answer' must be one of A, B, C, D"):
        get_suite("longbench_v2").load(tmp_path, "all")
    (tmp_path / "0k").mkdir()
    (tmp_path / "0k" / "qa2.json").write_text(json.dumps([{"input": "x", "question": "y"}]))
    with pytest.raises(EvalError, match=r"qa2\.json: record 0: missing field 'target'"):
        get_suite("babilong").load(tmp_path, "qa2", 0)


def test_v2_template_and_infinitebench_prompts():
    rec = get_suite("longbench_v2").load(FIX / "longbench_v2", "all")[0]
    text = v2.fill_template(rec)
    assert "What is the correct answer to this question: Which option is right in case 0?\n" in text
    assert "(A) alpha\n(B) beta" in text and text.endswith('"The correct answer is (insert answer here)".')
    ib, tok = get_suite("infinitebench"), WordTokenizer()
    choice = ib.load(FIX / "infinitebench", "longbook_choice_eng")[0]
    assert ib.answers("longbook_choice_eng", choice) == ["Lyon", "B"]
    text = ib_format("longbook_choice_eng", choice, chat=False)
    assert text.endswith("D. Lille\n\nThe letter of the correct answer is")
    # within the budget the prompt is still the decode of its ids, as the official scripts send it
    plain = ib.prompt("longbook_choice_eng", choice, tok, 10_000, chat=False)
    assert plain.text == tok.decode(tok(text).input_ids, skip_special_tokens=True) and plain.max_new_tokens == 40
    chat = ib.prompt("longbook_choice_eng", choice, tok, 10_000, chat=True)
    assert chat.system == "You are a helpful assistant" and "using one single letter" in chat.text
    assert ib.score("longbook_choice_eng", "B. Lyon", choice) == 100.0


def test_babilong_prompt_and_splits():
    suite = get_suite("babilong")
    assert suite.splits(FIX / "babilong") == ["0k", "1k"]
    assert bl.split_name(0) == "0k" and bl.split_name(4096) == "4k" and bl.split_name(2**20) == "1M"
    with pytest.raises(EvalError, match="valid: 0k, 1k"):
        bl.split_name(3000)
    rec = suite.load(FIX / "babilong", "qa1", 0)[0]
    text = bl.format_input("qa1", rec)
    assert text.startswith("I will give you context with the facts about positions of different persons")
    assert "\n\n<context>\nMary moved to the bathroom." in text and text.endswith(
        "</context>\n\nQuestion: Where is Mary?"
    )
    assert suite.score("qa1", "The most recent location of Mary is office.", rec) == 100.0


# ------------------------------------------------------------------------------------------------ runner
def test_suite_run_on_tiny_model_records_scores_and_resumes(tiny_llama, tmp_path):
    cfg = EvalConfig(
        model="tiny-llama",
        methods=["baseline"],
        tasks=["hotpotqa", "qasper_e"],
        lengths=[64],
        suite="longbench",
        data_dir=str(FIX / "longbench"),
        limit=2,
        run_dir=str(tmp_path / "run"),
    )
    seen = []
    run = evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    records = load_records(run)
    assert len(records) == len(seen) == 4
    assert {r["task"] for r in records} == {"longbench/hotpotqa", "longbench/qasper_e"}
    assert all(0.0 <= r["score"] <= 100.0 and r["truncated"] for r in records)
    assert {r["bucket"] for r in records if r["task"] == "longbench/qasper_e"} == {"0-4k", "4-8k"}
    summary = json.loads((run / "suite_summary.json").read_text())
    cell = summary["scores"]["baseline"]["64"]["longbench/qasper_e"]
    assert cell["n"] == 2 and cell["errors"] == 0 and set(cell["buckets"]) == {"0-4k", "4-8k", "8k+"}
    again = []
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=again.append)
    assert again == []


def test_babilong_run_uses_present_splits(tiny_llama, tmp_path):
    cfg = EvalConfig(
        model="tiny-llama",
        methods=["baseline"],
        tasks=["qa1", "qa8"],
        lengths=[],
        suite="babilong",
        data_dir=str(FIX / "babilong"),
        run_dir=str(tmp_path / "run"),
    )
    run = evaluate(cfg, lm=tiny_llama, progress=False)
    assert cfg.lengths == [0, 1024]
    got = sorted((r["task"], r["length"]) for r in load_records(run))
    # qa8 is only published at 0k in the fixture
    assert got == [("babilong/qa1", 0), ("babilong/qa1", 0), ("babilong/qa1", 1024), ("babilong/qa8", 0)]


def test_suite_config_errors(tmp_path):
    with pytest.raises(EvalError, match="valid suites: babilong, infinitebench, longbench, longbench_v2"):
        EvalConfig(methods=["baseline"], suite="longbenchh", data_dir=str(FIX)).validate()
    with pytest.raises(EvalError, match="parameter 'data_dir' must be a directory"):
        EvalConfig(methods=["baseline"], suite="longbench", data_dir=str(tmp_path / "nope")).validate()
    with pytest.raises(EvalError, match="no longbench task files found"):
        EvalConfig(methods=["baseline"], tasks=[], suite="longbench", data_dir=str(tmp_path)).validate()
