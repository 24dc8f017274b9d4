"""Every committed benchmark table re-renders byte for byte from its committed records.

Each case calls the render-only entry point of the script that wrote the table (the function behind its
``--render`` / ``--report`` / ``--write`` flag) on the records committed beside it, and compares the text with
the committed file. Nothing is re-measured and nothing is written. The tables that cannot be re-rendered this
way are listed, with the reason, in benchmarks/README.md.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO
from grid_records import load_script

BENCH = REPO / "benchmarks"


def _script(path: str):
    """Load benchmarks/<path> as a module (the scripts are not a package)."""
    return load_script(BENCH / path)


def _json(path: str) -> dict:
    return json.loads((BENCH / path).read_text())


def _prefill(stem: str) -> str:
    notes = BENCH / f"attention/results/{stem}.notes.md"
    return _script("attention/prefill.py").markdown(_json(f"attention/results/{stem}.json"), notes)


def _seqpar() -> str:
    data = _json("attention/results/seqpar.json")
    return _script("attention/seqpar.py")._markdown(data["meta"], data["rows"])


def _minference(name: str) -> str:
    search = _script("attention/minference_search.py")
    found = _json(f"attention/results/{name}.json")
    return search.summary(found, search.header(found["meta"], name))


def _sparse() -> str:
    table = _script("attention/sparse_table.py")
    return table.table(table.load(BENCH / "attention/results/sparse_16k"), "rope=ntk:factor=4")


def _meta_rows(script: str, results: str, render: str = "markdown") -> str:
    data = _json(results)
    return getattr(_script(script), render)(data["meta"], data["rows"])


def _kivi() -> str:
    data = _json("kvcache/results/kivi_quality.json")
    notes = BENCH / "kvcache/results/kivi_quality.notes.md"
    return _script("kvcache/kivi_quality.py").markdown(data["meta"], data["rows"], notes)


def _kvpress_parity(stem: str) -> str:
    data = _json(f"kvcache/results/{stem}.json")
    return _script("kvcache/kvpress_parity.py").markdown(data["rows"], data["meta"])


def _grid() -> str:
    return _script("kvcache/grid.py").grid_markdown(BENCH / "kvcache/results/grid/smollm2-135m")


def _rope_grid() -> str:
    run = _script("rope/run.py")
    summary = run.summarize(BENCH / "rope/results/smollm2-135m/run")
    return run.markdown(summary, run.cost_table(summary), summary["lengths"])


def _ruler(name: str) -> str:
    run = _script("ruler/run.py")
    return run.table(run.summarize(BENCH / "ruler/results" / name)) + "\n"


# committed table -> how to re-render it from the committed records
TABLES = {
    "attention/results/prefill.md": lambda: _prefill("prefill"),
    "attention/results/prefill_64k.md": lambda: _prefill("prefill_64k"),
    "attention/results/prefill_cpu_paths.md": lambda: _prefill("prefill_cpu_paths"),
    "attention/results/seqpar.md": _seqpar,
    "attention/results/sliding_prefill.md": lambda: _script("attention/sliding_prefill.py").markdown(
        _json("attention/results/sliding_prefill.json")
    ),
    "attention/results/minference_smollm2_16k.md": lambda: _minference("minference_smollm2_16k"),
    "attention/results/sparse_16k/table.md": _sparse,
    "decode/results/decode_smollm2.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_smollm2.json")
    ),
    "decode/results/decode_compiled.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_compiled.json")
    ),
    "decode/results/decode_floor.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_floor.json")
    ),
    "decode/results/decode_kivi_read.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_kivi_read.json")
    ),
    "decode/results/decode_q4_kivi.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_q4_kivi.json")
    ),
    "decode/results/decode_kivi_paired.md": lambda: _script("decode/paired_steps.py").markdown(
        _json("decode/results/decode_kivi_paired.json")
    ),
    "decode/results/compiled_ab_8k.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_8k.json")
    ),
    "decode/results/compiled_ab_gemv_2k.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_gemv_2k.json")
    ),
    "decode/results/compiled_ab_gemv_8k.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_gemv_8k.json")
    ),
    "decode/results/compiled_ab_gemv_2k_r2.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_gemv_2k_r2.json")
    ),
    "decode/results/compiled_ab_gemv_8k_r2.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_gemv_8k_r2.json")
    ),
    "decode/results/gemv_bandwidth.md": lambda: _script("decode/gemv_bandwidth.py").markdown(
        _json("decode/results/gemv_bandwidth.json")
    ),
    "decode/results/attend_kernel.md": lambda: _script("decode/attend_kernel.py").markdown(
        _json("decode/results/attend_kernel.json")
    ),
    "decode/results/attend_kernel_quiet.md": lambda: _script("decode/attend_kernel.py").markdown(
        _json("decode/results/attend_kernel_quiet.json")
    ),
    "decode/results/kivi_kernel.md": lambda: _script("decode/kivi_kernel.py").markdown(
        _json("decode/results/kivi_kernel.json")
    ),
    "decode/results/decode_floor_blocked.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_floor_blocked.json")
    ),
    "decode/results/decode_kivi_compiled.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_kivi_compiled.json")
    ),
    "decode/results/compiled_ab_gemv_8k_quiet.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_gemv_8k_quiet.json")
    ),
    "decode/results/compiled_ab_profile_8k_quiet.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_profile_8k_quiet.json")
    ),
    "decode/results/compiled_ab_concat_8k_quiet.md": lambda: _script("decode/compiled_ab.py").markdown(
        _json("decode/results/compiled_ab_concat_8k_quiet.json")
    ),
    "decode/results/decode_floor_concat.md": lambda: _script("decode/decode.py").markdown(
        _json("decode/results/decode_floor_concat.json")
    ),
    "models/results/gemma3_chunked_check.md": lambda: _script("models/gemma3_chunked_check.py").markdown(
        _json("models/results/gemma3_chunked_check.json")
    ),
    "models/results/gemma3-270m/table.md": lambda: _script("models/gemma3_grid.py").table()[0],
    "memory/results/grid/table.md": lambda: _script("memory/grid.py").table()[0],
    "models/results/gemma3-270m/prefill/table.md": lambda: _script("models/gemma3_grid.py").prefill_table(
        BENCH / "models/results/gemma3-270m/prefill"
    )[0],
    "models/results/gemma3_kv_prefill_check.md": lambda: _script("models/gemma3_kv_prefill_check.py").markdown(
        _json("models/results/gemma3_kv_prefill_check.json")
    ),
    "models/results/gemma3_kv_prefill_check_float32.md": lambda: _script("models/gemma3_kv_prefill_check.py").markdown(
        _json("models/results/gemma3_kv_prefill_check_float32.json")
    ),
    "kvcache/results/chunked_prefill_memory.md": lambda: _meta_rows(
        "kvcache/chunked_prefill_memory.py", "kvcache/results/chunked_prefill_memory.json"
    ),
    "kvcache/results/kivi_quality.md": _kivi,
    "kvcache/results/kvpress_parity.md": lambda: _kvpress_parity("kvpress_parity"),
    "kvcache/results/kvpress_parity_smollm2-135m.md": lambda: _kvpress_parity("kvpress_parity_smollm2-135m"),
    "kvcache/results/snapkv_parity_smollm2-135m.md": lambda: _meta_rows(
        "kvcache/snapkv_window_sweep.py", "kvcache/results/snapkv_parity_smollm2-135m.json", "parity_md"
    ),
    "kvcache/results/snapkv_sweep_smollm2-135m.md": lambda: _meta_rows(
        "kvcache/snapkv_window_sweep.py", "kvcache/results/snapkv_sweep_smollm2-135m.json", "sweep_md"
    ),
    "kvcache/results/grid/smollm2-135m/grid.md": _grid,
    "rope/results/smollm2-135m/table.md": _rope_grid,
    "ruler/results/smollm2-4k/ruler.md": lambda: _ruler("smollm2-4k"),
    "ruler/results/smollm2-8k/ruler.md": lambda: _ruler("smollm2-8k"),
    "ruler/results/smollm2-4k-baseline/ruler.md": lambda: _ruler("smollm2-4k-baseline"),
    "ruler/results/smollm2-4k-baseline-snapkv/ruler.md": lambda: _ruler("smollm2-4k-baseline-snapkv"),
    "train/results/longlora_8k.md": lambda: _meta_rows("train/longlora_8k.py", "train/results/longlora_8k.json"),
    "train/results/chunked_ce_head.md": lambda: _meta_rows("train/chunked_ce.py", "train/results/chunked_ce_head.json"),
    "train/results/chunked_ce.md": lambda: _meta_rows("train/chunked_ce.py", "train/results/chunked_ce.json"),
    "train/results/s2_attn_speed.md": lambda: _script("train/s2_attn_speed.py").markdown(
        **_json("train/results/s2_attn_speed.json"), notes=BENCH / "train/results/s2_attn_speed.notes.md"
    ),
    "train/results/s2_attn_speed_1thread.md": lambda: _meta_rows(
        "train/s2_attn_speed.py", "train/results/s2_attn_speed_1thread.json"
    ),
    "train/results/s2_attn_speed_passive.md": lambda: _meta_rows(
        "train/s2_attn_speed.py", "train/results/s2_attn_speed_passive.json"
    ),
    "train/results/extend_32k/table.md": lambda: _script("train/extend_32k.py").table()[0],
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_committed_table_rerenders_byte_for_byte(table):
    modules = set(sys.modules)
    try:
        assert TABLES[table]() == (BENCH / table).read_text(encoding="utf-8")
    finally:
        # snapkv_window_sweep puts its folder on sys.path and imports kvpress_parity by name: leave no trace.
        for name in set(sys.modules) - modules:
            if name == "kvpress_parity":
                del sys.modules[name]
        if str(BENCH / "kvcache") in sys.path:
            sys.path.remove(str(BENCH / "kvcache"))


def test_moba_recall_table_rerenders_from_its_records():
    """The 32K run's JSON predates the key's token span and the dense answer in the header: the layer table
    and the mean recalls re-render, the two header lines do not (listed as such in benchmarks/README.md)."""
    moba = _script("attention/moba_recall.py")
    committed = (BENCH / "attention/results/moba_recall_32k.md").read_text(encoding="utf-8")
    table = committed[committed.index("| layer |") :]
    assert "\n".join(moba.table_lines(_json("attention/results/moba_recall_32k.json"))) + "\n" == table
