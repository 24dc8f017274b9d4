"""The RoPE room benchmark's method grid and results table (benchmarks/rope/run.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO
from grid_records import load_script
from longkit.registry import registry

RUNNER = REPO / "benchmarks" / "rope" / "run.py"


@pytest.fixture(scope="module")
def run():
    return load_script(RUNNER)


def _lm(trained: int = 8192, theta: float = 1e5):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=trained,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})  # fmt: skip
    return SimpleNamespace(model=LlamaForCausalLM(cfg), trained_length=trained)


def _spec(specs: list[str], prefix: str) -> list[str]:
    return [s for s in specs if s.startswith(prefix)]


def test_grid_settings_follow_the_documented_rules(run):
    specs, skipped = run.method_grid(_lm(), [2.0, 4.0])
    assert skipped == []
    assert len(specs) == len(set(specs))
    # Self-Extend: window L/4 and the smallest group reaching f*L: (L - L/4) * G + L/4 >= f*L.
    for f, g in ((2, 3), (4, 5)):
        assert f"attention=self_extend:group_size={g},window=2048" in specs
        assert (8192 - 2048) * g + 2048 >= f * 8192 > (8192 - 2048) * (g - 1) + 2048
    # Leaky ReRoPE: leak 2f - 1 maps the farthest distance f*L back onto L with window L/2.
    assert _spec(specs, "attention=leaky_rerope") == [
        "attention=leaky_rerope:window=4096,leak=3", "attention=leaky_rerope:window=4096,leak=7"]  # fmt: skip
    for w, leak, f in ((4096, 3, 2), (4096, 7, 4)):
        assert w + (f * 8192 - w) / leak == 8192
    # ABF: the NTK-aware base of factor f for the rotary dimension d = 16.
    abf = [s for s in _spec(specs, "rope=abf:") if "+" not in s]
    assert abf == [f"rope=abf:rope_theta={1e5 * f ** (16 / 14):.6g}" for f in (2, 4)]
    assert "rope=abf:rope_theta=" + f"{1e5 * 4 ** (16 / 14):.6g}" + "+attention=entropy_scaling" in specs
    # Llama 3 keeps the model's trained window as the original length.
    assert "rope=llama3:factor=4,original_max_position_embeddings=8192" in specs
    # Every RoPE scaling method with a factor appears at both factors.
    for name in ("linear", "ntk", "dynamic", "yarn"):
        assert _spec(specs, f"rope={name}:") == [f"rope={name}:factor=2", f"rope={name}:factor=4"]
    for remap in ("rerope:window=4096", "lm_infinite:window=8192", "logn:trained=8192", "dca:chunk_size=6144"):
        assert any(s.startswith(f"attention={remap}") for s in specs), remap


def test_grid_skips_and_lists_methods_this_checkout_lacks(run, monkeypatch):
    real = registry

    def without_dca(kind):
        return [name for name in real(kind) if name != "dca"]

    monkeypatch.setattr(run, "registry", without_dca)
    specs, skipped = run.method_grid(_lm(), [2.0])
    assert skipped == ["dca"]
    assert not any("dca" in s for s in specs)


def _record(method: str, task: str, length: int, depth, score, prefill: float, peak: int, **extra) -> dict:
    rec = {"id": f"{method}|{task}|{length}|{depth}|0", "method": method, "task": task, "length": length,
           "depth": depth, "sample": 0, "n_tokens": length, "score": score, "prefill_s": prefill,
           "decode_s": 0.1, "peak_mem_bytes": peak, "kv_bytes": length * 10}  # fmt: skip
    rec.update(extra)
    return rec


def test_table_reports_accuracy_perplexity_and_costs_against_the_baseline(run, tmp_path):
    methods = ["baseline", "rope=yarn:factor=2"]
    tasks = ["passkey", "perplexity"]
    (tmp_path / "run.json").write_text(json.dumps({"methods": methods, "tasks": tasks, "lengths": [4096, 8192]}))
    recs = []
    for m, slow, hits in (("baseline", 1.0, {4096: [100, 100], 8192: [100, 0]}), ("rope=yarn:factor=2", 1.5, None)):
        for n in (4096, 8192):
            for i, depth in enumerate((0.25, 0.75)):
                score = hits[n][i] if hits else 100.0
                recs.append(_record(m, "passkey", n, depth, score, slow * n / 1000, int(slow * n * 1000)))
            # YaRN has not run 8K perplexity yet: its cell must read "-", not a number from another length.
            if m == "baseline" or n == 4096:
                # ln(ppl) = nll / targets: baseline ppl e^2 at both lengths, YaRN e^1.
                nll = (2.0 if m == "baseline" else 1.0) * 100
                recs.append(_record(m, "perplexity", n, None, None, slow * n / 1000, int(slow * n * 1000),
                                    nll_sum=nll, n_targets=100, ppl_protocol="full"))  # fmt: skip
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    summary = run.summarize(tmp_path)
    costs = run.cost_table(summary)
    table = run.markdown(summary, costs, summary["lengths"])
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["method", "passkey 4K", "passkey 8K", "ppl 4K", "ppl 8K", "prefill x 4K", "prefill x 8K",
                    "peak mem x 8K", "KV x"]  # fmt: skip
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in lines[2:]}
    assert rows["`baseline`"] == ["100", "50", f"{math.e**2:.2f}", f"{math.e**2:.2f}", "1.00", "1.00", "1.00", "1.00"]
    assert rows["`rope=yarn:factor=2`"] == ["100", "100", f"{math.e:.2f}", "-", "1.50", "1.50", "1.50", "1.00"]
