"""kvpress, one prefill and many presses (benchmarks/kvcache/kvpress_sweep_runner.py): the replayed caches must equal
a real prefill inside ``with press(model)`` (the runner's --check), the records must parse, a rerun must resume.

The runner lives in its own venv (kvpress pins transformers < 5.3); these tests skip when that venv is absent
(create it with ``bash benchmarks/kvcache/kvpress_env.sh``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO
from grid_records import load_script

KVCACHE = REPO / "benchmarks" / "kvcache"
RUNNER = KVCACHE / "kvpress_sweep_runner.py"
PYTHON = KVCACHE / ".venv-kvpress" / "bin" / "python"

needs_kvpress = pytest.mark.skipif(not PYTHON.exists(), reason=f"no kvpress venv at {PYTHON.parent.parent}")

RUNS = [
    {"id": "snapkv@0.25", "press": "snapkv", "keep": 0.25, "kwargs": {"window_size": 16, "kernel_size": 5}},
    {"id": "streaming_llm@0.5", "press": "streaming_llm", "keep": 0.5, "kwargs": {"n_sink": 4}},
    {
        "id": "adakv@0.25",
        "press": "adakv",
        "keep": 0.25,
        "kwargs": {"inner": "snapkv", "inner_kwargs": {"window_size": 16}, "alpha_safeguard": 0.2},
    },
]


def _run(request: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(PYTHON), str(RUNNER), str(request), str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_kvpress
def test_check_passes_and_records_parse(tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny_llama.model.config.vocab_size, (64,), generator=g).tolist()
    request = tmp_path / "request.json"
    req = {
        "model_dir": str(model_dir),
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "prompts": [{"id": "p64", "ids": ids, "max_new_tokens": 6}],
        "runs": RUNS,
    }
    request.write_text(json.dumps(req))
    out = tmp_path / "out.jsonl"
    proc = _run(request, out, "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("| PASS |") == len(RUNS), proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_run = {r["run_id"]: r for r in records}
    assert set(by_run) == {"__prefill__"} | {r["id"] for r in RUNS}
    assert by_run["__prefill__"]["prompt_tokens"] == 64 and by_run["__prefill__"]["prefill_s"] > 0
    layers = tiny_llama.model.config.num_hidden_layers
    kv_row = 2 * tiny_llama.model.config.num_key_value_heads * tiny_llama.model.config.head_dim * 4  # fp32 K+V
    for run in RUNS:
        rec = by_run[run["id"]]
        assert rec["error"] is None and rec["check"]["pass"], rec
        assert len(rec["answer"]) == 6 and rec["answer"] == rec["check"]["real_answer"]
        assert rec["decode_tokens"] == 5
    # kvpress keeps int(64 * keep) positions per layer; AdaKV keeps all 64 and masks the rest per head
    assert by_run["snapkv@0.25"]["cache_lengths"] == [16] * layers
    assert by_run["snapkv@0.25"]["cache_bytes"] == layers * 16 * kv_row
    assert by_run["streaming_llm@0.5"]["cache_lengths"] == [32] * layers
    ada = by_run["adakv@0.25"]
    assert ada["cache_lengths"] == [64] * layers and ada["cache_bytes"] == layers * 64 * kv_row
    n_kv = tiny_llama.model.config.num_key_value_heads
    assert ada["masked_keys"] == [n_kv * (64 - 16)] * layers
    assert ada["effective_bytes"] == by_run["snapkv@0.25"]["cache_bytes"]

    # a rerun skips what is done and appends only the new run; a last line cut short by a kill is dropped
    req["runs"] = [*RUNS, {"id": "knorm@0.25", "press": "knorm", "keep": 0.25}]
    request.write_text(json.dumps(req))
    with open(out, "a") as f:
        f.write('{"prompt_id": "p64", "run_id": "knorm@0.25", "ans')
    proc = _run(request, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = [json.loads(line) for line in out.read_text().splitlines()][len(records) :]
    assert [r["run_id"] for r in new] == ["knorm@0.25"] and new[0]["cache_lengths"] == [16] * layers


def test_compare_snapshots_finds_one_changed_element():
    """The --check comparison is bit-exact: one changed key element, a shorter layer or a different mask fails."""
    runner = load_script(RUNNER)
    g = torch.Generator().manual_seed(0)
    # (B, H_kv, S, D) per layer
    keys = [torch.randn(1, 2, 9, 4, generator=g) for _ in range(2)]
    values = [torch.randn(1, 2, 9, 4, generator=g) for _ in range(2)]
    mask = (torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([3, 5]))
    snap = {"keys": keys, "values": values, "masks": [None, mask]}

    def copy(s):
        return {
            "keys": [t.clone() for t in s["keys"]],
            "values": [t.clone() for t in s["values"]],
            "masks": [None if m is None else tuple(t.clone() for t in m) for m in s["masks"]],
        }

    same = runner.compare_snapshots(snap, copy(snap))
    assert same["keys_equal"] and same["values_equal"] and same["masks_equal"] and same["first_bad_layer"] is None

    bad = copy(snap)
    bad["keys"][1][0, 1, 7, 2] += 1e-6
    res = runner.compare_snapshots(snap, bad)
    assert not res["keys_equal"] and res["values_equal"] and res["first_bad_layer"] == 1

    short = copy(snap)
    short["values"][0] = short["values"][0][:, :, :8]
    assert not runner.compare_snapshots(snap, short)["values_equal"]

    moved = copy(snap)
    moved["masks"][1] = (mask[0], mask[1], torch.tensor([3, 6]))
    assert not runner.compare_snapshots(snap, moved)["masks_equal"]

    facts = runner.cache_facts(snap)
    assert facts["cache_lengths"] == [9, 9] and facts["cache_bytes"] == 2 * 2 * 2 * 9 * 4 * 4
    assert facts["masked_keys"] == [0, 2] and facts["effective_bytes"] == facts["cache_bytes"] - 2 * 2 * 4 * 4
