"""The position remaps' fast paths (issue #21: Self-Extend and DCA prefilled Gemma 3 at about 3x the baseline):
the fused kernel at Gemma 3 270M's attention shapes (head_dim 256, 4 query heads to 1 key/value head) against the
blockwise primitive and the explicit references, a chunked prefill that reaches the remap without a dense mask, the
window that hides nothing (plain causal), and the re-rotation against the rotate-half formula bit for bit."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention import MaskSpec, blockwise_attention, position_remap
from longkit.attention import dca as dca_mod
from longkit.attention import self_extend as se_mod
from longkit.attention.dca import dca_attention
from longkit.attention.naive import dca_reference, self_extend_reference
from longkit.attention.position_remap import attend_part, causal_tail_sdpa_mask
from longkit.attention.self_extend import self_extend_attention
from longkit.rope.rotation import rotate_by

#: Gemma 3 270M's full-attention layers: head_dim 256, RoPE base 1e6.
D = 256
INV_FREQ_256 = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))


def gemma_qkv(T, S, dtype=torch.float32, seed=0):
    """(1, 4, T, 256) queries, (1, 1, S, 256) keys and values: grouped-query attention 4:1."""
    return qkv(T, S, 1, dtype=dtype, seed=seed, D=D, H=4, B=1)


# (T, S, mask): no mask, causal at the first key, a chunked prefill's queries after a cache (odd offsets), a decoding
# step, a window inside the keys, a window that hides nothing (longer than the last query's position + 1) and one
# exactly that long, a one-key window.
GEMMA_MASKS = [
    (29, 29, None),
    (37, 37, {"causal": True}),
    (23, 71, {"causal": True, "q_offset": 48}),
    (1, 45, {"causal": True, "q_offset": 44}),
    (19, 60, {"causal": True, "window": 13, "q_offset": 41}),
    (21, 50, {"causal": True, "window": 51, "q_offset": 29}),
    (21, 50, {"causal": True, "window": 50, "q_offset": 29}),
    (21, 50, {"causal": True, "window": 49, "q_offset": 29}),
    (17, 17, {"causal": True, "window": 1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S,mask", GEMMA_MASKS, ids=[f"T{m[0]}-S{m[1]}-{m[2]}" for m in GEMMA_MASKS])
def test_fused_part_at_gemma3_shapes_matches_the_blockwise_part(T, S, mask, dtype):
    # The fused kernel takes the 4:1 grouped heads as they are (no copy of K/V per query head).
    q, k, v = gemma_qkv(T, S, dtype)
    spec = None if mask is None else MaskSpec(**mask)
    want, want_lse = blockwise_attention(q.float(), k.float(), v.float(), spec, 0.0625, block_q=16, block_k=16)
    with torch.no_grad():
        got, lse = attend_part(q, k, v, spec, 0.0625, block_q=16, block_k=16)
    assert got.shape == (1, 4, T, D) and got.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=tol, atol=tol)


def test_fused_grouped_heads_map_query_head_h_to_key_head_h_over_the_group():
    # 4 query heads over 2 key heads with different keys: head h must read key head h // 2 (a broadcast of the
    # first key head, or h % 2, would differ).
    q, k, v = qkv(9, 9, 2, D=32, H=4, B=1)
    with torch.no_grad():
        got, _ = attend_part(q, k, v, MaskSpec(causal=True), None)
        want, _ = attend_part(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), MaskSpec(causal=True), None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_window_that_hides_nothing_is_one_causal_call(monkeypatch):
    # Self-Extend at S <= W computes plain causal attention: the near part must not split into window bands.
    calls = []
    real = position_remap._fused
    monkeypatch.setattr(position_remap, "_fused", lambda *a: calls.append(a[3]) or real(*a))
    q, k, v = gemma_qkv(24, 64)
    with torch.no_grad():
        out, _ = self_extend_attention(q, k, v, INV_FREQ_256, 5, 64)
    # a full part (keys before the chunk) and a causal part (the chunk's own keys), nothing else
    assert sorted(calls) == [False, True]
    mask = torch.ones(24, 64, dtype=torch.bool).tril(40)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# (T, S, group_size, window): a chunked prefill inside the window (plain causal), a far part after a cache, a
# whole odd-length prefill with a far part, a decoding step with a far part.
SE_SHAPES = [(23, 71, 5, 100), (23, 71, 5, 71), (19, 83, 3, 29), (61, 61, 4, 17), (1, 77, 5, 30)]


@pytest.mark.parametrize("T,S,G,W", SE_SHAPES, ids=[f"T{s[0]}-S{s[1]}-G{s[2]}-W{s[3]}" for s in SE_SHAPES])
def test_self_extend_at_gemma3_shapes_matches_the_reference(T, S, G, W):
    q, k, v = gemma_qkv(T, S)
    ref, ref_lse = self_extend_reference(q, k, v, INV_FREQ_256, G, W)
    with torch.no_grad():
        out, lse = self_extend_attention(q, k, v, INV_FREQ_256, G, W)
        out16, _ = self_extend_attention(*(t.bfloat16() for t in (q, k, v)), INV_FREQ_256, G, W)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, rtol=0.05, atol=0.03)


# (T, S, chunk_size, local_window): all keys in chunk 0 (no re-rotation at all), a chunked prefill across three
# chunks, a whole odd-length prefill, a decoding step in chunk 3.
DCA_SHAPES = [(23, 71, 100, 10), (23, 71, 33, 7), (61, 61, 20, 3), (1, 77, 25, 5)]


@pytest.mark.parametrize("T,S,s,w", DCA_SHAPES, ids=[f"T{x[0]}-S{x[1]}-s{x[2]}-w{x[3]}" for x in DCA_SHAPES])
def test_dca_at_gemma3_shapes_matches_the_reference(T, S, s, w):
    q, k, v = gemma_qkv(T, S)
    ref, ref_lse = dca_reference(q, k, v, INV_FREQ_256, s, w)
    with torch.no_grad():
        out, lse = dca_attention(q, k, v, INV_FREQ_256, s, w)
        out16, _ = dca_attention(*(t.bfloat16() for t in (q, k, v)), INV_FREQ_256, s, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out16.float(), ref, rtol=0.05, atol=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D_x,rot", [(256, 256), (64, 32)], ids=["full", "partial"])
def test_rotate_by_is_the_rotate_half_formula_bit_for_bit(dtype, D_x, rot):
    # cos and sin are computed once per frequency and the halves directly; the result must be what
    # x * cos + rotate_half(x) * sin gives in float32 with the angles in float64, rounded once to x's dtype.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 41, D_x, generator=g).to(dtype)
    inv = 1.0 / (1e4 ** (torch.arange(0, rot, 2).float() / rot))
    old, new = torch.arange(41), torch.arange(41) * 0.37 + 3
    f = inv.float()
    delta = (new.float()[:, None] * f).double() - (old.float()[:, None] * f).double()
    delta = torch.cat([delta, delta], -1)
    cos, sin = delta.cos().float(), delta.sin().float()
    xr = x[..., :rot].float()
    half = rot // 2
    want = (xr * cos + torch.cat([-xr[..., half:], xr[..., :half]], -1) * sin).to(dtype)
    want = torch.cat([want, x[..., rot:]], -1)
    got = rotate_by(x, old, new, inv)
    assert got.dtype == dtype and torch.equal(got, want)


def _mask_kwargs(**over):
    from transformers.masking_utils import causal_mask_function

    kw = {"batch_size": 1, "q_length": 6, "kv_length": 16, "q_offset": 10, "kv_offset": 0,
          "mask_function": causal_mask_function, "attention_mask": None, "allow_is_causal_skip": True,
          "dtype": torch.float32, "config": None, "use_vmap": False, "device": torch.device("cpu")}
    return {**kw, **over}


def test_mask_function_gives_up_only_the_plain_causal_mask_of_queries_at_the_end():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    # a chunked prefill's full-attention mask (6 queries after 10 cached keys), with or without an all-ones padding
    assert causal_tail_sdpa_mask(**_mask_kwargs()) is None
    assert causal_tail_sdpa_mask(**_mask_kwargs(attention_mask=torch.ones(1, 16, dtype=torch.bool))) is None
    padded = torch.ones(2, 16, dtype=torch.bool)
    padded[1, 12:] = False
    # everything else keeps transformers' own mask: padding, a sliding window, keys that are not positions 0 ..
    # S - 1 or queries that are not the last keys (static caches), custom patterns, skips not allowed
    for over in (
        {"attention_mask": padded, "batch_size": 2},
        {"mask_function": sliding_window_causal_mask_function(4), "local_size": 4},
        {"kv_offset": 3},
        {"kv_length": 20},
        {"mask_function": lambda b, h, q, kv: kv <= q},
        {"allow_is_causal_skip": False},
    ):
        got, want = causal_tail_sdpa_mask(**_mask_kwargs(**over)), sdpa_mask(**_mask_kwargs(**over))
        assert got is not None and torch.equal(got, want), over
    # the mask given up is the one a remap computes from nothing: causal aligned at the last key
    want = sdpa_mask(**_mask_kwargs(allow_is_causal_skip=False))
    assert torch.equal(want[0, 0], torch.ones(6, 16, dtype=torch.bool).tril(10))


REMAPS = {
    "self_extend": ({"group_size": 3, "window": 9, "block_q": 16, "block_k": 16}, se_mod, "self_extend_attention",
                    self_extend_reference),
    "self_extend_covering": ({"group_size": 3, "window": 100, "block_q": 16, "block_k": 16}, se_mod,
                             "self_extend_attention", self_extend_reference),
    "dca": ({"chunk_size": 24, "local_window": 5, "block_q": 16, "block_k": 16}, dca_mod, "dca_attention",
            dca_reference),
}


@pytest.mark.parametrize("model_name", ["tiny-gemma3", "tiny-llama"])
@pytest.mark.parametrize("remap", list(REMAPS))
def test_chunked_prefill_runs_the_fused_path_and_equals_the_reference(model_name, remap, monkeypatch):
    # A prefill in chunks (queries after cached keys) reached the remap with a dense (T, S) mask, which sent it to
    # the Python tile loop; now the full-attention layers get no mask, run on the fused kernel only, and give the
    # logits of one full forward and of the explicit reference.
    from longkit.runtime.chunked_prefill import chunked_prefill

    lm = longkit.load_model(model_name)
    ids = sample_ids(lm, n=61, seed=2)
    args, module, fn, reference = REMAPS[remap]
    name = "dca" if remap == "dca" else "self_extend"
    blockwise, masks = [], []
    real_blockwise, real_attention = position_remap.blockwise_attention, position_remap.RemapAttention.attention
    monkeypatch.setattr(position_remap, "blockwise_attention", lambda *a, **kw: blockwise.append(1) or real_blockwise(*a, **kw))

    def spy(self, module_, query, key, value, attention_mask, scaling, kwargs):
        masks.append((query.shape[2], key.shape[2], attention_mask))
        return real_attention(self, module_, query, key, value, attention_mask, scaling, kwargs)

    monkeypatch.setattr(position_remap.RemapAttention, "attention", spy)
    with torch.inference_mode():
        with longkit.apply(lm.model, attention=name, attention_args=args) as applied:
            full = lm.model(ids).logits
            chunked = chunked_prefill(lm.model, ids, applied.new_cache(), 16, logits_to_keep=0)
        monkeypatch.setattr(module, fn, lambda *a, block_q, block_k, **kw: reference(*a, **kw))
        with longkit.apply(lm.model, attention=name, attention_args=args) as applied:
            ref = chunked_prefill(lm.model, ids, applied.new_cache(), 16, logits_to_keep=0).logits
    # every chunk after the first had queries after cached keys, and no full-attention layer got a mask
    assert any(T < S for T, S, _ in masks) and all(m is None for _, _, m in masks)
    assert not blockwise
    # the last chunk holds tokens 48 .. 60
    assert chunked.logits.shape[1] == 13
    torch.testing.assert_close(chunked.logits, full[:, 48:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits, ref, rtol=1e-5, atol=1e-5)
