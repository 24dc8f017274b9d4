"""The memory room's benchmark grid (benchmarks/memory/grid.py): its method rules, one run directory per (method,
bucket, task group) from a tiny eval, recorded skips, the table from the records, and the same-prompt check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from grid_records import check_rerender_and_doctored, load_script, record, run_script, write_run

SCRIPT = REPO / "benchmarks" / "memory" / "grid.py"
#: Tiny lengths for two buckets (tiny-llama's trained window is 512) and a small grid: 1 depth x 1 sample.
TINY = ["--model", "tiny-llama", "--lengths-override", "16k=1024,128k=768", "--tasks", "depth",
        "--samples-override", "1", "--depths-override", "0.5"]


@pytest.fixture(scope="module")
def grid():
    return load_script(SCRIPT)


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args)


def test_method_rules_follow_the_documented_choices(grid):
    from longkit.memory.infllm import InfLLM
    from longkit.seam import MethodSpec

    spec = {name: {b: m.spec(n) for b, n in grid.BUCKETS.items()} for name, m in grid.METHODS.items()}
    # NTK: x4 (the best measured at 16K), then enough to cover the length with the 8K window.
    assert [spec["ntk"][b] for b in grid.BUCKETS] == [f"rope=ntk:factor={f}" for f in (4, 4, 8, 16)]
    # SnapKV keeps InfLLM's working set (initial + local + top-k blocks) on the same NTK factor, chunked like InfLLM.
    m = InfLLM()
    budget = m.n_init + m.n_local + m.topk * m.block_size
    assert budget == 6272
    assert spec["snapkv"]["64k"] == f"rope=ntk:factor=8+kv=snapkv:tokens={budget}"
    assert grid.METHODS["snapkv"].prefill_chunk == grid.METHODS["infllm"].prefill_chunk == m.exec_chunk
    # LongLLMLingua gets NTK only where the compressed context reaches the trained window.
    assert spec["lingua4"]["16k"] == "memory=longllmlingua:ratio=4"
    assert spec["lingua4"]["32k"] == "rope=ntk:factor=4+memory=longllmlingua:ratio=4"
    assert spec["lingua8"]["32k"] == "memory=longllmlingua:ratio=8"
    assert spec["lingua8"]["128k"] == "rope=ntk:factor=4+memory=longllmlingua:ratio=8"
    # Self-Route falls back to the long-context comparison of its length.
    assert spec["self_route"]["64k"] == "rope=ntk:factor=8+memory=self_route"
    # Self-Extend: extend_32k's G=5, w=2048 (covers 32K), then the smallest group with (8K - 2K) * G + 2K >= length.
    groups = [5, 5, 11, 21]
    assert [spec["self_extend"][b] for b in grid.BUCKETS] == [
        f"attention=self_extend:group_size={g},window=2048" for g in groups
    ]
    for (bucket, n), g in zip(grid.BUCKETS.items(), groups, strict=True):
        assert (8192 - 2048) * g + 2048 >= n and (g == 5 or (8192 - 2048) * (g - 1) + 2048 < n), bucket
    # Every combination parses; the full-attention paths are skipped at 128K with a reason.
    for by_bucket in spec.values():
        for text in by_bucket.values():
            MethodSpec.parse(text)
    skips = [set(grid.METHODS[name].skip) for name in ("ntk", "self_route", "self_extend")]
    assert skips == [{"128k"}] * 3
    assert grid.METHODS["self_extend"].skip["128k"] == grid.SELF_EXTEND_128K


def test_dry_run_lists_every_step_and_writes_nothing(grid, tmp_path):
    r = _run("eval", "--buckets", "16k,32k,64k,128k", "--dry-run", "--results", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # 10 methods x (2 task groups at 16K and 32K, 1 at 64K and 128K), three of them skipped at 128K.
    assert len(lines) == 10 * 6
    skipped = sorted(line for line in lines if line.startswith("skip "))
    assert len(skipped) == 3 and all("128k-depth" in line for line in skipped)
    assert any(" --combo rope=ntk:factor=8+kv=snapkv:tokens=6272 " in line and "--prefill-chunk 512" in line
               and line.endswith("snapkv-64k-depth") for line in lines)
    assert any(" --combo attention=self_extend:group_size=11,window=2048 " in line
               and line.endswith("self_extend-64k-depth") for line in lines)
    assert not (tmp_path / "g").exists()


def test_tiny_grid_writes_run_dirs_renders_and_rerenders_byte_for_byte(grid, tmp_path):
    results = tmp_path / "grid"
    r = _run("eval", "--buckets", "16k", "--only", "pcw,ntk", *TINY, "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in results.iterdir()) == ["ntk-16k-depth", "pcw-16k-depth"]
    for name, label in (("ntk", "rope=ntk:factor=4"), ("pcw", "memory=pcw")):
        records = [json.loads(x) for x in (results / f"{name}-16k-depth" / "samples.jsonl").read_text().splitlines()]
        assert [(x["method"], x["task"], x["length"]) for x in records] == [(label, "passkey", 1024),
                                                                            (label, "needle", 1024)]
    # The skipped step writes its reason, runs nothing, and the table says so.
    r = _run("eval", "--buckets", "128k", "--only", "ntk", *TINY, "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = json.loads((results / "ntk-128k-depth" / grid.SKIPPED_FILE).read_text())
    assert skipped["reason"] == grid.NTK_128K and not (results / "ntk-128k-depth" / "samples.jsonl").exists()

    r = _run("render", "--results", str(results))
    assert r.returncode == 0, r.stderr
    text = (results / "table.md").read_text()
    assert "| PCW | `memory=pcw` |" in text and "| NTK (long context) | `rope=ntk:factor=4` |" in text
    assert "| method | passkey | needle | niah_single_2 | niah_multikey_1 | mean |" in text
    assert "| KV MiB | working set MiB | tokens processed |" in text
    assert f"Skipped at 128k: NTK (long context) ({grid.NTK_128K})." in text
    assert "| NTK (long context) | 1K | 128k | " in text
    summary = json.loads((results / "results.json").read_text())
    assert set(summary) == {"ntk", "pcw"} and summary["ntk"]["skipped"] == {"128k": grid.NTK_128K}
    assert summary["pcw"]["n"] == {"needle": {"1024": 1}, "passkey": {"1024": 1}}
    # Re-render byte for byte; a doctored record (another answer for the same prompt) fails the same-prompt check.
    check_rerender_and_doctored(grid, results, text, "pcw-16k-depth", "('passkey', 1024, 0.5, 0)")


def test_summary_costs_means_and_effective_length_from_records(grid, tmp_path):
    # RAG at 16K: passkey 100, needle 50, both RULER tasks 100 -> mean 87.5 > 85.6 (effective 16K); at 64K only the
    # depth tasks count: 100 and 0 -> 50, not effective.
    rag = "memory=rag:retriever=bm25"
    cost = {"retrieval_s": 1.0, "tokens_processed": 1100}
    depth16 = [record(rag, "passkey", 16384, 0.5, 0, 100.0, "1", **cost),
               record(rag, "needle", 16384, 0.5, 0, 100.0, "n", **cost),
               record(rag, "needle", 16384, 0.5, 1, 0.0, "n2", **cost)]
    ruler16 = [record(rag, t, 16384, None, 0, 100.0, t, **cost) for t in ("niah_single_2", "niah_multikey_1")]
    depth64 = [record(rag, "passkey", 65536, 0.5, 0, 100.0, "6", **cost),
               record(rag, "needle", 65536, 0.5, 0, 0.0, "m", **cost, memory_peak_mem_bytes=3 * 2**20)]
    write_run(tmp_path / "rag_bm25-16k-depth", depth16)
    write_run(tmp_path / "rag_bm25-16k-ruler", ruler16)
    write_run(tmp_path / "rag_bm25-64k-depth", depth64)
    # NTK at 16K asked the same prompts; no tokens_processed: prompt + answer.
    write_run(tmp_path / "ntk-16k-depth", [record("rope=ntk:factor=4", "passkey", 16384, 0.5, 0, 0.0, "1")])
    # InfLLM records its working set (initial + recent tokens) beside all of its KV (offloaded blocks included).
    write_run(tmp_path / "infllm-64k-depth", [record("memory=infllm", "passkey", 65536, 0.5, 0, 100.0, "6",
                                                     kv_bytes=1500 * 2**20, working_set_bytes=100 * 2**20)])
    # Effective length: known once every measured length has all its planned tasks. Self-Extend misses RULER at 16K,
    # where its mean could pass, so its failing 64K says nothing yet; Self-Route measured 64K only, fully: none.
    se, sr = "attention=self_extend:group_size=5,window=2048", "memory=self_route:retriever=bm25"
    write_run(tmp_path / "self_extend-16k-depth", [record(se, "passkey", 16384, 0.5, 0, 100.0, "1"),
                                                   record(se, "needle", 16384, 0.5, 0, 100.0, "n")])
    write_run(tmp_path / "self_extend-64k-depth", [record(se, "passkey", 65536, 0.5, 0, 0.0, "6"),
                                                   record(se, "needle", 65536, 0.5, 0, 0.0, "m")])
    write_run(tmp_path / "self_route-64k-depth", [record(sr, "passkey", 65536, 0.5, 0, 0.0, "6"),
                                                  record(sr, "needle", 65536, 0.5, 0, 0.0, "m")])
    text, summary = grid.table(tmp_path)
    assert "| Self-Extend (long context) | 16K, 64K | - | - |" in text
    assert "| Self-Route (BM25, NTK fall-back) | 64K | - | none |" in text
    assert summary["infllm"]["working"] == {"65536": 100 * 2**20} and summary["infllm"]["kv"] == {"65536": 1500 * 2**20}
    assert "| InfLLM | 100 | - | - | 2.5 | 1 | 1500 | 100 | 65540 |" in text
    rag_s = summary["rag_bm25"]
    assert rag_s["mean"] == {"16384": 87.5, "65536": 50.0} and rag_s["effective"] == 16384
    assert rag_s["seconds"]["16384"] == 3.5 and rag_s["tokens"]["65536"] == 1100
    assert rag_s["peak"]["65536"] == 3 * 2**20
    assert summary["ntk"]["tokens"] == {"16384": 16388} and summary["ntk"]["mean"] == {}
    assert "| RAG (BM25) | 100 | 50 | 100 | 100 | 88 | 3.5 | 1 | 1 | 1 | 1100 |" in text
    assert "| RAG (BM25) | 100 | 0 | 50 | 3.5 | 3 | 1 | 1 | 1100 |" in text
    assert "| RAG (BM25) | 16K, 64K | - | 16K |" in text and "| NTK (long context) | 16K | - | - |" in text
    # The accuracy-vs-cost figure: linked once a length has a mean, drawn from the summary as results.json holds it.
    assert f"![accuracy vs cost per length: seconds per sample and peak memory]({grid.PLOT})" in text
    assert grid.plot(summary, tmp_path / grid.PLOT) and (tmp_path / grid.PLOT).read_bytes()[:4] == b"\x89PNG"
    assert "matplotlib.pyplot" not in sys.modules  # drawn without pyplot (other tests check it never loads)
    # NTK measured one task at 16K: no RULER mean, but drawn at its measured mean (passkey 0 here).
    assert summary["ntk"]["measured_mean"] == {"16384": 0.0} and summary["rag_bm25"]["measured_mean"]["65536"] == 50.0
    assert not grid.plot({"pcw": {**summary["ntk"], "measured_mean": {}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()

    # A run with another seed asked other prompts: refused even where the answers happen to agree.
    write_run(tmp_path / "pcw-16k-depth", [record("memory=pcw", "passkey", 16384, 0.5, 0, 0.0, "1")], seed=1)
    with pytest.raises(SystemExit, match="disagree on seed"):
        grid.table(tmp_path)
