"""Gemma 3 270M's benchmark grid (benchmarks/models/gemma3_grid.py): its rows, every step listed by a dry run, one
bucket of two methods on tiny-gemma3 into run directories, the table from the records (re-rendered byte for byte),
the same-prompt check, and the prefill part's table."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO
from grid_records import check_rerender_and_doctored, load_script, record, run_script, write_run

SCRIPT = REPO / "benchmarks" / "models" / "gemma3_grid.py"
#: tiny-gemma3 (window 16, three sliding layers and one full) at 600 tokens for the 8K bucket, 1 depth x 1 sample.
TINY = ["--model", "tiny-gemma3", "--lengths-override", "8k=600,128k=700", "--samples-override", "1",
        "--depths-override", "0.5"]


@pytest.fixture(scope="module")
def grid():
    return load_script(SCRIPT)


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args)


def test_rows_follow_the_documented_choices(grid):
    from longkit.eval import ruler
    from longkit.eval.tasks import get_task
    from longkit.seam import MethodSpec

    # RULER's 13 tasks, qa as the offline stand-ins; every task name is registered.
    assert [t.replace("_synthetic", "") for t in grid.RULER] == ruler.TASKS
    for task in grid.RULER:
        get_task(task)
    specs = {name: m.at(grid.BUCKETS["32k"]) for name, m in grid.METHODS.items()}
    for text in specs.values():
        MethodSpec.parse(text)
    # RoPE scaling x2 / x4 on the full-attention layers only; Self-Extend reaches 128K from the 32K window.
    assert specs["yarn4"] == "rope=yarn:factor=4,layer_types=full_attention"
    assert specs["ntk2"] == "rope=ntk:factor=2,layer_types=full_attention"
    se = MethodSpec.parse(specs["self_extend"]).attention
    assert (grid.TRAINED - se.window) * se.group_size + se.window == grid.BUCKETS["128k"]
    assert MethodSpec.parse(specs["kivi"]).kv.bits == 4 and MethodSpec.parse(specs["snapkv"]).kv.ratio == 0.25
    # The KV rows keep their one-prefill protocol, their sliding layers banded; the others prefill in chunks.
    assert {n for n, m in grid.METHODS.items() if m.prefill_chunk is None} == {"snapkv", "kivi"}
    for name in ("snapkv", "kivi"):
        assert MethodSpec.parse(specs[name]).attention.name == "sliding_window"
        assert grid.METHODS[name].skip["128k"] == grid.METHODS["baseline"].skip["128k"]
    assert not any("64k" in m.skip for m in grid.METHODS.values())
    assert {n for n, m in grid.METHODS.items() if "128k" in m.skip} == {"baseline", "ntk2", "yarn2", "snapkv", "kivi"}


def test_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    r = _run("eval", "--dry-run", "--results", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # 9 methods x (depth and ppl at 5 buckets + ruler at 3); skipped: 5 rows (depth, ppl) at 128K, past their reach.
    assert len(lines) == 9 * 13
    assert sum(line.startswith("skip ") for line in lines) == 5 * 2
    ruler = [line for line in lines if line.endswith("yarn4-16k-ruler")]
    assert len(ruler) == 1 and ruler[0].count("--task ") == 13 and "--samples 5" in ruler[0]
    assert any("--combo attention=sliding_window+kv=kivi:bits=4 " in line and "--prefill-chunk" not in line
               and line.endswith("kivi-32k-depth") for line in lines)
    assert any("--no-default-methods" in line and "--prefill-chunk 4096" in line and line.endswith("baseline-64k-ppl")
               for line in lines)
    r = _run("prefill", "--dry-run", "--results", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 * 3 and sum("--model smollm2-135m " in line for line in lines) == 3
    assert not (tmp_path / "g").exists()


def test_tiny_grid_writes_run_dirs_renders_and_rerenders_byte_for_byte(grid, tmp_path):
    results = tmp_path / "gemma"
    r = _run("eval", "--buckets", "8k", "--only", "baseline,yarn4", "--tasks", "depth", *TINY, "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in results.iterdir()) == ["baseline-8k-depth", "yarn4-8k-depth"]
    for name, label in (("baseline", "baseline"), ("yarn4", "rope=yarn:factor=4,layer_types=full_attention")):
        records = [json.loads(x) for x in (results / f"{name}-8k-depth" / "samples.jsonl").read_text().splitlines()]
        assert [(x["method"], x["task"], x["length"]) for x in records] == [(label, "passkey", 600),
                                                                            (label, "needle", 600)]
    config = json.loads((results / "yarn4-8k-depth" / "run.json").read_text())["config"]
    assert config["model"] == "tiny-gemma3" and config["prefill_chunk"] == grid.CHUNK
    # A skipped step writes its reason and runs nothing.
    r = _run("eval", "--buckets", "128k", "--only", "baseline", "--tasks", "depth", *TINY, "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((results / "baseline-128k-depth" / "skipped.json").read_text())["reason"].startswith(
        "its reach ends at the trained 32K")

    r = _run("render", "--results", str(results))
    assert r.returncode == 0, r.stderr
    text = (results / "table.md").read_text()
    assert "| YaRN x4 (full layers) | `rope=yarn:factor=4,layer_types=full_attention` |" in text
    assert "| baseline | 600 | 128k | none | " in text
    assert "Skipped at 128k: baseline (its reach ends at the trained 32K" in text
    summary = json.loads((results / "results.json").read_text())
    assert set(summary) == {"baseline", "yarn4"} and summary["yarn4"]["n"] == {"needle": {"600": 1},
                                                                              "passkey": {"600": 1}}
    # Re-render byte for byte; a doctored record (another answer for the same prompt) fails the same-prompt check.
    check_rerender_and_doctored(grid, results, text, "yarn4-8k-depth", "('passkey', 600, 0.5, 0)")


def test_summary_ruler_average_perplexity_and_both_effective_lengths(grid, tmp_path):
    # DCA at 8K: passkey and needle 100 (retrieval mean 100), RULER 12 tasks at 100 and one at 0 (average 92.3 >
    # 85.6); at 16K RULER 50 on every task; perplexity from the pooled NLL of its windows.
    dca = grid.METHODS["dca"].spec
    write_run(tmp_path / "dca-8k-depth", [record(dca, t, 8192, 0.5, 0, 100.0, t) for t in grid.RETRIEVAL])
    write_run(tmp_path / "dca-8k-ruler", [record(dca, t, 8192, None, 0, 0.0 if t == "vt" else 100.0, t)
                                       for t in grid.RULER])
    write_run(tmp_path / "dca-16k-ruler", [record(dca, t, 16384, None, 0, 50.0, t) for t in grid.RULER])
    write_run(tmp_path / "dca-16k-depth", [record(dca, t, 16384, 0.5, 0, 100.0, t + "16") for t in grid.RETRIEVAL])
    write_run(tmp_path / "dca-8k-ppl", [record(dca, "perplexity", 8192, None, 0, None, "", nll_sum=4096.0,
                                             n_targets=4096)])
    text, summary = grid.table(tmp_path)
    s = summary["dca"]
    assert s["ruler"] == {"8192": pytest.approx(1200 / 13), "16384": 50.0} and s["ruler_effective"] == 8192
    assert s["mean"] == {"8192": 100.0, "16384": 100.0} and s["effective"] == 16384
    assert s["ppl"] == {"8192": pytest.approx(2.718281828)}
    # one sample of the 9 a passkey / needle cell asks for: the cell says so (a partial row reads as provisional)
    assert "| DCA (chunk 24576, local 4096) | 100 (1/9) | 100 (1/9) | 100 | 92.3 | 2.72 | 2.0 | 2.5 | 1 | 1 |" in text
    assert "| DCA (chunk 24576, local 4096) | 8K, 16K | - | 8K | 16K |" in text
    assert "**RULER at 16K**" in text
    # A run of another model asked other prompts: refused.
    write_run(tmp_path / "yarn4-8k-depth", [record("y", "passkey", 8192, 0.5, 0, 0.0, "passkey")], model="other")
    with pytest.raises(SystemExit, match="disagree on model"):
        grid.table(tmp_path)


def test_prefill_table_ratios_to_smollm2(grid, tmp_path):
    results = tmp_path / grid.PREFILL
    fast = {"prefill_s": 1.0, "peak_mem_bytes": 3 * 2**20}
    write_run(results / "gemma3_chunked-8k-prefill", [record("baseline", "passkey", 8192, 0.5, s, 100.0, "k", **fast)
                                                    for s in range(3)])
    write_run(results / "smollm2-8k-prefill", [record("baseline", "passkey", 8192, 0.5, s, 0.0, "j", prefill_s=p)
                                            for s, p in enumerate((4.0, 5.0, 9.0))], model="smollm2-135m")
    text, summary = grid.prefill_table(results)
    assert "| 8K | Gemma 3 270M, chunked prefill 4096 | 1.0 | 0.20 | 3 | 3.00 | 1 | 100 |" in text
    assert "| 8K | SmolLM2-135M, sdpa | 5.0 | 1.00 | 1 | 1.00 | 1 | 0 |" in text
    assert summary["smollm2"]["prefill_s"] == {"8192": 5.0}
