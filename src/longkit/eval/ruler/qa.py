"""RULER's question answering (qa_1: SQuAD, qa_2: HotpotQA): one question over many ``Document i:`` passages.

The gold passage(s) of a question are mixed with other passages of the dataset (SQuAD: first the other
paragraphs of the same article), shuffled, numbered, and as many passages as fit the budget are kept; when the
budget needs more passages than the file has, the whole set repeats (current RULER). Data
are the users' own files (SQuAD v2 ``dev-v2.0.json``, HotpotQA ``hotpot_dev_distractor_v1.json``). Without
them an offline synthetic dataset in the same format runs instead, every sample marked ``synthetic`` and
labelled "qa_1 (synthetic)": invented organisations, founders and towns, one gold passage for qa_1 and a
two-hop pair (organisation -> founder -> birthplace) for qa_2. Synthetic scores are not RULER qa scores.
Follows the current official code, ``scripts/data/synthetic/qa.py`` of NVIDIA/RULER (main, commit c3f5e3b, 2025).
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from longkit.errors import EvalError
from longkit.eval.haystack import read_text_file
from longkit.eval.ruler.fit import Draft
from longkit.eval.ruler.templates import DOCUMENT_PROMPT, FAMILIES
from longkit.eval.ruler.words import key_parts


@dataclass
class QAItem:
    query: str
    outputs: list[str]
    context: list[int]
    more_context: list[int] = field(default_factory=list)


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise EvalError(f"parameter 'data': {what} file {path} does not exist")
    try:
        return json.loads(read_text_file(path, "data"))
    except json.JSONDecodeError as exc:
        raise EvalError(f"parameter 'data': {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc


@lru_cache(maxsize=4)
def read_squad(path: str) -> tuple[list[QAItem], list[str]]:
    """SQuAD JSON as RULER reads it: distinct paragraphs sorted; answerable questions with their article's others."""
    data = _load_json(Path(path), "SQuAD")
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        items = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    # SQuAD v1 has no is_impossible field: every question is answerable.
                    if not qa.get("is_impossible", False):
                        gold = index[p["context"]]
                        items.append(
                            QAItem(
                                qa["question"],
                                [a["text"] for a in qa["answers"]],
                                [gold],
                                [i for i in article if i != gold],
                            )
                        )
    except (KeyError, TypeError) as exc:
        raise EvalError(f"parameter 'data': {path} is not in SQuAD format (missing {exc})") from exc
    return items, docs


@lru_cache(maxsize=4)
def read_hotpotqa(path: str) -> tuple[list[QAItem], list[str]]:
    """HotpotQA JSON as RULER reads it: every ``title\\nsentences`` passage; each question's passages are gold."""
    data = _load_json(Path(path), "HotpotQA")
    try:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        items = [
            QAItem(d["question"], [d["answer"]], [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]) for d in data
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise EvalError(f"parameter 'data': {path} is not in HotpotQA format ({exc})") from exc
    return items, docs


_KINDS = ("society", "guild", "orchestra", "cooperative", "museum", "library", "rowing club", "observatory")
_FIRST = (
    "Ada",
    "Bram",
    "Clara",
    "Dov",
    "Edith",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Katya",
    "Luis",
    "Mira",
    "Nils",
    "Olga",
    "Piet",
    "Rosa",
    "Sven",
    "Tess",
    "Umar",
    "Vera",
    "Wim",
    "Yara",
    "Zeno",
)
_TOWN_SUFFIX = ("ford", "ham", "wick", "by", "stead", "mouth", "bury", "dale", "field", "ton")


@dataclass
class _Fact:
    org: str
    kind: str
    year: int
    founder: str
    town: str
    birthplace: str


def _fact(seed: int, i: int) -> _Fact:
    rng = random.Random(f"{seed}|qa-fact|{i}")
    adjs, nouns = key_parts()

    def town() -> str:
        return rng.choice(nouns).capitalize() + rng.choice(_TOWN_SUFFIX)

    org = f"{rng.choice(adjs).capitalize()} {rng.choice(nouns).capitalize()}"
    founder = f"{rng.choice(_FIRST)} {rng.choice(nouns).capitalize()}son"
    return _Fact(org, rng.choice(_KINDS), rng.randint(1700, 1999), founder, town(), town())


def _org_doc(f: _Fact) -> str:
    return (
        f"The {f.org} {f.kind.title()}\nThe {f.org} {f.kind} was founded in {f.year} by {f.founder}. "
        f"It meets in the town of {f.town}, where its members keep a small archive of letters and maps. "
        f"Visitors are welcome on the first day of every month."
    )


def _person_doc(f: _Fact) -> str:
    return (
        f"{f.founder}\n{f.founder} was born in {f.birthplace} and worked as a clerk before founding "
        f"{'an' if f.kind[0] in 'aeiou' else 'a'} {f.kind}. Friends remembered a patient person who wrote long letters."
    )


def synthetic_qa(seed: int, hops: int, n_items: int = 4096) -> tuple[list[QAItem], list[str]]:
    """An offline dataset in RULER's qa format: facts about invented organisations, one or two gold passages."""
    return _synthetic(seed, hops, n_items)


@lru_cache(maxsize=4)
def _synthetic(seed: int, hops: int, n_items: int) -> tuple[list[QAItem], list[str]]:
    facts: list[_Fact] = []
    orgs: set[str] = set()
    founders: set[str] = set()
    i = 0
    while len(facts) < n_items:
        f = _fact(seed, i)
        i += 1
        # Distinct organisations and founders keep every question's answer unique.
        if f.org in orgs or f.founder in founders:
            continue
        orgs.add(f.org)
        founders.add(f.founder)
        facts.append(f)
    docs, items = [], []
    for f in facts:
        if hops == 1:
            docs.append(_org_doc(f))
            q = f"In which town does the {f.org} {f.kind} meet?"
            items.append(QAItem(q, [f.town], [len(docs) - 1]))
        else:
            docs += [_org_doc(f), _person_doc(f)]
            q = f"Where was the founder of the {f.org} {f.kind} born?"
            items.append(QAItem(q, [f.birthplace], [len(docs) - 2, len(docs) - 1]))
    return items, docs


class QABuilder:
    def __init__(self, items: list[QAItem], docs: list[str], index: int, sample_seed: str, run_seed: int):
        if not items:
            raise EvalError("parameter 'data': the QA file holds no answerable question")
        self.item = items[index % len(items)]
        self.docs, self.sample_seed, self.run_seed = docs, sample_seed, run_seed

    @property
    def min_size(self) -> int:
        return len(self.item.context)

    def build(self, n: int) -> Draft:
        rng = random.Random(f"{self.sample_seed}|docs")
        item = self.item
        gold, more = item.context, item.more_context
        if n < len(self.docs):
            if n - len(gold) > len(more):
                taken = set(gold) | set(more)
                others = [i for i in range(len(self.docs)) if i not in taken]
                chosen = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, n - len(gold))
        else:
            # Current RULER repeats the whole document set as often as the length needs (the 2024 release
            # stopped at the file's size, leaving long prompts short of the budget).
            reps = -(-n // len(self.docs))
            chosen = (list(range(len(self.docs))) * reps)[:n]
        passages = [self.docs[i] for i in chosen]
        # RULER shuffles the passages with a generator seeded by the run seed alone.
        random.Random(self.run_seed).shuffle(passages)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(passages))
        family = FAMILIES["qa"]
        text = family.template.format(context=context, query=item.query)
        gold_pos = [passages.index(self.docs[g]) + 1 for g in gold]
        return Draft(text, family.answer_prefix, list(item.outputs), {"haystack_size": n, "gold_documents": gold_pos},
                     context=context)
