"""Dual Chunk Attention: the position matrix against ChunkLlama's rules, the blockwise attention against the
explicit relative-position reference and against ChunkLlama's three-part decoding step, the model seam with
token-by-token decoding, bad input, and bounded memory at 32K keys."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import INV_FREQ, LargestTensor, qkv

import longkit
from conftest import sample_ids
from longkit.attention import dca as dca_mod
from longkit.attention.dca import dca_attention
from longkit.attention.naive import dca_reference
from longkit.errors import MethodError
from longkit.registry import REGISTRIES
from longkit.rope import relative_positions
from longkit.rope.rotation import rotate_by

# (T, S, H_kv, chunk_size, local_window, block): odd lengths, decoding (T = 1), queries after a cache that
# start mid-chunk, GQA, w = 0, a chunk longer than the sequence, blocks that do not divide the lengths.
SHAPES = [
    (37, 37, 2, 8, 3, 16),
    (63, 63, 1, 16, 4, 16),
    (1, 50, 2, 7, 2, 16),
    (1, 50, 1, 9, 0, 16),
    (10, 61, 2, 12, 5, 32),
    (61, 61, 2, 100, 10, 16),
    (129, 129, 2, 40, 8, 48),
    (33, 33, 1, 2, 0, 16),
]


def test_positions_follow_chunkllama_by_hand():
    # s = 5, w = 2 -> c = 3: keys at j mod 3; the query at i = 7 (chunk 2, i mod c = 1) sees its own chunk
    # (keys 6, 7) at 1 - j mod 3, chunk 1 (keys 3..5) at min(1 + 3, 5) - j mod 3, chunk 0 at min(2·3 - 1, 5).
    rel = relative_positions("dca", 9, chunk_size=5, local_window=2)
    assert rel[7].tolist() == [5, 4, 3, 4, 3, 2, 1, 0, -1]
    # i = 8 (i mod c = 2): successive query position min(2 + 3, 5) = 5
    assert rel[8].tolist() == [5, 4, 3, 5, 4, 3, 2, 1, 0]
    # chunk 0 is plain causal attention
    assert rel[2, :3].tolist() == [2, 1, 0]


@pytest.mark.parametrize("s,w", [(6, 0), (7, 2), (12, 5), (4, 3)])
def test_positions_never_exceed_the_chunk_size_and_are_exact_inside_a_chunk(s, w):
    n = 40
    rel = relative_positions("dca", n, chunk_size=s, local_window=w)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    c = s - w
    past = j <= i
    assert int(rel[past].max()) <= s and int(rel[past].min()) >= 0 and bool((rel[~past] == -1).all())
    same = past & (i // c == j // c)
    assert bool((rel[same] == (i - j).expand(n, n)[same]).all())
    # successive chunk: the query position i mod c + c is capped at s, so distances are exact for the first
    # w + 1 queries of a chunk and never larger than the true distance
    succ = past & (j // c == i // c - 1)
    d = (i - j).expand(n, n)
    exact = succ & (i % c <= w)
    assert bool((rel[exact] == d[exact]).all()) and bool((rel[succ] <= d[succ]).all())


@pytest.mark.parametrize(
    "T,S,H_kv,s,w,block", SHAPES, ids=[f"T{x[0]}-S{x[1]}-Hkv{x[2]}-s{x[3]}-w{x[4]}" for x in SHAPES]
)
def test_blockwise_matches_the_reference_fp32(T, S, H_kv, s, w, block):
    q, k, v = qkv(T, S, H_kv)
    out, lse = dca_attention(q, k, v, INV_FREQ, s, w, block_q=block, block_k=block)
    ref, ref_lse = dca_reference(q, k, v, INV_FREQ, s, w)
    assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_blockwise_bf16_is_close_to_the_fp32_reference():
    q, k, v = qkv(63, 63, 2, dtype=torch.bfloat16)
    out, _ = dca_attention(q, k, v, INV_FREQ, 14, 3, block_q=16, block_k=16)
    ref, _ = dca_reference(q.float(), k.float(), v.float(), INV_FREQ, 14, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.03)


def test_padding_mask_is_respected():
    q, k, v = qkv(20, 20, 2)
    dense = torch.ones(2, 1, 20, 20, dtype=torch.bool).tril()
    # row 1 of the batch: the first 3 keys are padding
    dense[1, :, :, :3] = False
    out, _ = dca_attention(q, k, v, INV_FREQ, 6, 2, dense=dense, block_q=16, block_k=16)
    ref, _ = dca_reference(q, k, v, INV_FREQ, 6, 2, dense=dense)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def _chunkllama_decode_step(q_raw, k_raw, v, s, w):
    # One decoding step written the way ChunkLlama's cached branch is: three score blocks (inter, successive,
    # intra) from separately rotated queries, concatenated, one softmax. q_raw (B, H, 1, D), k_raw (B, H, S, D).
    S, D = k_raw.shape[2], q_raw.shape[-1]
    c = s - w
    p = S - 1
    n = p // c
    at = lambda x, pos: rotate_by(x, torch.zeros(x.shape[2]), torch.full((x.shape[2],), float(pos)), INV_FREQ)  # noqa: E731
    keys = rotate_by(k_raw, torch.zeros(S), (torch.arange(S) % c).float(), INV_FREQ)
    blocks = []
    if n >= 2:
        blocks.append(at(q_raw, min(2 * c - 1, s)) @ keys[:, :, : c * (n - 1)].transpose(-1, -2))
    if n >= 1:
        blocks.append(at(q_raw, min(p % c + c, s)) @ keys[:, :, c * (n - 1) : c * n].transpose(-1, -2))
    blocks.append(at(q_raw, p % c) @ keys[:, :, c * n :].transpose(-1, -2))
    probs = torch.softmax(torch.cat(blocks, dim=-1) / D**0.5, dim=-1)
    return probs @ v


@pytest.mark.parametrize("s,w", [(7, 2), (5, 0), (9, 4)])
def test_decoding_matches_chunkllamas_three_block_step(s, w):
    g = torch.Generator().manual_seed(3)
    q_raw, k_raw, v = (torch.randn(1, 2, n, 16, generator=g) for n in (1, 40, 40))
    for S in (1, 4, s - w, s - w + 1, 2 * (s - w) + 1, 23, 40):
        kr, vr = k_raw[:, :, :S], v[:, :, :S]
        # q and k as transformers hands them: rotated at their positions
        q = rotate_by(q_raw, torch.zeros(1), torch.tensor([S - 1.0]), INV_FREQ)
        k = rotate_by(kr, torch.zeros(S), torch.arange(S).float(), INV_FREQ)
        got, _ = dca_attention(q, k, vr, INV_FREQ, s, w, block_q=16, block_k=16)
        torch.testing.assert_close(got, _chunkllama_decode_step(q_raw, kr, vr, s, w), rtol=1e-5, atol=1e-5)


def test_the_reference_differs_from_plain_attention():
    from longkit.attention import MaskSpec, reference_attention

    q, k, v = qkv(40, 40, 2)
    plain, _ = reference_attention(q, k, v, MaskSpec())
    ref, _ = dca_reference(q, k, v, INV_FREQ, 10, 2)
    assert (plain - ref).abs().max() > 1e-2
    # one chunk covering every key is plain causal attention
    torch.testing.assert_close(dca_reference(q, k, v, INV_FREQ, 45, 5)[0], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dca_attention(q, k, v, INV_FREQ, 45, 5)[0], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_model_blockwise_path_matches_the_reference_path_and_token_by_token_decoding(name, monkeypatch):
    lm = longkit.load_model(name)
    ids = sample_ids(lm, n=53)
    args = {"chunk_size": 11, "local_window": 3, "block_q": 16, "block_k": 16}
    with torch.inference_mode():
        with longkit.apply(lm.model, attention="dca", attention_args=args) as applied:
            fast = lm.model(ids).logits
            cache = applied.new_cache()
            lm.model(ids[:, :30], cache=cache, use_cache=True)
            steps = torch.cat(
                [lm.model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(30, 53)], 1
            )
        monkeypatch.setattr(dca_mod, "dca_attention", lambda *a, block_q, block_k, **kw: dca_reference(*a, **kw))
        with longkit.apply(lm.model, attention="dca", attention_args=args):
            ref = lm.model(ids).logits
        plain = lm.model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps, fast[:, 30:], rtol=1e-4, atol=1e-4)
    assert (fast - plain).abs().max() > 1e-3


def test_defaults_follow_chunkllama(tiny_llama):
    # replace_with_chunkllama: chunk_size = 3/4 of the pre-training length, local window = 1/16 of it.
    method = REGISTRIES["attention"].create("dca", {})
    assert method.sizes(4096) == (3072, 256)
    assert method.sizes(8192) == (6144, 512)


def test_bad_input_names_the_parameter_and_range():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MethodError, match=r"'chunk_size' must be >= 2 \(got 1\)"):
        REGISTRIES["attention"].create("dca", {"chunk_size": "1"})
    with pytest.raises(MethodError, match=r"'local_window' must be >= 0 \(got -1\)"):
        REGISTRIES["attention"].create("dca", {"local_window": "-1"})
    q, k, v = qkv(5, 5, 2)
    with pytest.raises(MethodError, match=r"'local_window' must be < chunk_size = 4 \(got 4\)"):
        dca_attention(q, k, v, INV_FREQ, 4, 4)
    with pytest.raises(MethodError, match=r"'chunk_size' must be an int >= 2 \(got 1.5\)"):
        dca_attention(q, k, v, INV_FREQ, 1.5, 0)
    with pytest.raises(MethodError, match=r"more queries"):
        dca_attention(q, k[:, :, :3], v[:, :, :3], INV_FREQ, 4, 1)
    with pytest.raises(MethodError, match=r"'local_window' must be < chunk_size = 8"):
        REGISTRIES["attention"].create("dca", {"chunk_size": "8", "local_window": "8"})
    with pytest.raises(MethodError, match=r"'local_window' must be < chunk_size = 12"):
        REGISTRIES["attention"].create("dca", {"chunk_size": "12"}).sizes(8192)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(MethodError, match="needs a model with rotary position embeddings.*GPT2LMHeadModel"):
        longkit.apply(gpt2, attention="dca")


def test_memory_stays_blockwise_at_32k_keys():
    # B = 1, H = 2, D = 16, fp32, 256 queries after 32K keys with ChunkLlama's sizes for an 8K model.
    T, S = 256, 32768
    q, k, v = qkv(T, S, 2, H=2, B=1)
    with LargestTensor() as seen:
        out, lse = dca_attention(q, k, v, INV_FREQ, 6144, 512, block_q=256, block_k=256)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert seen.largest < T * S / 4, seen.largest


# (T, S, mask): no mask, causal aligned at the first key, causal with a query offset (decoding, queries after
# a cache, an offset beyond the keys), sliding windows of 1, 2, 7 and longer than the keys.
FUSED_MASKS = [
    (37, 37, None),
    (37, 37, {"causal": True}),
    (11, 53, {"causal": True, "q_offset": 42}),
    (1, 29, {"causal": True, "q_offset": 28}),
    (9, 20, {"causal": True, "q_offset": 30}),
    (45, 45, {"causal": True, "window": 7}),
    (13, 50, {"causal": True, "window": 7, "q_offset": 37}),
    (33, 33, {"causal": True, "window": 1}),
    (33, 33, {"causal": True, "window": 2}),
    (1, 40, {"causal": True, "window": 9, "q_offset": 39}),
    (30, 30, {"causal": True, "window": 64}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S,mask", FUSED_MASKS, ids=[f"T{m[0]}-S{m[1]}-{m[2]}" for m in FUSED_MASKS])
def test_fused_part_kernel_matches_the_blockwise_part(T, S, mask, dtype):
    # attend_part: PyTorch's fused CPU kernel (no gradients, simple masks) against the blockwise primitive.
    from longkit.attention import MaskSpec, blockwise_attention
    from longkit.attention.position_remap import attend_part

    q, k, v = qkv(T, S, 2, dtype=dtype)
    spec = None if mask is None else MaskSpec(**mask)
    want, want_lse = blockwise_attention(q, k, v, spec, 0.3, block_q=16, block_k=16)
    with torch.no_grad():
        got, lse = attend_part(q, k, v, spec, 0.3, block_q=16, block_k=16)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
