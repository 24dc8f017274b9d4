"""LongRoPE evolutionary search: constraints, elitism, resumable log, the config it writes, start tokens."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import longkit
from longkit.errors import MethodError
from longkit.eval.haystack import pydoc_text
from longkit.models.introspect import rotary_modules
from longkit.tools.longrope_search import (
    Candidate,
    LongRopeSearch,
    PerplexityObjective,
    SearchSettings,
    calibration_windows,
    parse_duration,
    search_model,
    seed_factors,
    to_units,
)

N = 8  # tiny models: head_dim 16 -> 8 rotary frequencies
TRAINED = 512  # tiny models' max_position_embeddings


def settings(**kw):
    base = {
        "n_freq": N,
        "factor": 2.0,
        "population": 6,
        "mutations": 4,
        "crossovers": 4,
        "generations": 4,
        "seed": 0,
        "step": 0.05,
        "start_tokens": [0, 2, 4],
    }
    return SearchSettings(**{**base, **kw})


def seeds():
    return seed_factors(head_dim=16, base=10000.0, factor=2.0, trained_length=TRAINED)


class Target:
    """A cheap objective with a known optimum: squared distance to a hidden monotone factor vector."""

    def __init__(self, step=0.05):
        self.goal = [1.0, 1.0, 1.1, 1.3, 1.6, 1.9, 2.2, 2.4]
        self.step = step
        self.calls = 0

    def __call__(self, cand: Candidate) -> float:
        self.calls += 1
        f = cand.factors(self.step)
        return 1.0 + sum((a - b) ** 2 for a, b in zip(f, self.goal, strict=True)) + 0.001 * cand.start_tokens


def test_seed_factors_are_pi_ntk_yarn():
    s = seeds()
    assert s["linear"] == pytest.approx([2.0] * N)
    # NTK-aware: the highest frequency kept, the lowest divided by exactly the factor
    assert s["ntk"][0] == pytest.approx(1.0) and s["ntk"][-1] == pytest.approx(2.0, rel=1e-5)
    assert all(a <= b + 1e-6 for a, b in zip(s["yarn"], s["yarn"][1:], strict=False))
    units = to_units(s["yarn"], settings())
    assert list(units) == sorted(units) and 0 <= units[0] and units[-1] <= settings().max_units


def test_mutation_and_crossover_keep_constraints():
    search = LongRopeSearch(settings(step=0.01), Target(0.01), seeds=seeds())
    rng = random.Random(1)
    pool = list(search.seeds.values())
    for _ in range(300):
        if rng.random() < 0.5:
            child = search.mutate(rng.choice(pool))
        else:
            a, b = rng.sample(pool, 2) if len(pool) > 1 else (pool[0], pool[0])
            child = search.crossover(a, b)
        if child is None:
            continue
        assert child.is_monotone(), child
        assert 0 <= child.units[0] and child.units[-1] <= search.s.max_units
        assert child.start_tokens in (0, 2, 4)
        assert child.key() not in search.scores
        search.scores[child.key()] = 1.0
        pool.append(child)
    assert len(pool) > 100


def test_crossover_between_distant_parents_takes_genes_of_both():
    # PI (every factor = 2) and NTK (1 .. 2) differ in almost every dimension: drawing each gene from either
    # parent is almost never monotone; swapping genes one at a time (as the reference code) nearly always is.
    search = LongRopeSearch(settings(step=0.01), Target(0.01), seeds=seeds())
    first, second = search.seeds["linear"], search.seeds["ntk"]
    children = [search.crossover(first, second) for _ in range(40)]
    made = [c for c in children if c is not None]
    assert len(made) >= 36
    for child in made:
        assert child.is_monotone() and child != first and child != second
        # every gene is one parent's, and the child is the first parent with some of the second's genes
        assert all(u in (a, b) for u, a, b in zip(child.units, first.units, second.units, strict=True))
        assert any(u == b != a for u, a, b in zip(child.units, first.units, second.units, strict=True))
    assert search.crossover(first, first) is None


def test_search_keeps_best_and_improves_on_the_seeds():
    target = Target()
    result = LongRopeSearch(settings(generations=8), target, seeds=seeds()).run()
    curve = result.best_per_generation
    assert len(curve) == 9 and all(b <= a for a, b in zip(curve, curve[1:], strict=False))
    assert curve[-1] < curve[0]
    assert result.best.is_monotone() and result.best_ppl == pytest.approx(target(result.best))
    assert result.stopped_by == "generations" and target.calls == result.evaluated + 1


def test_log_resumes_an_interrupted_search(tmp_path):
    log = tmp_path / "search.jsonl"
    full_target = Target()
    full = LongRopeSearch(settings(), full_target, seeds=seeds()).run()

    class Interrupt(Target):
        def __call__(self, cand):
            if self.calls == 11:
                raise KeyboardInterrupt
            return super().__call__(cand)

    with pytest.raises(KeyboardInterrupt):
        LongRopeSearch(settings(), Interrupt(), seeds=seeds(), log_path=log).run()
    assert sum(1 for line in log.read_text().splitlines() if '"candidate"' in line) == 11
    again = Target()
    resumed = LongRopeSearch(settings(), again, seeds=seeds(), log_path=log).run()
    # nothing evaluated twice, and the same search as without the interruption
    assert resumed.replayed == 11 and again.calls == full_target.calls - 11
    assert resumed.best == full.best and resumed.best_per_generation == full.best_per_generation
    # a log belongs to one objective
    with pytest.raises(MethodError, match="'log'.*another search"):
        LongRopeSearch(settings(), Target(), seeds=seeds(), log_path=log, identity={"model": "other"})


def test_budget_stops_the_search():
    class Slow(Target):
        def __call__(self, cand):
            import time

            time.sleep(0.02)
            return super().__call__(cand)

    result = LongRopeSearch(settings(budget_s=0.1, generations=50), Slow(), seeds=seeds()).run()
    assert result.stopped_by == "budget" and 1 <= result.evaluated < 20


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"factor": 1.0}, "'factor'.*> 1.0"),
        ({"population": 1}, "'population'.*>= 2"),
        ({"parents": 9}, "'parents' must be <= population"),
        ({"mutate_prob": 0.0}, "'mutate_prob'"),
        ({"start_tokens": [-1]}, "'start_tokens'"),
        ({"max_factor": 1.5}, "'max_factor' must be >= factor"),
        ({"step": 0}, "'step'"),
    ],
)
def test_bad_settings_name_the_parameter(kw, match):
    with pytest.raises(MethodError, match=match):
        settings(**kw)


def test_model_search_writes_a_config_that_longkit_and_transformers_load(tiny_llama, tmp_path):
    lm = tiny_llama
    text = pydoc_text()[:3000]
    with pytest.raises(MethodError, match="'target_length' must be > the trained length 512"):
        search_model(lm, target_length=512, calibration_text=text)
    with pytest.raises(MethodError, match="'calibration' has"):
        search_model(lm, target_length=1024, calibration_text=text[:500])
    result, out = search_model(
        lm,
        target_length=1024,
        calibration_text=text,
        log_path=tmp_path / "log.jsonl",
        settings={"population": 4, "generations": 1, "mutations": 1, "crossovers": 1, "start_tokens": [0, 4]},
    )
    rope = out["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["factor"] == 2.0
    assert rope["original_max_position_embeddings"] == TRAINED and rope["long_factor"] == result.factors
    assert min(rope["long_factor"]) >= 1.0 and rope["long_factor"] == sorted(rope["long_factor"])
    assert out["search"]["calibration_ppl"] <= min(out["search"]["seed_ppl"].values())
    path = tmp_path / "factors.json"
    path.write_text(json.dumps(out))

    model = lm.model
    # transformers' own longrope init on a config carrying the written rope_parameters
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = json.loads(path.read_text())["rope_parameters"]
    cfg.max_position_embeddings = 1024
    want_long, want_scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=TRAINED + 1)
    want_short, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None)
    with longkit.apply(model, rope=f"longrope:config={path},start_tokens=0"):
        rot = model.model.rotary_emb
        torch.testing.assert_close(rot.original_inv_freq, want_short, rtol=1e-6, atol=0)
        assert rot.attention_scaling == pytest.approx(want_scale)
        x = torch.zeros(1, 1, 16)
        rot(x, torch.tensor([[TRAINED + 3]]))
        torch.testing.assert_close(rot.inv_freq, want_long, rtol=1e-6, atol=0)

    # the file reproduces the calibration perplexity the search measured (start tokens included)
    windows = calibration_windows(lm.tokenizer, text, 1024, 1)
    objective = PerplexityObjective(model, windows, factor=2.0, trained_length=TRAINED, step=0.01)
    with longkit.apply(model, rope=f"longrope:config={path}") as applied:
        assert applied.spec.rope.n_start_tokens() == result.best.start_tokens
        ids = torch.tensor([windows[0]])
        with torch.inference_mode():
            logits = model(ids).logits[0, 511:-1].float()
        ppl = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 512:])))
    assert ppl == pytest.approx(result.best_ppl, rel=1e-4)
    assert objective(result.best) == pytest.approx(result.best_ppl, rel=1e-6)


def test_start_tokens_keep_the_original_rope_for_the_first_positions(tiny_llama):
    model = tiny_llama.model
    orig = rotary_modules(model)[0][2]
    x = torch.zeros(1, 1, 16)
    pos = torch.arange(700)[None]
    cos0, sin0 = orig(x, pos)
    spec = {"short_factor": [1.0] * N, "long_factor": [1.0 + 0.2 * i for i in range(N)], "factor": 2.0}
    with longkit.apply(model, rope="longrope", rope_args=spec):
        cos1, sin1 = model.model.rotary_emb(x, pos)
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    with longkit.apply(model, rope="longrope", rope_args={**spec, "start_tokens": 5}), torch.inference_mode():
        cos, sin = model.model.rotary_emb(x, pos)
        full = model(ids).logits
        # cached decoding: the first positions keep the original RoPE in the prefill, later ones are untouched
        out = model(ids[:, :590], use_cache=True)
        step = model(ids[:, 590:], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(cos[:, :5], cos0[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, :5], sin0[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(cos[:, 5:], cos1[:, 5:], rtol=0, atol=0)
    assert not torch.equal(cos0[:, 5:], cos1[:, 5:])
    torch.testing.assert_close(step, full[:, 590:], rtol=1e-4, atol=1e-4)
    with longkit.apply(model, rope="longrope", rope_args=spec), torch.inference_mode():
        assert not torch.allclose(model(ids).logits, full)
    # removed: the hook goes with the swapped module
    assert rotary_modules(model)[0][2] is orig


def test_config_errors(tiny_llama, tmp_path):
    bad = tmp_path / "theta.json"
    bad.write_text(
        json.dumps(
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 500.0,
                    "short_factor": [1.0] * N,
                    "long_factor": [2.0] * N,
                }
            }
        )
    )
    with pytest.raises(MethodError, match="searched at rope_theta=500.0"):
        longkit.apply(tiny_llama.model, rope=f"longrope:config={bad}")
    bad.write_text(
        json.dumps({"rope_parameters": {"short_factor": [1.0] * N, "long_factor": [2.0] * N}, "start_tokens": -3})
    )
    with pytest.raises(MethodError, match="'start_tokens' must be an int >= 0"):
        longkit.apply(tiny_llama.model, rope=f"longrope:config={bad}")
    bad.write_text("{not json")
    with pytest.raises(MethodError, match="'config' is not a JSON file"):
        longkit.apply(tiny_llama.model, rope=f"longrope:config={bad}")
    with pytest.raises(MethodError, match="'start_tokens'.*>= 0"):
        longkit.apply(
            tiny_llama.model,
            rope="longrope",
            rope_args={"short_factor": [1.0] * N, "long_factor": [2.0] * N, "start_tokens": -1},
        )


def test_parse_duration():
    assert parse_duration("20m") == 1200.0 and parse_duration("90s") == 90.0 and parse_duration("1.5h") == 5400.0
    assert parse_duration("600") == 600.0
    for bad in ("soon", "-5m", "0", "m"):
        with pytest.raises(MethodError, match="'budget' must be a duration > 0"):
            parse_duration(bad)


def test_cli_rope_search_writes_factors_and_resumes(tmp_path):
    from typer.testing import CliRunner

    from longkit.cli import app

    out = tmp_path / "factors.json"
    args = [
        "rope",
        "search",
        "--model",
        "tiny-llama",
        "--target-length",
        "1k",
        "--out",
        str(out),
        "--population",
        "3",
        "--generations",
        "1",
        "--mutations",
        "1",
        "--crossovers",
        "1",
        "--no-start-tokens",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    data = json.loads(out.read_text())
    assert data["rope_parameters"]["rope_type"] == "longrope" and data["start_tokens"] == 0
    assert data["search"]["evaluated"] == 5 and (tmp_path / "factors.log.jsonl").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["search"]["replayed"] == 5
    assert json.loads(out.read_text())["search"]["evaluated"] == 0
    bad = CliRunner().invoke(app, [*args, "--budget", "soon"])
    assert bad.exit_code == 2 and "'budget' must be a duration" in bad.output
    short = CliRunner().invoke(app, [*args[:5], "512", *args[6:]])
    assert short.exit_code == 2 and "'target_length' must be > the trained length" in short.output
