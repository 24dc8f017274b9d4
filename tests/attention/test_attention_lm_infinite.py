"""LM-Infinite: the position matrix against the reference code's rules, the blockwise attention against the
explicit relative-position reference and against the Λ-mask + stationary-branch formulation of
``Glaciohound/LM-Infinite``, the model seam with token-by-token decoding, bad input, and bounded memory."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import INV_FREQ, LargestTensor, qkv

import longkit
from conftest import sample_ids
from longkit.attention import lm_infinite as lmi
from longkit.attention.lm_infinite import lm_infinite_attention
from longkit.attention.naive import lm_infinite_reference
from longkit.errors import MethodError
from longkit.registry import REGISTRIES
from longkit.rope import relative_positions
from longkit.rope.rotation import rotate_by

# (T, S, H_kv, window, n_sinks, block): odd lengths, decoding, queries after a cache, GQA, no sinks, more
# sinks than the window, a window longer than the sequence.
SHAPES = [
    (37, 37, 2, 5, 2, 16),
    (63, 63, 1, 16, 4, 16),
    (1, 50, 2, 7, 3, 16),
    (1, 50, 1, 9, 0, 16),
    (10, 61, 2, 8, 20, 32),
    (61, 61, 2, 100, 4, 16),
    (129, 129, 2, 24, 10, 48),
]


def test_positions_by_hand():
    rel = relative_positions("lm_infinite", 10, window=3, n_sinks=2)
    # query 9: sinks 0, 1 at the cap 3, keys 7..9 at their distance, the middle hidden
    assert rel[9].tolist() == [3, 3, -1, -1, -1, -1, -1, 2, 1, 0]
    # query 3: key 0 at distance 3 >= L is a sink at the cap; keys 1..3 inside the window
    assert rel[3, :5].tolist() == [3, 2, 1, 0, -1]


@pytest.mark.parametrize(
    "T,S,H_kv,L,n,block", SHAPES, ids=[f"T{x[0]}-S{x[1]}-Hkv{x[2]}-L{x[3]}-n{x[4]}" for x in SHAPES]
)
def test_blockwise_matches_the_reference_fp32(T, S, H_kv, L, n, block):
    q, k, v = qkv(T, S, H_kv)
    out, lse = lm_infinite_attention(q, k, v, INV_FREQ, L, n, block_q=block, block_k=block)
    ref, ref_lse = lm_infinite_reference(q, k, v, INV_FREQ, L, n)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_blockwise_bf16_is_close_to_the_fp32_reference():
    q, k, v = qkv(63, 63, 2, dtype=torch.bfloat16)
    out, _ = lm_infinite_attention(q, k, v, INV_FREQ, 9, 3, block_q=16, block_k=16)
    ref, _ = lm_infinite_reference(q.float(), k.float(), v.float(), INV_FREQ, 9, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.03)


def test_matches_the_lambda_mask_with_a_stationary_sink_branch():
    # Glaciohound/LM-Infinite (models/llama.py, the plain path): rotated scores inside the window
    # (triu(-L + 1)), plus "stationary" scores of the query rotated at L against un-rotated keys where the
    # distance is >= L, kept only for the first n_global keys.
    T, L, n = 45, 8, 3
    g = torch.Generator().manual_seed(5)
    q_raw, k_raw, v = (torch.randn(1, 2, T, 16, generator=g) for _ in range(3))
    pos = torch.arange(T).float()
    q = rotate_by(q_raw, torch.zeros(T), pos, INV_FREQ)
    k = rotate_by(k_raw, torch.zeros(T), pos, INV_FREQ)
    q_stat = rotate_by(q_raw, torch.zeros(T), torch.full((T,), float(L)), INV_FREQ)
    d = pos[:, None] - pos[None, :]
    local = (d >= 0) & (d < L)
    stationary = (d >= L) & (torch.arange(T)[None, :] < n)
    scores = torch.where(local, q @ k.transpose(-1, -2), q_stat @ k_raw.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~(local | stationary), float("-inf"))
    want = torch.softmax(scores, -1) @ v
    got, _ = lm_infinite_attention(q, k, v, INV_FREQ, L, n, block_q=16, block_k=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_sinks_is_sliding_window_attention_and_a_long_window_is_plain():
    from longkit.attention import MaskSpec, reference_attention

    q, k, v = qkv(40, 40, 2)
    window, _ = reference_attention(q, k, v, MaskSpec(causal=True, window=6))
    torch.testing.assert_close(
        lm_infinite_attention(q, k, v, INV_FREQ, 6, 0, block_q=16, block_k=16)[0], window, rtol=1e-5, atol=1e-5
    )
    plain, _ = reference_attention(q, k, v, MaskSpec())
    torch.testing.assert_close(lm_infinite_attention(q, k, v, INV_FREQ, 40, 4)[0], plain, rtol=1e-5, atol=1e-5)
    assert (lm_infinite_reference(q, k, v, INV_FREQ, 6, 4)[0] - plain).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_model_blockwise_path_matches_the_reference_path_and_token_by_token_decoding(name, monkeypatch):
    lm = longkit.load_model(name)
    ids = sample_ids(lm, n=53)
    args = {"window": 9, "n_sinks": 3, "block_q": 16, "block_k": 16}
    with torch.inference_mode():
        with longkit.apply(lm.model, attention="lm_infinite", attention_args=args) as applied:
            fast = lm.model(ids).logits
            cache = applied.new_cache()
            lm.model(ids[:, :30], cache=cache, use_cache=True)
            steps = torch.cat(
                [lm.model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(30, 53)], 1
            )
        monkeypatch.setattr(
            lmi, "lm_infinite_attention", lambda *a, block_q, block_k, **kw: lm_infinite_reference(*a, **kw)
        )
        with longkit.apply(lm.model, attention="lm_infinite", attention_args=args):
            ref = lm.model(ids).logits
        plain = lm.model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps, fast[:, 30:], rtol=1e-4, atol=1e-4)
    assert (fast - plain).abs().max() > 1e-3


def test_window_defaults_to_the_trained_length(tiny_llama):
    # tiny models are trained at 512 tokens: a 61-token prompt is untouched by the default window
    ids = sample_ids(tiny_llama, n=61)
    with torch.inference_mode():
        plain = tiny_llama.model(ids).logits
        with longkit.apply(tiny_llama.model, attention="lm_infinite", attention_args={"block_q": 16}):
            got = tiny_llama.model(ids).logits
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_parameter_and_range():
    with pytest.raises(MethodError, match=r"'window' must be >= 1 \(got 0\)"):
        REGISTRIES["attention"].create("lm_infinite", {"window": "0"})
    with pytest.raises(MethodError, match=r"'n_sinks' must be >= 0 \(got -1\)"):
        REGISTRIES["attention"].create("lm_infinite", {"n_sinks": "-1"})
    q, k, v = qkv(5, 5, 2)
    with pytest.raises(MethodError, match=r"'n_sinks' must be an int >= 0 \(got -2\)"):
        lm_infinite_attention(q, k, v, INV_FREQ, 3, -2)
    with pytest.raises(MethodError, match=r"more queries"):
        lm_infinite_attention(q, k[:, :, :3], v[:, :, :3], INV_FREQ, 2, 1)
    with pytest.raises(MethodError, match=r"'window' must be < length = 8"):
        relative_positions("lm_infinite", 8, window=8, n_sinks=1)


def test_memory_stays_blockwise_at_32k_keys():
    T, S = 256, 32768
    q, k, v = qkv(T, S, 2, H=2, B=1)
    with LargestTensor() as seen:
        out, lse = lm_infinite_attention(q, k, v, INV_FREQ, 8192, 100, block_q=256, block_k=256)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert seen.largest < T * S / 4, seen.largest
