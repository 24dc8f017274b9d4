"""reference_attention against a softmax written out here, and the one LSE merge (merge_partials)."""

from __future__ import annotations

import math

import pytest
import torch

from longkit.attention import MaskSpec, merge_partials, merge_partials_, reference_attention
from longkit.errors import MethodError

B, H, H_KV, T, S, D = 2, 4, 2, 19, 30, 8
OFF = S - T
DOCS = torch.tensor([0] * 7 + [1] * 13 + [2] * 10)
BLOCKS = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)

SPECS = {
    "none": (None, lambda i, p, j: True),
    "causal": (MaskSpec(q_offset=OFF), lambda i, p, j: j <= p),
    "window": (MaskSpec(q_offset=OFF, window=6), lambda i, p, j: p - 6 < j <= p),
    "sinks+window": (MaskSpec(q_offset=OFF, window=3, sinks=2), lambda i, p, j: j <= p and (j > p - 3 or j < 2)),
    "documents": (MaskSpec(q_offset=OFF, doc_ids=DOCS), lambda i, p, j: j <= p and DOCS[p] == DOCS[j]),
    "block-sparse": (MaskSpec(causal=False, block_mask=BLOCKS, block_size=8), lambda i, p, j: BLOCKS[i // 8, j // 8]),
}



def naive(q, k, v, rule, scale):
    """softmax(q k^T scale) v, one query head at a time, with the rule's hidden keys dropped."""
    out, lse = torch.zeros(B, H, T, D), torch.full((B, H, T), -math.inf)
    for b in range(B):
        for h in range(H):
            kv_head = h // (H // H_KV)
            for i in range(T):
                keep = [j for j in range(S) if rule(i, OFF + i, j)]
                if not keep:
                    continue
                s = (k[b, kv_head, keep] @ q[b, h, i]) * scale
                out[b, h, i] = torch.softmax(s, 0) @ v[b, kv_head, keep]
                lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


def qkv(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g).to(dtype), torch.randn(B, H_KV, S, D, generator=g).to(dtype),
            torch.randn(B, H_KV, S, D, generator=g).to(dtype))


@pytest.mark.parametrize("kind", list(SPECS))
def test_reference_matches_a_hand_written_softmax(kind):
    spec, rule = SPECS[kind]
    q, k, v = qkv()
    out, lse = reference_attention(q, k, v, spec, scale=0.3)
    ref_out, ref_lse = naive(q, k, v, rule, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_reference_default_scale_and_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse = reference_attention(q, k, v, MaskSpec(q_offset=OFF))
    ref_out, ref_lse = naive(q.float(), k.float(), v.float(), SPECS["causal"][1], D**-0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_rows_without_a_visible_key_are_zero_with_minus_inf_lse_and_zero_gradients():
    q, k, v = (x.requires_grad_() for x in qkv())
    dense = torch.ones(T, S, dtype=torch.bool)
    dense[3] = False
    dense[11] = False
    out, lse = reference_attention(q, k, v, MaskSpec(causal=False, dense=dense))
    assert torch.equal(out[:, :, [3, 11]], torch.zeros(B, H, 2, D))
    assert torch.isneginf(lse[:, :, [3, 11]]).all() and torch.isfinite(lse[:, :, :3]).all()
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert torch.equal(q.grad[:, :, [3, 11]], torch.zeros(B, H, 2, D))


def test_reference_rejects_heads_that_do_not_group():
    q, k, v = qkv()
    with pytest.raises(MethodError, match="H = 3 must be a multiple of key/value heads H_kv = 2"):
        reference_attention(q[:, :3], k, v)
    with pytest.raises(MethodError, match="'key' must be"):
        reference_attention(q, k[..., :4], v)


@pytest.mark.parametrize("split", [1, 13, 29])
def test_merging_two_halves_of_the_keys_gives_attention_over_all_keys(split):
    q, k, v = qkv(seed=1)
    full_out, full_lse = reference_attention(q, k, v, scale=0.5)
    a_out, a_lse = reference_attention(q, k[:, :, :split], v[:, :, :split], scale=0.5)
    b_out, b_lse = reference_attention(q, k[:, :, split:], v[:, :, split:], scale=0.5)
    out, lse = merge_partials(a_out, a_lse, b_out, b_lse)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)
    # Order does not matter, and the in-place variant agrees.
    out2, lse2 = merge_partials(b_out, b_lse, a_out, a_lse)
    torch.testing.assert_close(out2, full_out, rtol=1e-5, atol=1e-6)
    acc, acc_lse = a_out.clone(), a_lse.clone()
    merge_partials_(acc, acc_lse, b_out, b_lse)
    torch.testing.assert_close(acc, full_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_lse, full_lse, rtol=1e-5, atol=1e-6)


def test_merge_handles_parts_that_see_nothing():
    out_a, out_b = torch.randn(3, 4), torch.randn(3, 4)
    inf = -math.inf
    lse_a, lse_b = torch.tensor([0.5, inf, inf]), torch.tensor([inf, 2.0, inf])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0], out_a[0]) and torch.equal(out[1], out_b[1]) and torch.equal(out[2], torch.zeros(4))
    assert lse.tolist() == [0.5, 2.0, inf]
    # Huge lse values do not overflow.
    out, lse = merge_partials(out_a[:1], torch.tensor([1000.0]), out_b[:1], torch.tensor([1000.0]))
    torch.testing.assert_close(out[0], (out_a[0] + out_b[0]) / 2)
    torch.testing.assert_close(lse, torch.tensor([1000.0 + math.log(2)]))


def test_merge_is_differentiable_without_nans():
    out_a, out_b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    lse_a = torch.tensor([0.5, -math.inf, -math.inf], requires_grad=True)
    lse_b = torch.tensor([-math.inf, 2.0, -math.inf], requires_grad=True)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    (out.sum() + lse[:2].sum()).backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()
