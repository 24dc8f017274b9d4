"""RULER's needle-in-a-haystack family: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery.

Needles ``"One of the special magic {type_needle_v} for {key} is: {value}."`` go into a haystack of the noise
sentence repeated (``noise``), essay sentences at depths drawn from RULER's 40-point grid (``essay``), or
distractor needles with other keys (``needle``). Keys/values are adjective-noun words, 7-digit numbers or
uuid4 strings; the question asks for ``num_needle_q`` keys and the gold list is all their values.
Based on Hsieh et al. 2024, RULER (https://arxiv.org/abs/2404.06654), ``scripts/data/synthetic/niah.py``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from longkit.errors import EvalError
from longkit.eval.ruler.fit import Draft
from longkit.eval.ruler.templates import FAMILIES, NEEDLE, NOISE
from longkit.eval.ruler.words import essay_text, key_parts, sentences

#: RULER's insertion depths for the essay haystack: np.round(np.linspace(0, 100, 40)) (no ties at .5 occur).
DEPTHS = [round(i * 100 / 39) for i in range(40)]
NEEDLE_TYPES = ("numbers", "words", "uuids")
HAYSTACK_TYPES = ("noise", "essay", "needle")


@dataclass
class NiahConfig:
    """RULER's niah arguments (``synthetic.yaml``): haystack type, key/value types, needle counts."""

    type_haystack: str = "essay"
    type_needle_k: str = "words"
    type_needle_v: str = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1

    def validate(self) -> None:
        if self.type_haystack not in HAYSTACK_TYPES:
            raise EvalError(f"parameter 'type_haystack' must be one of {HAYSTACK_TYPES} (got {self.type_haystack!r})")
        for name in ("type_needle_k", "type_needle_v"):
            if getattr(self, name) not in NEEDLE_TYPES:
                raise EvalError(f"parameter '{name}' must be one of {NEEDLE_TYPES} (got {getattr(self, name)!r})")
        for name in ("num_needle_k", "num_needle_v", "num_needle_q"):
            if not 1 <= int(getattr(self, name)) <= 1000:
                raise EvalError(f"parameter '{name}' must be in [1, 1000] (got {getattr(self, name)!r})")
        # RULER: num_needle_k = max(num_needle_k, num_needle_q), so every queried key exists.
        self.num_needle_k = max(int(self.num_needle_k), int(self.num_needle_q))


def random_needle(rng: random.Random, kind: str) -> str:
    """A 7-digit number, an adjective-noun word pair, or a uuid4 string, as RULER's generate_random."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjs, nouns = key_parts()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah_templates(cfg: NiahConfig) -> tuple[str, str, str]:
    """(template, answer prefix, value type) with RULER's singular rewrite for one queried value."""
    family = FAMILIES["niah"]
    template, prefix, type_v = family.template, family.answer_prefix, cfg.type_needle_v
    if cfg.num_needle_q * cfg.num_needle_v == 1:
        # RULER rewrites the whole template (answer prefix included) in this order.
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = type_v[:-1]
    return template, prefix, type_v


class NiahBuilder:
    """Draws one sample's keys, values and queries once; ``build(n)`` places them in a haystack of size n."""

    def __init__(self, cfg: NiahConfig, sample_seed: str, run_seed: int, essay: tuple[str, ...] | None):
        cfg.validate()
        self.cfg, self.essay, self.sample_seed = cfg, essay, sample_seed
        if cfg.type_haystack == "essay" and not essay:
            raise EvalError("the essay haystack is empty")
        rng = random.Random(f"{sample_seed}|keys")
        keys: list[str] = []
        while len(keys) < cfg.num_needle_k:
            # Distinct keys: a repeated key would make the question ambiguous (RULER does not check).
            key = random_needle(rng, cfg.type_needle_k)
            if key not in keys:
                keys.append(key)
        self.keys = keys
        self.values = [[random_needle(rng, cfg.type_needle_v) for _ in range(cfg.num_needle_v)] for _ in keys]
        needles = [
            NEEDLE.format(type_needle_v=cfg.type_needle_v, key=k, value=v)
            for k, vs in zip(keys, self.values, strict=True)
            for v in vs
        ]
        # RULER shuffles the needles with a generator seeded by the run seed alone.
        random.Random(run_seed).shuffle(needles)
        self.needles = needles
        indices = rng.sample(range(cfg.num_needle_k), cfg.num_needle_q)
        self.queries = [keys[i] for i in indices]
        self.answers = [a for i in indices for a in self.values[i]]
        q = self.queries
        self.query = ", ".join(q[:-1]) + ", and " + q[-1] if len(q) > 1 else q[0]
        self.template, prefix, self.type_v = niah_templates(cfg)
        self.answer_prefix = prefix.format(type_needle_v=self.type_v, query=self.query)

    @property
    def min_size(self) -> int:
        return len(self.needles) if self.cfg.type_haystack != "essay" else 1

    def build(self, n: int) -> Draft:
        rng = random.Random(f"{self.sample_seed}|haystack")
        cfg = self.cfg
        depths = None
        if cfg.type_haystack == "essay":
            sents = sentences(essay_text(self.essay, n))
            depths = sorted(rng.sample(DEPTHS, len(self.needles)))
            cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(self.needles):
                    parts.append(self.needles[i - 1])
            context = " ".join(parts)
        else:
            if cfg.type_haystack == "noise":
                lines = [NOISE] * n
            else:
                lines = []
                while len(lines) < n:
                    key = random_needle(rng, cfg.type_needle_k)
                    value = random_needle(rng, cfg.type_needle_v)
                    # A distractor must not reuse a real key or a gold value (RULER leaves this to chance).
                    if key in self.keys or value in self.answers:
                        continue
                    lines.append(NEEDLE.format(type_needle_v=cfg.type_needle_v, key=key, value=value))
            slots = sorted(rng.sample(range(n), len(self.needles)), reverse=True)
            for index, needle in zip(slots, self.needles, strict=True):
                lines.insert(index, needle)
            context = "\n".join(lines)
        text = self.template.format(type_needle_v=self.type_v, context=context, query=self.query)
        meta = {"keys": self.keys, "queries": self.queries, "needles": list(self.needles), "haystack_size": n}
        if depths is not None:
            meta["depths"] = depths
        return Draft(text, self.answer_prefix, list(self.answers), meta, context=context)
