"""Perplexity under KV compression: teacher-forced chunks against the method's cache (issue #4)."""

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import longkit
from longkit.cli import app
from longkit.errors import EvalError
from longkit.eval.records import load_records
from longkit.eval.runner import EvalConfig, evaluate
from longkit.eval.tasks import TaskContext, get_task
from longkit.eval.tasks.perplexity import FULL
from longkit.runtime.generate import window_nll

# An odd window: 301 tokens, the last 150 scored.
LENGTH = 301


@pytest.fixture(scope="module")
def window(tiny_llama):
    return get_task("perplexity").window(TaskContext(tiny_llama.tokenizer), LENGTH, 0)


def score(lm, ids, first, method, chunk):
    with longkit.apply(lm.model, method) as applied:
        return get_task("perplexity").nll(lm.model, ids, first, applied, chunk)


@torch.inference_mode()
def reference_nll(lm, ids, first, method, chunk):
    """Independent loop: the full causal-LM forward of every chunk into the method's cache, logits of all positions."""
    model = lm.model
    tokens = torch.tensor([ids])
    total = 0.0
    with longkit.apply(model, method) as applied:
        cache = applied.new_cache()
        logits = []
        for start in range(0, len(ids), chunk):
            out = model(input_ids=tokens[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=0)
            cache = out.cache
            logits.append(out.logits[0].float())
        # (T, V): position t predicts token t+1
        logits = torch.cat(logits)
        total = torch.nn.functional.cross_entropy(logits[first - 1 : -1], tokens[0, first:], reduction="sum")
    return float(total)


@pytest.mark.parametrize("method", [None, "rope=yarn:factor=2", "attention=eager"])
def test_without_a_kv_method_the_window_is_scored_by_one_forward_as_before(tiny_llama, window, method):
    ids, first = window
    # the chunk is ignored without a KV method (not even checked)
    out = score(tiny_llama, ids, first, method, 10**9)
    with longkit.apply(tiny_llama.model, method):
        nll, n_targets, _, _ = window_nll(tiny_llama.model, ids, first)
    assert out["ppl_protocol"] == FULL and out["kv_bytes"] == 0 and out["kv_kept"] is None
    assert out["nll_sum"] == nll and out["n_targets"] == n_targets == LENGTH - first


@pytest.mark.parametrize(
    "method,chunk",
    [
        ("kv=snapkv:ratio=1", 7),
        ("kv=snapkv:ratio=1,decode_every=1", 1),
        ("kv=streaming_llm:ratio=1", 64),
        ("kv=knorm:ratio=1", 200),
        ("kv=kivi:bits=2,group_size=16,residual=1000", 300),
    ],
)
@pytest.mark.parametrize("lm", ["tiny_llama", "tiny_qwen2"])
def test_a_cache_that_keeps_everything_gives_the_one_forward_nll(request, lm, method, chunk):
    lm = request.getfixturevalue(lm)
    ids, first = get_task("perplexity").window(TaskContext(lm.tokenizer), LENGTH, 0)
    full, n_targets, _, _ = window_nll(lm.model, ids, first)
    out = score(lm, ids, first, method, chunk)
    assert out["ppl_protocol"] == f"chunked:{chunk}" and out["n_targets"] == n_targets
    assert math.isclose(out["nll_sum"], full, rel_tol=1e-6), (out["nll_sum"], full)
    # the cache kept every token of the window (KIVI: exact residual, no eviction)
    assert out["kv_kept"] in (None, 1.0) and out["kv_bytes"] > 0


def test_a_cache_that_keeps_everything_gives_the_one_forward_nll_in_bf16(tiny_llama, window):
    lm = copy.copy(tiny_llama)
    lm.model = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    ids, first = window
    full, _, _, _ = window_nll(lm.model, ids, first)
    out = score(lm, ids, first, "kv=snapkv:ratio=1", 37)
    assert math.isclose(out["nll_sum"], full, rel_tol=5e-3), (out["nll_sum"], full)


@pytest.mark.parametrize(
    "method,chunk,kept",
    [
        ("kv=snapkv:ratio=0.25", 64, 0.25),
        ("kv=knorm:ratio=0.25", 7, 0.25),
        ("kv=streaming_llm:ratio=0.25", 1, 0.25),
        ("kv=h2o:ratio=0.25", 50, 0.25),
        ("kv=kivi:bits=2,group_size=16,residual=0", 64, None),
        ("kv=kivi:bits=2,group_size=16,evict=snapkv,ratio=0.25", 64, 0.25),
    ],
)
def test_compression_changes_the_nll_as_the_chunked_reference_computes_it(tiny_llama, window, method, chunk, kept):
    ids, first = window
    full, _, _, _ = window_nll(tiny_llama.model, ids, first)
    out = score(tiny_llama, ids, first, method, chunk)
    assert math.isfinite(out["nll_sum"]) and out["ppl_protocol"] == f"chunked:{chunk}"
    # float noise between the two protocols is ~1e-4 here; compression moves the sum by far more
    assert abs(out["nll_sum"] - full) > 1e-2, (out["nll_sum"], full)
    assert math.isclose(out["nll_sum"], reference_nll(tiny_llama, ids, first, method, chunk), rel_tol=1e-6)
    # float32 tiny Llama: 2 layers x (K and V) x 2 kv heads x head_dim 16 x 4 bytes per token
    assert out["kv_bytes"] < 0.4 * 2 * 2 * 2 * 16 * 4 * LENGTH
    if kept is None:
        assert out["kv_kept"] is None
    else:
        assert out["kv_kept"] == pytest.approx(kept, abs=0.01)


@pytest.mark.parametrize("chunk", [0, -3, LENGTH, LENGTH + 1, 2.5, True, "64"])
def test_bad_chunk_names_the_parameter_and_range(tiny_llama, window, chunk):
    ids, first = window
    with pytest.raises(EvalError, match=r"parameter 'ppl_chunk' must be (an int >= 1|in \[1, 300\])"):
        score(tiny_llama, ids, first, "kv=snapkv:ratio=0.5", chunk)


def test_token_by_token_with_a_method_that_never_compresses_while_decoding_is_refused(tiny_llama, window):
    ids, first = window
    with pytest.raises(EvalError, match="'ppl_chunk' must be >= 2 tokens with kv method 'snapkv'.*decode_every=0"):
        score(tiny_llama, ids, first, "kv=snapkv:ratio=0.5", 1)


def test_config_checks_the_chunk_before_loading_a_model():
    base = dict(methods=["baseline", "kv=snapkv:ratio=0.25"], tasks=["perplexity"], lengths=[256, 1024])
    with pytest.raises(EvalError, match="parameter 'ppl_chunk' must be an int >= 1 tokens"):
        EvalConfig(**base, ppl_chunk=0).validate()
    # the default chunk (512) does not split a 256-token window
    with pytest.raises(EvalError, match=r"parameter 'ppl_chunk' must be in \[1, 255\] tokens"):
        EvalConfig(**base).validate()
    EvalConfig(**base, ppl_chunk=255).validate()
    # without a KV method (or without perplexity) the chunk is not used
    EvalConfig(methods=["baseline"], tasks=["perplexity"], lengths=[256]).validate()
    EvalConfig(methods=["kv=snapkv"], tasks=["passkey"], lengths=[256]).validate()
    # a non-default chunk is part of the run directory's name
    assert EvalConfig(ppl_chunk=64).default_run_dir() != EvalConfig().default_run_dir()


def test_runner_records_say_which_protocol_ran(tmp_path, tiny_llama, window):
    cfg = EvalConfig(
        model="tiny-llama",
        methods=["baseline", "kv=snapkv:ratio=0.25"],
        tasks=["perplexity"],
        lengths=[LENGTH],
        samples=1,
        ppl_chunk=64,
        run_dir=str(tmp_path / "run"),
    )
    run = evaluate(cfg, lm=tiny_llama, progress=False)
    records = {r["method"]: r for r in load_records(run)}
    ids, first = window
    full, _, _, _ = window_nll(tiny_llama.model, ids, first)
    assert records["baseline"]["ppl_protocol"] == "full" and records["baseline"]["nll_sum"] == full
    kv = records["kv=snapkv:ratio=0.25"]
    assert kv["ppl_protocol"] == "chunked:64" and kv["kv_bytes"] > 0 and abs(kv["nll_sum"] - full) > 1e-2
    assert kv["nll_sum"] == score(tiny_llama, ids, first, "kv=snapkv:ratio=0.25", 64)["nll_sum"]
    # the report says which protocol each method's perplexity comes from
    from longkit.eval.report import summarize

    per = summarize(run)["per_method"]
    assert per["baseline"]["perplexity"]["protocols"] == ["full"]
    assert per["kv=snapkv:ratio=0.25"]["perplexity"]["protocols"] == ["chunked:64"]
    # resuming into the same directory with another chunk would mix two protocols under one label
    cfg.ppl_chunk = 32
    with pytest.raises(EvalError, match="holds a run with ppl_chunk=64, not 32"):
        evaluate(cfg, lm=tiny_llama, progress=False)


def test_cli_exposes_the_chunk(tmp_path):
    run = tmp_path / "run"
    args = [
        "eval",
        "--model",
        "tiny-llama",
        "--task",
        "perplexity",
        "--kv",
        "knorm:ratio=0.5",
        "--no-baseline",
        "--lengths",
        "256",
        "--no-report",
        "--out",
        str(run),
    ]
    out = CliRunner().invoke(app, [*args, "--ppl-chunk", "100"])
    assert out.exit_code == 0, out.output
    record = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert record["ppl_protocol"] == "chunked:100"
    bad = CliRunner().invoke(app, [*args, "--ppl-chunk", "0"])
    assert bad.exit_code == 2 and "ppl_chunk" in bad.output
