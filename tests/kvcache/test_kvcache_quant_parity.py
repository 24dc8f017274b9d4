"""The kvpress parity harness (benchmarks/kvcache/kvpress_parity.py): its comparison helpers, and, when the kvpress
venv exists (bash benchmarks/kvcache/kvpress_env.sh), one real round trip against kvpress 0.5.5."""

from __future__ import annotations

import pytest
import torch

import longkit
from conftest import REPO
from grid_records import load_script

BENCH = REPO / "benchmarks" / "kvcache"


def _harness():
    return load_script(BENCH / "kvpress_parity.py")


def test_comparison_helpers():
    h = _harness()
    assert h.jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert h.jaccard([], []) == 1.0
    out = h.compare_kept([[[0, 1, 2], [5, 6]]], [[[0, 1, 2], [5, 7]]])
    assert out["identical_heads"] == 0.5 and out["jaccard_min"] == pytest.approx(1 / 3)
    assert out["kept_longkit"] == [3, 2] == out["kept_kvpress"]
    with pytest.raises(ValueError, match="different numbers of layers or heads"):
        h.compare_kept([[[0]]], [[[0], [1]]])
    assert h.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_match_rows_finds_kept_positions_and_rejects_modified_keys():
    h = _harness()
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 10, 4, generator=g)
    keep = [[7, 1, 3], [0, 9, 4]]
    stored = torch.stack([ref[i, idx] for i, idx in enumerate(keep)])
    assert h.match_rows(ref, stored) == [sorted(k) for k in keep]
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert h.match_rows(ref, stored, valid) == [[3, 7], [0, 4, 9]]
    with pytest.raises(ValueError, match="matches no uncompressed row"):
        h.match_rows(ref, stored + 1e-3)


def test_ties_only_detects_equal_key_norms():
    h = _harness()
    # (1, H_kv=1, S=4, D=2) keys: positions 1 and 2 have the same norm
    keys = [torch.tensor([[[[3.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]]]])]
    assert h.ties_only(keys, [[[3, 1]]], [[[3, 2]]])
    assert not h.ties_only(keys, [[[3, 1]]], [[[3, 0]]])


def test_markdown_reports_rows_and_explanations():
    h = _harness()
    rows = h.compare(
        [
            {
                "id": "snapkv@0.5",
                "method": "snapkv",
                "keep": 0.5,
                "kept": [[[0, 1]]],
                "answer": [4, 5],
                "error": None,
                "cache_lengths": [2],
            }
        ],
        [{"id": "snapkv@0.5", "kept": [[[0, 1]]], "answer": [4, 5], "error": None, "cache_lengths": [2]}],
    )
    meta = {
        "model": "tiny-llama",
        "prompt_tokens": 4,
        "new_tokens": 2,
        "kvpress_versions": {"kvpress": "0.5.5"},
        "longkit_transformers": "5.24.0",
        "torch": "2.13.0",
        "command": "x",
    }
    md = h.markdown(rows, meta)
    assert "| snapkv | 0.5 | 2.0 / 2.0 | 1.000 | 1.000 | 100% | yes (2) |" in md
    assert "## Differences explained" in md and "**snapkv**" in md


@pytest.mark.skipif(
    not (BENCH / ".venv-kvpress" / "bin" / "python").exists(),
    reason="no kvpress venv (bash benchmarks/kvcache/kvpress_env.sh)",
)
def test_snapkv_and_tova_keep_exactly_the_positions_kvpress_keeps(tmp_path):
    h = _harness()
    lm = longkit.load_model("tiny-llama")
    prompt = h.build_prompt(lm.tokenizer, 160)
    pairs = [p for p in h.PAIRS if p["method"] in ("snapkv", "tova")]
    lm.model.save_pretrained(tmp_path)
    theirs = h.run_kvpress(h.DEFAULT_VENV, str(tmp_path), prompt, pairs, [0.25], 4, timeout=600)
    assert theirs["versions"]["kvpress"] == "0.5.5" and theirs["versions"]["transformers"].startswith("5.2")
    ours = h.run_longkit(lm, prompt, pairs, [0.25], 4, h.uncompressed_keys(lm.model, prompt))
    for row in h.compare(ours, theirs["results"]):
        assert row["longkit_error"] is None and row["kvpress_error"] is None, row
        assert row["kept_longkit"] == row["kept_kvpress"] == [40] * 4
        assert row["identical_heads"] == 1.0, row["id"]
        assert row["answer_match"], row["id"]
