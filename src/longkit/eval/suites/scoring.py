"""The official per-sample metrics of LongBench v1/v2, InfiniteBench and BABILong, re-implemented.

Each function follows the suite's published scoring code (read at THUDM/LongBench ``LongBench/metrics.py`` and
``eval.py``; LongBench v2 ``pred.py``; OpenBMB/InfiniteBench ``src/compute_scores.py``; booydar/babilong
``babilong/metrics.py``), including its quirks, so that a longkit score means what the suite's score means.
Functions return the suite's raw per-sample value (mostly 0..1); suites scale to 0..100.

Dependencies: ROUGE-L of LongBench uses the ``rouge`` package exactly as LongBench does (``pip install
longkit[eval]``); the Chinese metrics of LongBench segment words with ``jieba`` (``pip install longkit[zh]``).
Code similarity and InfiniteBench's ROUGE-Lsum are computed here without a dependency (see their docstrings).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from longkit.errors import EvalError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# The Chinese punctuation list of LongBench / InfiniteBench normalize_zh_answer.
_ZH_PUNCT = _PUNCT | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


# ----------------------------------------------------------------------------------------------- normalisation
def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_zh_answer(s: str) -> str:
    """LongBench's Chinese normalisation: lowercase, drop ASCII + Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ZH_PUNCT).split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise EvalError(
            "the Chinese LongBench tasks (multifieldqa_zh, dureader, vcsum) are scored on jieba words; "
            "install jieba (pip install 'longkit[zh]') to run them"
        ) from None
    return list(jieba.cut(text, cut_all=False))


# ----------------------------------------------------------------------------------------------------- F1
def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench/InfiniteBench QA F1 on whitespace tokens after :func:`normalize_answer`."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str) -> float:
    """LongBench Chinese QA F1 on jieba words, each normalised, empty ones dropped."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return f1_tokens(pred, gold)


def qa_f1_zh_chars(prediction: str, ground_truth: str) -> float:
    """InfiniteBench Chinese QA F1: one character one token after :func:`normalize_zh_answer` (no jieba)."""
    return f1_tokens(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


# -------------------------------------------------------------------------------------------------- ROUGE
def rouge_score(prediction: str, ground_truth: str) -> float:
    """LongBench ROUGE-L F: the ``rouge`` package's ``rouge-l`` (sentence split on '.', union LCS); 0 on its errors.

    The ``rouge`` package raises on an empty hypothesis or reference; LongBench scores those 0, as here.
    """
    try:
        from rouge import Rouge
    except ImportError:
        raise EvalError("LongBench ROUGE-L needs the 'rouge' package: pip install 'longkit[eval]'") from None
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    # LongBench wraps the call in a bare ``except: return 0.0``.
    except Exception:  # noqa: BLE001
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str) -> float:
    """LongBench Chinese ROUGE-L: jieba words joined by spaces, then :func:`rouge_score`."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


_RS_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _rs_tokenize(text: str) -> list[str]:
    # rouge_score's default tokenizer (no stemming): lowercase, non-[a-z0-9] runs become spaces.
    return [t for t in _RS_NON_ALNUM.sub(" ", text.lower()).split() if t]


def _lcs_indices(ref: list[str], cand: list[str]) -> list[int]:
    """Indices into ``ref`` of one longest common subsequence, backtracked as rouge_score does."""
    rows, cols = len(ref), len(cand)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            table[i][j] = (
                table[i - 1][j - 1] + 1 if ref[i - 1] == cand[j - 1] else max(table[i - 1][j], table[i][j - 1])
            )
    out: list[int] = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F ("rougeLsum") as Google's ``rouge_score`` computes it (used by InfiniteBench).

    Sentences are the non-empty newline-separated lines; each reference sentence takes the union of its LCS
    indices with every candidate sentence; hits are clipped by token counts on both sides.
    InfiniteBench calls it through HF ``evaluate`` (``use_stemmer=False``); re-implemented here to avoid the
    ``rouge_score``/``nltk``/``absl`` dependencies.
    """
    ref_sents = [_rs_tokenize(s) for s in reference.split("\n") if s]
    cand_sents = [_rs_tokenize(s) for s in prediction.split("\n") if s]
    m = sum(map(len, ref_sents))
    n = sum(map(len, cand_sents))
    if not ref_sents or not cand_sents or not m or not n:
        return 0.0
    ref_counts: Counter[str] = Counter(t for s in ref_sents for t in s)
    cand_counts: Counter[str] = Counter(t for s in cand_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*(_lcs_indices(ref, c) for c in cand_sents)))
        for token in (ref[i] for i in union):
            if cand_counts[token] > 0 and ref_counts[token] > 0:
                hits += 1
                cand_counts[token] -= 1
                ref_counts[token] -= 1
    recall, precision = hits / m, hits / n
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------- others
def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with python-Levenshtein (= ``rapidfuzz.fuzz.ratio`` rounded): 0..100.

    ``round(100 * 2 * LCS(a, b) / (len(a) + len(b)))`` over characters (the Indel similarity), with
    fuzzywuzzy's guards: equal strings give 100, one empty string gives 0. fuzzywuzzy without
    python-Levenshtein falls back to difflib, which can differ by a few points on some pairs.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for ch in a:
        cur = [0] * (len(b) + 1)
        for j, other in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if ch == other else max(prev[j], cur[j - 1])
        prev = cur
    return int(round(100 * 2 * prev[-1] / (len(a) + len(b))))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """LongBench code similarity: the first line without a backtick, '#' or '//' vs the reference, fuzz ratio / 100."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """LongBench classification: 1 / (#class names found in the prediction) if the gold class is among them.

    Class names that are substrings of the gold class (and not the gold class) are dropped first, with the
    official loop that removes from the list while iterating over it (so it can skip a neighbour).
    """
    matches = [name for name in all_classes if name in prediction]
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(numbers: list[str], gold: str) -> float:
    return 0.0 if not numbers else sum(1 for x in numbers if x == gold) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
    """LongBench passage_count: the fraction of integers in the prediction equal to the gold count."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, zh: bool = False) -> float:
    """LongBench passage_retrieval: fraction of integers in the prediction equal to the gold paragraph number."""
    found = re.findall(r"段落(\d+)" if zh else r"Paragraph (\d+)", ground_truth)
    if not found:
        raise EvalError(f"passage_retrieval answer {ground_truth!r} has no paragraph number")
    return _fraction_equal(re.findall(r"\d+", prediction), found[0])


# ------------------------------------------------------------------------------------------ LongBench v2
_V2_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_V2_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_choice_v2(response: str) -> str | None:
    """LongBench v2 answer extraction: drop '*', then "The correct answer is (X)", else "... is X"; None if neither."""
    response = response.replace("*", "")
    match = _V2_PAREN.search(response) or _V2_BARE.search(response)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------- InfiniteBench
def first_int_match(prediction: str) -> str:
    """The first run of digits in the prediction ('' if none)."""
    for item in re.split("[^0-9]", prediction):
        if item:
            return item
    return ""


def _first(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def ib_kv_retrieval(pred: str, label: Any) -> bool:
    for c in ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    return _first(label) in pred.split()


def ib_first_int(pred: str, label: Any) -> bool:
    """passkey and number_string: the first integer of the prediction equals the label."""
    return _first(label) == first_int_match(pred)


def ib_code_run(pred: str, label: Any) -> bool:
    """Code.Run: the last word (after stripping punctuation) parsed as int equals the label (an int)."""
    pred = pred.strip()
    for c in ["\n", ".", "`", "'", '"', ":"]:
        pred = pred.replace(c, " ")
    words = pred.split()
    if not words:
        return False
    try:
        return _first(label) == int(words[-1])
    except ValueError:
        return False


def _after_prefix(pred: str, prefixes: Sequence[str], targets: Sequence[str]) -> bool | None:
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1 :]
        return any(rest.startswith(s) for s in targets)
    return None


def _squeeze(pred: str, chars: Sequence[str]) -> str:
    for c in chars:
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    return pred


def ib_code_debug(pred: str, label: list[str]) -> bool:
    """Code.Debug: label = [function name, option letter].

    As ``get_score_one_code_debug``: a prediction starting "X." or "X:" with the right letter; else, after
    blanking quotes/backticks/dashes/asterisks and the words "Option"/"option", the text after the first answer
    prefix found must start with the letter or the function name. Nothing else counts: "Option C" or "**A**"
    alone score 0 there, so they score 0 here.
    """
    pred = pred.strip()
    fn_name, letter = label[0], label[1]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = _squeeze(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"])
    found = _after_prefix(pred, ["answer is:", "is:", "answer:", "correct option is:"], [letter, fn_name])
    return bool(found)


def ib_math_find(pred: str, label: Any) -> bool:
    label = _first(label)
    number = re.search(r"\d+\.\d+|\d+", pred)
    if number is None:
        return False
    if isinstance(label, bool) or not isinstance(label, int | float):
        raise EvalError(f"math_find label must be an int or float (got {label!r})")
    # The official scorer parses int(...) for an int label, so a float-looking prediction raises there; 0 here.
    if isinstance(label, int):
        try:
            return int(number.group(0)) == label
        except ValueError:
            return False
    return float(number.group(0)) == label


def ib_longdialogue(pred: str, label: Sequence[str] | str) -> bool:
    """Dialogue QA: the first gold name must be one of the prediction's upper-cased words.

    As ``get_score_one_longdialogue_qa_eng``: punctuation becomes spaces, the words are upper-cased and compared
    whole with ``label[0]`` (not upper-cased: the published names are). So "SAMURAI" does not match "SAM", a
    two-word name ("OIL MAN") never matches, and aliases after the first are not used. A bare string label
    is taken as one name (the official ``label[0]`` would take its first character).
    """
    gold = label if isinstance(label, str) else label[0]
    pred = pred.strip()
    for c in ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(c, " ")
    return gold in [word.upper() for word in pred.split()]


def ib_longbook_choice(pred: str, label: Sequence[str]) -> bool:
    """En.MC: label = [option text, letter], as ``get_score_one_longbook_choice_eng``.

    The first character if it is one of A-D; the whole prediction equal to the text or letter; else, punctuation
    blanked, the text after the first answer prefix must start with the text or letter; else the first word
    that is a substring of "ABCD". "(B)" therefore scores 0, as officially.
    """
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"])
    found = _after_prefix(pred, ["answer is:", "answer:", "answer is", "option is"], list(label))
    if found is not None:
        return found
    for word in pred.split():
        # a substring test, as officially: "AB" passes it and then is not in the label
        if word in "ABCD":
            return word in label
    return False


def ib_math_calc(pred: str, label: list[Any], *, drop_first: bool = False) -> float:
    """Math.Calc: the length of the correct prefix of the predicted numbers, over the number of gold values.

    Numbers are the digit runs of the prediction (signs are not read, as officially). ``drop_first`` skips the
    first predicted number, which ``compute_scores.py`` does for ``model_name == "gpt4"`` only, because its
    GPT-4 prompt (a calculator system prompt and a worked example) made GPT-4 echo the first operand. longkit
    does not send that prompt, so the suite scores with ``drop_first=False``.
    """
    if label and isinstance(label[0], list):
        label = label[0]
    numbers = [int(x) for x in re.split("[^0-9]", pred) if x]
    if drop_first:
        numbers = numbers[1:]
    correct = 0
    for gold, got in zip(label, numbers, strict=False):
        if gold != got:
            break
        correct += 1
    return correct / len(label)


# -------------------------------------------------------------------------------------------------- BABILong
#: The answer vocabulary of each bAbI task (booydar/babilong ``metrics.py``).
BABILONG_LABELS: dict[str, tuple[str, ...]] = {
    **{f"qa{i}": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office") for i in (1, 2, 3, 4, 11, 12, 13)},
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": ("no", "yes"),
    "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}


def babilong_preprocess(output: str) -> str:
    """Lowercase, keep the first sentence, cut at '<context>' / '<example>' (the official 'Question' cut comes
    after lowercasing, so it never matches; kept for fidelity)."""
    output = output.lower().split(".")[0]
    output = output.split("<context>")[0].split("<example>")[0]
    return output.split("Question")[0]


def babilong_compare(target: str, output: str, question: str, task_labels: Sequence[str]) -> bool:
    """BABILong label matching: the target must be the only task label in the output (labels named in the
    question do not count); a comma list target longer than 3 characters (qa8 "apple,milk") must match as a set."""
    output = babilong_preprocess(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(p in in_output for p in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1
