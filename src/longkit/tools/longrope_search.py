"""LongRoPE evolutionary search: per-dimension RoPE rescale factors that minimise perplexity at a target length.

A candidate is one rescale factor per rotary frequency (frequency j is divided by ``factors[j]``) plus the
number n-hat of leading positions that keep the original RoPE. The search space follows the paper: factors
on a grid of ``step`` between 1 and ``max_factor`` (1.25 x the extension factor), non-decreasing from the
highest to the lowest frequency (low frequencies need at least as much interpolation as high ones), and
n-hat from a small set. The initial population is seeded with Position Interpolation, NTK-aware and YaRN
factors at the same extension factor, then filled by mutation; each generation keeps the best ``parents``
and adds ``mutations`` mutated and ``crossovers`` crossed-over children, each new to the search.

Every evaluated candidate is appended to a JSONL log. The search is a pure function of its seed and the
objective, so rerunning it with the same log replays the finished part from the log without evaluating
anything and continues where it stopped (after an interruption, or with more generations or budget).

Based on Ding et al. 2024, LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens
(https://arxiv.org/abs/2402.13753), Section 3.2 and its reference implementation (microsoft/LongRoPE,
``evolution/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longkit.errors import MethodError
from longkit.eval.records import read_jsonl
from longkit.registry import check_params, param

#: n-hat values the paper searches (Ding et al. 2024, Section 3.2).
PAPER_START_TOKENS = [0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256]
#: Bump when the meaning of a log record changes; a log of another version is refused.
LOG_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: factor grid units per frequency (factor = 1 + units * step), and n-hat."""

    units: tuple[int, ...]
    start_tokens: int = 0

    def factors(self, step: float) -> list[float]:
        return [round(1.0 + u * step, 10) for u in self.units]

    def is_monotone(self) -> bool:
        return all(a <= b for a, b in zip(self.units, self.units[1:], strict=False))

    def key(self) -> str:
        return f"{self.start_tokens}|" + ",".join(map(str, self.units))


@dataclass
class SearchSettings:
    """Settings of one LongRoPE search; ranges are checked on construction.

    Parameters
    ----------
    n_freq: number of rotary frequencies (rotary dim / 2), >= 1.
    factor: extension factor, target length / trained length, > 1.
    population: size of the initial population, >= 2 (64 in the paper's code).
    parents: candidates kept each generation, 1..population (default population // 2).
    mutations: mutated children per generation, >= 0 (16 in the paper's code).
    crossovers: crossed-over children per generation, >= 0 (16 in the paper's code).
    generations: generations after the initial population, >= 0 (40 in the paper's code).
    budget_s: wall-clock budget in seconds (> 0); no evaluation starts that is expected to end past it.
    seed: random seed; the same seed and log replay the same search.
    step: grid step of the factors, > 0 (0.01 in the paper).
    max_factor: largest factor, >= factor (default 1.25 x factor, the paper's range).
    mutate_prob: probability that mutation resamples a given dimension, in (0, 1] (0.3 in the paper's code).
    start_tokens: n-hat values to search (each >= 0); ``[0]`` searches factors only.
    max_tries: attempts to find a new valid child before giving up on it, >= 1.
    """

    n_freq: int = param(ge=1, help="rotary frequencies (rotary dim / 2)")
    factor: float = param(gt=1.0, help="target length / trained length")
    population: int = param(16, ge=2, help="initial population size")
    parents: int | None = param(None, ge=1, help="candidates kept per generation (default population // 2)")
    mutations: int = param(8, ge=0, help="mutated children per generation")
    crossovers: int = param(8, ge=0, help="crossed-over children per generation")
    generations: int = param(8, ge=0, help="generations after the initial population")
    budget_s: float | None = param(None, gt=0, help="wall-clock budget in seconds")
    seed: int = param(0, help="random seed")
    step: float = param(0.01, gt=0, help="grid step of the factors")
    max_factor: float | None = param(None, gt=1.0, help="largest factor (default 1.25 x factor)")
    mutate_prob: float = param(0.3, gt=0, le=1, help="per-dimension mutation probability")
    start_tokens: list[int] = param(list(PAPER_START_TOKENS), help="n-hat values searched")
    max_tries: int = param(50, ge=1, help="attempts per child")
    kind = "rope"
    name = "longrope search"

    def __post_init__(self) -> None:
        check_params(self)
        if self.parents is None:
            self.parents = max(1, self.population // 2)
        if self.parents > self.population:
            raise MethodError(
                f"longrope search: parameter 'parents' must be <= population ({self.population}), got {self.parents}"
            )
        if self.max_factor is None:
            self.max_factor = 1.25 * self.factor
        if self.max_factor < self.factor:
            raise MethodError(
                f"longrope search: parameter 'max_factor' must be >= factor ({self.factor}), got {self.max_factor}"
            )
        if not self.start_tokens or any(n < 0 for n in self.start_tokens):
            raise MethodError(
                f"longrope search: parameter 'start_tokens' must be a non-empty list of ints >= 0, got {self.start_tokens}"
            )
        self.start_tokens = sorted(set(self.start_tokens))

    @property
    def max_units(self) -> int:
        return int(math.floor((self.max_factor - 1.0) / self.step + 1e-9))


def to_units(factors: list[float], settings: SearchSettings) -> tuple[int, ...]:
    """Factors snapped to the grid, clipped to [1, max_factor] and made non-decreasing (running maximum)."""
    out, top = [], 0
    for value in factors:
        unit = min(max(round((value - 1.0) / settings.step), 0), settings.max_units)
        top = max(top, unit)
        out.append(top)
    return tuple(out)


def seed_factors(
    *, head_dim: int, base: float, factor: float, trained_length: int, partial_rotary_factor: float = 1.0
) -> dict[str, list[float]]:
    """Per-frequency factors of PI, NTK-aware and YaRN at ``factor``: default inv_freq / the method's inv_freq."""
    from longkit.rope.frequencies import frequencies

    common = {"head_dim": head_dim, "base": base, "partial_rotary_factor": partial_rotary_factor}
    default, _ = frequencies("default", **common)
    out = {}
    for name, extra in (
        ("linear", {"factor": factor}),
        ("ntk", {"factor": factor}),
        ("yarn", {"factor": factor, "original_max_position_embeddings": trained_length}),
    ):
        inv_freq, _ = frequencies(name, **common, **extra)
        out[name] = (default / inv_freq).tolist()
    return out


@dataclass
class SearchResult:
    """The best candidate found and how the search went."""

    best: Candidate
    best_ppl: float
    factors: list[float]
    evaluated: int
    replayed: int
    generations_done: int
    best_per_generation: list[float]
    seconds: float
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)


class _OutOfBudget(Exception):
    pass


Objective = Callable[[Candidate], float]


class LongRopeSearch:
    """The evolutionary search. ``objective(candidate) -> perplexity`` (lower is better) does the evaluating.

    ``identity`` describes the objective (model, calibration text, target length...): a log written for
    another identity is refused rather than mixed in. ``on_event`` receives progress dicts
    (``{"event": "evaluated" | "replayed" | "generation", ...}``).
    """

    def __init__(
        self,
        settings: SearchSettings,
        objective: Objective,
        *,
        seeds: dict[str, list[float]],
        log_path: str | Path | None = None,
        identity: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.s = settings
        self.objective = objective
        # Seeds keep the smallest n-hat searched (0, no start tokens, by default).
        self.seeds = {
            name: Candidate(to_units(values, settings), settings.start_tokens[0]) for name, values in seeds.items()
        }
        for name, values in seeds.items():
            if len(values) != settings.n_freq:
                raise MethodError(
                    f"longrope search: seed '{name}' has {len(values)} factors, expected n_freq={settings.n_freq}"
                )
        self.log_path = Path(log_path) if log_path is not None else None
        self.identity = {
            "version": LOG_VERSION,
            "n_freq": settings.n_freq,
            "factor": settings.factor,
            "step": settings.step,
            "max_factor": settings.max_factor,
            **(identity or {}),
        }
        self.on_event = on_event or (lambda event: None)
        self.rng = random.Random(settings.seed)
        # key -> perplexity of every candidate ever scored (log included); membership = "already explored"
        self.scores: dict[str, float] = {}
        self._cached: dict[str, float] = self._read_log()
        self.history: list[dict[str, Any]] = []
        self._durations: list[float] = []
        self._t0 = 0.0
        self.replayed = 0
        self.evaluated = 0

    # -- the log -------------------------------------------------------------------------------------------
    def _read_log(self) -> dict[str, float]:
        cached: dict[str, float] = {}
        for record in [] if self.log_path is None else read_jsonl(self.log_path):
            if record.get("kind") == "identity":
                if record["identity"] != json.loads(json.dumps(self.identity)):
                    raise MethodError(
                        f"longrope search: parameter 'log' ({self.log_path}) belongs to another search "
                        f"({record['identity']}); use a new log file for {self.identity}"
                    )
            elif record.get("kind") == "candidate":
                ppl = record.get("ppl")
                cached[record["key"]] = math.inf if ppl is None else float(ppl)
        return cached

    def _append(self, record: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.log_path.is_file() or self.log_path.stat().st_size == 0
        with self.log_path.open("a") as fh:
            if new:
                fh.write(json.dumps({"kind": "identity", "identity": self.identity}) + "\n")
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    # -- scoring -------------------------------------------------------------------------------------------
    def _score(self, cand: Candidate, origin: str, generation: int) -> float:
        key = cand.key()
        if key in self.scores:
            return self.scores[key]
        if key in self._cached:
            ppl = self._cached[key]
            self.replayed += 1
            event = "replayed"
        else:
            if self.s.budget_s is not None:
                elapsed = time.monotonic() - self._t0
                expected = statistics.median(self._durations) if self._durations else 0.0
                if elapsed + expected > self.s.budget_s:
                    raise _OutOfBudget
            t0 = time.monotonic()
            ppl = float(self.objective(cand))
            seconds = time.monotonic() - t0
            if not math.isfinite(ppl):
                ppl = math.inf
            self._durations.append(seconds)
            self.evaluated += 1
            event = "evaluated"
            self._append(
                {
                    "kind": "candidate",
                    "key": key,
                    "ppl": ppl if math.isfinite(ppl) else None,
                    "start_tokens": cand.start_tokens,
                    "factors": cand.factors(self.s.step),
                    "origin": origin,
                    "generation": generation,
                    "seconds": round(seconds, 3),
                }
            )
        self.scores[key] = ppl
        self.history.append({"key": key, "ppl": ppl, "origin": origin, "generation": generation})
        self.on_event(
            {"event": event, "ppl": ppl, "origin": origin, "generation": generation, "best": min(self.scores.values())}
        )
        return ppl

    # -- operators -----------------------------------------------------------------------------------------
    def mutate(self, parent: Candidate) -> Candidate | None:
        """Resample each dimension with probability ``mutate_prob`` between its neighbours' values (so the
        factors stay non-decreasing), and n-hat with the same probability; a child new to the search, or None."""
        top = self.s.max_units
        for _ in range(self.s.max_tries):
            units = list(parent.units)
            for i in range(len(units)):
                if self.rng.random() < self.s.mutate_prob:
                    low = units[i - 1] if i > 0 else 0
                    high = units[i + 1] if i + 1 < len(units) else top
                    units[i] = self.rng.randint(low, high)
            start = parent.start_tokens
            if len(self.s.start_tokens) > 1 and self.rng.random() < self.s.mutate_prob:
                start = self.rng.choice(self.s.start_tokens)
            child = Candidate(tuple(units), start)
            if child.key() not in self.scores:
                return child
        return None

    def crossover(self, first: Candidate, second: Candidate) -> Candidate | None:
        """A child of ``first`` that takes some genes of ``second``: walk the dimensions (n-hat last), visit each
        with probability ``mutate_prob`` and take ``second``'s gene there with probability 1/2; the first state
        along the walk that is monotone and new is the child. None after ``max_tries`` walks.

        As the reference code (``DimMonoGeneticAlgorithm.crossover``): swapping genes one at a time keeps the
        child monotone far more often than drawing every gene from either parent, which between two distant
        parents almost never is."""
        if first == second:
            return None
        for _ in range(self.s.max_tries):
            units, start = list(first.units), first.start_tokens
            for i in range(len(units) + 1):
                if self.rng.random() >= self.s.mutate_prob:
                    continue
                if self.rng.random() < 0.5:
                    if i < len(units):
                        units[i] = second.units[i]
                    else:
                        start = second.start_tokens
                child = Candidate(tuple(units), start)
                if child not in (first, second) and child.is_monotone() and child.key() not in self.scores:
                    return child
        return None

    # -- the loop ------------------------------------------------------------------------------------------
    def _ranked(self, population: list[Candidate]) -> list[Candidate]:
        return sorted(set(population), key=lambda c: (self.scores[c.key()], c.key()))

    def run(self) -> SearchResult:
        self._t0 = time.monotonic()
        population: list[Candidate] = []
        best_per_generation: list[float] = []
        generations_done = 0
        stopped_by = "generations"
        try:
            for name, cand in self.seeds.items():
                self._score(cand, f"seed:{name}", 0)
                population.append(cand)
            seed_list = list(self.seeds.values())
            while len(population) < self.s.population:
                child = self.mutate(self.rng.choice(seed_list))
                if child is None:
                    break
                self._score(child, "mutation", 0)
                population.append(child)
            best_per_generation.append(self.scores[self._ranked(population)[0].key()])
            self.on_event({"event": "generation", "generation": 0, "best": best_per_generation[-1]})
            for generation in range(1, self.s.generations + 1):
                parents = self._ranked(population)[: self.s.parents]
                population = list(parents)
                for _ in range(self.s.mutations):
                    child = self.mutate(self.rng.choice(parents))
                    if child is not None:
                        self._score(child, "mutation", generation)
                        population.append(child)
                for _ in range(self.s.crossovers):
                    origin, child = "crossover", None
                    if len(parents) >= 2:
                        first, second = sorted(self.rng.sample(range(len(parents)), 2))
                        child = self.crossover(parents[first], parents[second])
                    if child is None:
                        # As the reference does: a failed crossover becomes a mutation of a parent.
                        origin, child = "mutation", self.mutate(self.rng.choice(parents))
                    if child is not None:
                        self._score(child, origin, generation)
                        population.append(child)
                generations_done = generation
                best_per_generation.append(self.scores[self._ranked(population)[0].key()])
                self.on_event({"event": "generation", "generation": generation, "best": best_per_generation[-1]})
        except _OutOfBudget:
            stopped_by = "budget"
        if not self.scores:
            raise MethodError(
                f"longrope search: parameter 'budget_s' ({self.s.budget_s}) left no time for a single evaluation"
            )
        best_key = min(self.scores, key=lambda k: (self.scores[k], k))
        start, units = best_key.split("|")
        best = Candidate(tuple(int(u) for u in units.split(",")), int(start))
        return SearchResult(
            best=best,
            best_ppl=self.scores[best_key],
            factors=best.factors(self.s.step),
            evaluated=self.evaluated,
            replayed=self.replayed,
            generations_done=generations_done,
            best_per_generation=best_per_generation,
            seconds=time.monotonic() - self._t0,
            stopped_by=stopped_by,
            history=self.history,
        )


# -- the perplexity objective on a real model --------------------------------------------------------------


def text_digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def calibration_windows(tokenizer: Any, text: str, length: int, windows: int) -> list[list[int]]:
    """``windows`` consecutive, non-overlapping windows of ``length`` tokens of ``text`` (BOS first if the
    tokenizer adds one, as the perplexity task does)."""
    from longkit.eval.prompt import chat_frame, encode

    ids = encode(tokenizer, text)
    head, _ = chat_frame(tokenizer, chat=False)
    body = length - len(head)
    if body * windows > len(ids):
        raise MethodError(
            f"longrope search: parameter 'calibration' has {len(ids)} tokens; {windows} window(s) of {length} "
            f"need {body * windows}; use a longer text, fewer windows or a shorter target length"
        )
    return [head + ids[i * body : (i + 1) * body] for i in range(windows)]


class PerplexityObjective:
    """Perplexity of the model with a candidate's LongRoPE factors, over the last ``score_fraction`` of each
    calibration window (so every scored token sees at least (1 - score_fraction) x target length of context).

    The candidate's factors become ``long_factor`` (the target length is past the trained length, so
    transformers uses them), ``short_factor`` stays all ones, and n-hat becomes ``start_tokens``.
    """

    def __init__(
        self,
        model: Any,
        windows: list[list[int]],
        *,
        factor: float,
        trained_length: int,
        step: float,
        score_fraction: float = 0.5,
    ):
        if not 0 < score_fraction <= 1:
            raise MethodError(f"longrope search: parameter 'score_fraction' must be in (0, 1], got {score_fraction}")
        self.model = model
        self.windows = windows
        self.factor = factor
        self.trained_length = trained_length
        self.step = step
        self.score_fraction = score_fraction

    def method(self, cand: Candidate) -> Any:
        from longkit.rope.longrope import LongRope

        n = len(cand.units)
        return LongRope(
            short_factor=[1.0] * n,
            long_factor=cand.factors(self.step),
            factor=self.factor,
            original_max_position_embeddings=self.trained_length,
            start_tokens=cand.start_tokens,
        )

    def __call__(self, cand: Candidate) -> float:
        from longkit.runtime.generate import window_nll

        undo = self.method(cand).apply(self.model)
        try:
            total, count = 0.0, 0
            for ids in self.windows:
                first = len(ids) - max(1, int(len(ids) * self.score_fraction))
                nll, n, _, _ = window_nll(self.model, ids, max(first, 1))
                total, count = total + nll, count + n
        finally:
            undo()
        return math.exp(total / count)


def rope_config(
    result: SearchResult,
    *,
    rope_theta: float,
    trained_length: int,
    factor: float,
    partial_rotary_factor: float | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON a search writes: ``rope_parameters`` as transformers reads them for rope_type ``longrope``
    (short_factor, long_factor, original_max_position_embeddings, factor, rope_theta), ``start_tokens`` beside
    them (honoured by ``--rope longrope:config=FILE``; transformers has no such setting) and the search record."""
    n = len(result.factors)
    rope = {
        "rope_type": "longrope",
        "rope_theta": rope_theta,
        "short_factor": [1.0] * n,
        "long_factor": result.factors,
        "original_max_position_embeddings": trained_length,
        "factor": factor,
    }
    if partial_rotary_factor is not None and partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = partial_rotary_factor
    return {
        "rope_parameters": rope,
        "start_tokens": result.best.start_tokens,
        "search": {
            "calibration_ppl": result.best_ppl,
            "evaluated": result.evaluated,
            "replayed": result.replayed,
            "generations_done": result.generations_done,
            "best_per_generation": result.best_per_generation,
            "stopped_by": result.stopped_by,
            "seconds": round(result.seconds, 1),
            "paper": "LongRoPE (Ding et al. 2024) https://arxiv.org/abs/2402.13753",
            **(meta or {}),
        },
    }


def search_model(
    lm: Any,
    *,
    target_length: int,
    calibration_text: str,
    settings: dict[str, Any] | None = None,
    windows: int = 1,
    score_fraction: float = 0.5,
    log_path: str | Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    model_name: str | None = None,
) -> tuple[SearchResult, dict[str, Any]]:
    """Run the search on a loaded model (``longkit.load_model``); returns the result and the rope config JSON.

    ``target_length`` must exceed the model's trained length (factor = target / trained > 1).
    """
    from longkit.models.introspect import head_dim_of
    from longkit.models.introspect import trained_length as trained_of
    from longkit.rope.base import require_rope

    model = lm.model
    config, old = require_rope(model, "longrope")
    if old.get("rope_type", "default") != "default":
        raise MethodError(
            f"longrope search needs a model with plain RoPE (rope_type 'default'); this one has {old['rope_type']!r}"
        )
    trained = trained_of(model)
    if target_length <= trained:
        raise MethodError(
            f"longrope search: parameter 'target_length' must be > the trained length {trained} (got {target_length})"
        )
    factor = target_length / trained
    head_dim = head_dim_of(config)
    partial = old.get("partial_rotary_factor", 1.0)
    n_freq = int(head_dim * partial) // 2
    s = SearchSettings(n_freq=n_freq, factor=factor, **(settings or {}))
    seeds = seed_factors(
        head_dim=head_dim, base=old["rope_theta"], factor=factor, trained_length=trained, partial_rotary_factor=partial
    )
    cal = calibration_windows(lm.tokenizer, calibration_text, target_length, windows)
    objective = PerplexityObjective(
        model, cal, factor=factor, trained_length=trained, step=s.step, score_fraction=score_fraction
    )
    identity = {
        "model": model_name or getattr(lm, "name", None),
        "dtype": str(next(model.parameters()).dtype),
        "target_length": target_length,
        "calibration": text_digest(calibration_text),
        "windows": windows,
        "score_fraction": score_fraction,
    }
    search = LongRopeSearch(s, objective, seeds=seeds, log_path=log_path, identity=identity, on_event=on_event)
    result = search.run()
    out = rope_config(
        result,
        rope_theta=old["rope_theta"],
        trained_length=trained,
        factor=factor,
        partial_rotary_factor=partial,
        meta={
            **identity,
            "seed_ppl": {name: search.scores[c.key()] for name, c in search.seeds.items() if c.key() in search.scores},
        },
    )
    return result, out


def parse_duration(text: str | float | int) -> float:
    """``"20m"`` -> 1200.0; ``"90s"``, ``"1.5h"``, ``"600"`` (seconds); a clear error naming ``budget`` otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:], None)
        try:
            value = float(raw[:-1]) * scale if scale else float(raw)
        except ValueError:
            value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise MethodError(
            f"longrope search: parameter 'budget' must be a duration > 0 such as 90s, 20m, 1h (got {text!r})"
        )
    return value
