import json

import pytest
import torch

import longkit
from longkit.errors import EvalError
from longkit.eval.records import SAMPLES_FILE, load_records, load_run
from longkit.eval.runner import EvalConfig, evaluate
from longkit.runtime.generate import greedy_generate


def config(tmp_path, **kw):
    base = dict(model="tiny-llama", methods=["baseline", "rope=yarn:factor=2"], tasks=["passkey", "needle", "perplexity"],
                lengths=[512, 641], depths=[0.0, 0.5], samples=2, run_dir=str(tmp_path / "run"))
    base.update(kw)
    return EvalConfig(**base)


def test_grid_records_costs_and_metadata(tmp_path, tiny_llama):
    cfg = config(tmp_path)
    run = evaluate(cfg, lm=tiny_llama, progress=False, argv=["longkit", "eval"])
    records = load_records(run)
    # 2 methods x 2 lengths x (passkey 2 depths x 2 samples + needle 2x2 + perplexity 2 samples)
    assert len(records) == 2 * 2 * (4 + 4 + 2)
    for r in records:
        assert r["n_tokens"] == r["length"]
        if r["task"] == "perplexity":
            assert r["score"] is None and r["n_targets"] > 0 and r["nll_sum"] > 0
        else:
            assert r["score"] in (0.0, 100.0)
            # float32 tiny Llama: 2 layers x (K and V) x 2 kv heads x head_dim 16 x T tokens x 4 bytes
            assert r["kv_bytes"] == 2 * 2 * 2 * 16 * r["length"] * 4
            assert r["prefill_s"] > 0 and 1 <= r["new_tokens"]
    # every method sees the same prompts
    by_key = {}
    for r in records:
        if r["task"] != "perplexity":
            by_key.setdefault((r["task"], r["length"], r["depth"], r["sample"]), set()).add(tuple(r["answer"]))
    assert all(len(v) == 1 for v in by_key.values())
    meta = load_run(run)
    assert meta["methods"] == ["baseline", "rope=yarn:factor=2"]
    assert meta["model"]["trained_length"] == 512 and meta["argv"] == ["longkit", "eval"]
    assert {"torch", "transformers", "longkit", "python"} <= set(meta["versions"])
    assert meta["hardware"]["cpu_count"] >= 1


def test_rerun_resumes_and_recomputes_only_what_is_missing(tmp_path, tiny_llama):
    cfg = config(tmp_path, tasks=["passkey"], methods=["baseline"])
    run = evaluate(cfg, lm=tiny_llama, progress=False)
    first = {r["id"]: r for r in load_records(run)}
    seen = []
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    assert seen == []
    # simulate a crash: drop the last two records and tear the line before them
    path = run / SAMPLES_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]) + lines[-3][:25])
    evaluate(cfg, lm=tiny_llama, progress=False, on_record=seen.append)
    assert len(seen) == 3
    again = {r["id"]: r for r in load_records(run)}
    assert again.keys() == first.keys()
    assert all(again[k]["prediction"] == first[k]["prediction"] for k in first)
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_run_dir_of_another_run_is_refused(tmp_path, tiny_llama):
    evaluate(config(tmp_path, tasks=["passkey"], methods=["baseline"], lengths=[512], depths=[0.5], samples=1),
             lm=tiny_llama, progress=False)
    with pytest.raises(EvalError, match="holds a run with seed=0, not 1"):
        evaluate(config(tmp_path, tasks=["passkey"], seed=1), lm=tiny_llama, progress=False)


def test_default_run_dir_is_stable_and_setting_dependent():
    a, b = EvalConfig(), EvalConfig()
    assert a.default_run_dir() == b.default_run_dir()
    assert EvalConfig(seed=1).default_run_dir() != a.default_run_dir()


@pytest.mark.parametrize(
    "kw,match",
    [({"lengths": [10]}, "'lengths' must be token counts >= 64"), ({"depths": [1.5]}, r"'depths' must be fractions"),
     ({"samples": 0}, "'samples' must be >= 1"), ({"tasks": ["nope"]}, "unknown task 'nope'"),
     ({"methods": ["rope=nope"]}, "unknown rope method 'nope'"), ({"methods": ["baseline", "baseline"]}, "twice")],
)
def test_bad_settings_are_clear_errors(tmp_path, tiny_llama, kw, match):
    with pytest.raises((EvalError, longkit.MethodError), match=match):
        evaluate(config(tmp_path, **kw), lm=tiny_llama, progress=False)


def test_greedy_generate_matches_transformers_generate(tiny_llama):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ids = tok("The pass key is 12345. What is the pass key?").input_ids
    gen = greedy_generate(model, ids, 10, None, eos_ids=set())
    ref = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert gen.tokens == ref[0, len(ids):].tolist()
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    gen2 = greedy_generate(model, ids, 10, cache, eos_ids=set())
    assert gen2.tokens == gen.tokens
    assert gen2.kv_bytes == 2 * 2 * 2 * 16 * len(ids) * 4
