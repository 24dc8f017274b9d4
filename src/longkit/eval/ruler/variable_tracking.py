"""RULER's variable tracking (vt): follow chains ``VAR AAAAA = 12345``, ``VAR BBBBB = VAR AAAAA``, ... in noise.

``num_chains`` chains of ``num_hops`` hops are inserted line by line at sorted random positions among the
repeated noise sentence (or at essay depths); the question gives the first chain's value and the gold list is
its ``num_hops + 1`` variable names. A one-shot example (3-letter names, value 12345, fitted to 500 tokens
without answer reserve) precedes the prompt, its names and value redrawn for every sample, as RULER does.
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654), ``scripts/data/synthetic/variable_tracking.py``.
"""

from __future__ import annotations

import heapq
import random
import string
from dataclasses import dataclass
from typing import Any

from longkit.errors import EvalError
from longkit.eval.ruler.fit import Draft, Frame, fit_size
from longkit.eval.ruler.niah import DEPTHS
from longkit.eval.ruler.templates import FAMILIES, NOISE
from longkit.eval.ruler.words import essay_text, sentences

ICL_LENGTH = 500
ICL_VALUE = "12345"


@dataclass
class VTConfig:
    type_haystack: str = "noise"
    num_chains: int = 1
    num_hops: int = 4

    def validate(self) -> None:
        if self.type_haystack not in ("noise", "essay"):
            raise EvalError(f"parameter 'type_haystack' must be 'noise' or 'essay' (got {self.type_haystack!r})")
        if not 1 <= int(self.num_chains) <= 100:
            raise EvalError(f"parameter 'num_chains' must be in [1, 100] (got {self.num_chains!r})")
        if not 1 <= int(self.num_hops) <= 100:
            raise EvalError(f"parameter 'num_hops' must be in [1, 100] (got {self.num_hops!r})")
        if self.type_haystack == "essay" and self.num_chains * (self.num_hops + 1) > len(DEPTHS):
            raise EvalError(
                f"with the essay haystack num_chains * (num_hops + 1) must be <= {len(DEPTHS)} (RULER's depth grid); "
                f"got {self.num_chains * (self.num_hops + 1)}"
            )


def min_noise(cfg: VTConfig) -> int:
    # Every line of a chain needs its own noise line to follow (RULER splits short noise into sentences instead).
    return cfg.num_hops + 1 if cfg.type_haystack == "noise" else 1


def _name(rng: random.Random, k: int) -> str:
    while True:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        # "VAR" is the assignment keyword; a variable of that name would make renaming the example ambiguous.
        if name != "VAR":
            return name


def generate_chains(rng: random.Random, num_chains: int, num_hops: int, icl: bool) -> tuple[list, list]:
    """RULER's chains: distinct 5-letter names (3 in the example), a 5-digit value, then ``VAR B = VAR A `` hops."""
    k = 3 if icl else 5
    hops = min(10, num_hops) if icl else num_hops
    names: list[str] = []
    while len(names) < (hops + 1) * num_chains:
        name = _name(rng, k)
        if name not in names:
            names.append(name)
    variables, chains = [], []
    for i in range(0, len(names), hops + 1):
        these = names[i : i + hops + 1]
        variables.append(these)
        value = ICL_VALUE if icl else str(rng.randrange(10000, 99999))
        chain = [f"VAR {these[0]} = {value}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
        chains.append(chain)
    return variables, chains


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[str]:
    """RULER's shuffle_sublists_heap: merge the chains in random order, each chain's lines kept in order."""
    heap = [(rng.random(), i, 0) for i in range(len(chains))]
    heapq.heapify(heap)
    out = []
    while heap:
        _, i, j = heapq.heappop(heap)
        out.append(chains[i][j])
        if j + 1 < len(chains[i]):
            heapq.heappush(heap, (rng.random(), i, j + 1))
    return out


def vt_context(rng: random.Random, chains: list[list[str]], n: int, type_haystack: str, essay: Any) -> str:
    if type_haystack == "essay":
        sents = sentences(essay_text(essay, n))
        flat = _interleave(rng, chains)
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(flat))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
            if i - 1 < len(flat):
                parts.append(flat[i - 1].strip() + ".")
        context = " ".join(parts)
    else:
        lines = [NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, pos in enumerate(positions):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines)
    return context.replace(". \n", ".\n")


class VTBuilder:
    def __init__(self, cfg: VTConfig, sample_seed: str, icl_example: str, essay: Any):
        cfg.validate()
        self.cfg, self.sample_seed, self.essay = cfg, sample_seed, essay
        rng = random.Random(f"{sample_seed}|chains")
        self.variables, self.chains = generate_chains(rng, cfg.num_chains, cfg.num_hops, icl=False)
        self.value = self.chains[0][0].split("=")[-1].strip()
        self.example = randomize_icl(icl_example, random.Random(f"{sample_seed}|icl"), cfg.num_hops)
        family = FAMILIES["variable_tracking"]
        self.answer_prefix = family.answer_prefix.format(num_v=cfg.num_hops + 1, query=self.value)

    @property
    def min_size(self) -> int:
        return min_noise(self.cfg)

    def build(self, n: int) -> Draft:
        rng = random.Random(f"{self.sample_seed}|haystack")
        context = vt_context(rng, self.chains, n, self.cfg.type_haystack, self.essay)
        body = FAMILIES["variable_tracking"].template.format(context=context, query=self.value)
        # RULER inserts the example (which ends in a newline) before the task template, plus one more newline.
        text = self.example + "\n" + body
        meta = {"chains": self.chains, "haystack_size": n, "example": self.example}
        return Draft(text, self.answer_prefix, list(self.variables[0]), meta, context=context)


def icl_example(frame: Frame, cfg: VTConfig, run_seed: int, essay: Any) -> str:
    """RULER's one-shot example: a vt prompt (template + answer prefix, no chat template) fitted to 500 tokens
    with no answer reserve, followed by its answer and a newline."""
    family = FAMILIES["variable_tracking"]
    bare = Frame(frame.tokenizer, chat=False)
    bare.head = []

    def build(n: int) -> Draft:
        rng = random.Random(f"{run_seed}|vt-icl")
        variables, chains = generate_chains(rng, cfg.num_chains, cfg.num_hops, icl=True)
        context = vt_context(rng, chains, n, cfg.type_haystack, essay)
        text = family.template.format(context=context, query=ICL_VALUE)
        prefix = family.answer_prefix.format(num_v=cfg.num_hops + 1, query=ICL_VALUE)
        return Draft(text + prefix, "", variables[0])

    try:
        draft, _, _ = fit_size(build, bare, ICL_LENGTH, 0, min_size=min_noise(cfg), task="vt (one-shot example)")
    except EvalError:
        # A tokenizer with long token counts (the tiny models' byte tokenizer) cannot fit the smallest example in
        # 500 tokens; the smallest one is used then (its tokens still count against the sample's budget).
        draft = build(min_noise(cfg))
    return draft.text + " " + " ".join(draft.outputs) + "\n"


def randomize_icl(example: str, rng: random.Random, num_hops: int) -> str:
    """RULER's randomize_icl: new names for the example's variables and a new value for 12345."""
    for item in example.strip().split()[-num_hops - 1 :]:
        example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return example.replace(ICL_VALUE, str(rng.randrange(10000, 99999)))
