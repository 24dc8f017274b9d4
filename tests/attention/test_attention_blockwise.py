"""blockwise_attention against reference_attention (forward, lse, gradients), tile skipping, and the model seam."""

from __future__ import annotations

import math

import pytest
import torch

import longkit
from longkit.attention import MaskSpec, blockwise, blockwise_attention, reference_attention
from longkit.errors import MethodError
from longkit.registry import REGISTRIES


def masks(T: int, S: int) -> dict[str, MaskSpec | None]:
    """One MaskSpec per kind for T queries at the end of S keys."""
    g = torch.Generator().manual_seed(T * 1000 + S)
    off = S - T
    docs = torch.cat([torch.full((n,), d) for d, n in enumerate([S // 3, S // 5 + 1, S])])[:S]
    blocks = torch.rand(math.ceil(T / 24), math.ceil(S / 24), generator=g) > 0.4
    dense = torch.rand(2, 1, T, S, generator=g) > 0.3
    # whole rows hidden: the kernel must write out 0 and lse -inf there
    dense[:, :, T // 2] = False
    return {
        "none": None,
        "causal": MaskSpec(q_offset=off),
        "window": MaskSpec(q_offset=off, window=37),
        "sinks+window": MaskSpec(q_offset=off, window=21, sinks=5),
        "documents": MaskSpec(q_offset=off, doc_ids=docs),
        "block-sparse": MaskSpec(causal=False, block_mask=blocks, block_size=24),
        "dense": MaskSpec(causal=False, dense=dense),
        "all": MaskSpec(q_offset=off, window=50, sinks=3, doc_ids=docs[None].expand(2, S), block_mask=blocks,
                        block_size=24),
    }


# (T, S, H_kv, block_q, block_k): odd lengths, decoding (T = 1), queries after a cache (S > T), GQA with 2 and 1
# key/value heads for 4 query heads, block sizes that do not divide the lengths.
SHAPES = [
    (1, 1, 2, 16, 16),
    (1, 70, 1, 16, 32),
    (63, 63, 2, 16, 16),
    (200, 200, 1, 48, 32),
    (257, 257, 2, 64, 128),
    (63, 200, 1, 32, 16),
    (200, 257, 2, 128, 48),
]


def qkv(T, S, H_kv, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 16, generator=g)
    k = torch.randn(2, H_kv, S, 16, generator=g)
    v = torch.randn(2, H_kv, S, 16, generator=g)
    return tuple(x.to(dtype).requires_grad_(grad) for x in (q, k, v))


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", list(masks(4, 4)))
@pytest.mark.parametrize("T,S,H_kv,block_q,block_k", SHAPES, ids=[f"T{s[0]}-S{s[1]}-Hkv{s[2]}" for s in SHAPES])
def test_forward_matches_the_reference_fp32(kind, T, S, H_kv, block_q, block_k):
    mask = masks(T, S)[kind]
    q, k, v = qkv(T, S, H_kv)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    out, lse = blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
    assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    # -inf exactly where the reference has it (rows without a visible key)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(masks(4, 4)))
@pytest.mark.parametrize("T,S,H_kv,block_q,block_k", [SHAPES[2], SHAPES[5]], ids=["T63-S63", "T63-S200"])
def test_forward_bf16_is_close_to_the_fp32_reference(kind, T, S, H_kv, block_q, block_k):
    mask = masks(T, S)[kind]
    q, k, v = qkv(T, S, H_kv, dtype=torch.bfloat16)
    ref_out, ref_lse = reference_attention(q.float(), k.float(), v.float(), mask)
    out, lse = blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_rms(out, ref_out) < 1e-2
    # Scores are computed in float32 from the bf16 inputs, so the lse is as exact as in fp32.
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


GRAD_KINDS = ["none", "causal", "window", "sinks+window", "documents", "block-sparse", "dense"]


@pytest.mark.parametrize("kind", GRAD_KINDS)
@pytest.mark.parametrize("T,S,H_kv,block_q,block_k", [SHAPES[2], SHAPES[5], SHAPES[1]],
                         ids=["T63-S63", "T63-S200", "T1-S70"])
def test_gradients_match_the_reference_fp32(kind, T, S, H_kv, block_q, block_k):
    mask = masks(T, S)[kind]
    q, k, v = qkv(T, S, H_kv, grad=True)
    g = torch.Generator().manual_seed(1)
    d_out, d_lse = torch.randn(2, 4, T, 16, generator=g), torch.randn(2, 4, T, generator=g)

    def loss(out, lse):
        # the lse term checks its gradient too (used when partial attentions are merged under autograd)
        return (out * d_out).sum() + (lse.masked_fill(lse.isinf(), 0) * d_lse).sum()

    ref = torch.autograd.grad(loss(*reference_attention(q, k, v, mask)), (q, k, v))
    got = torch.autograd.grad(loss(*blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k)), (q, k, v))
    for name, r, b in zip(("dq", "dk", "dv"), ref, got, strict=True):
        torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_bf16_are_close_to_the_fp32_reference():
    mask = masks(63, 200)["documents"]
    q, k, v = qkv(63, 200, 2, dtype=torch.bfloat16, grad=True)
    d_out = torch.randn(2, 4, 63, 16, generator=torch.Generator().manual_seed(1))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad((reference_attention(q32, k32, v32, mask)[0] * d_out).sum(), (q32, k32, v32))
    got = torch.autograd.grad((blockwise_attention(q, k, v, mask, block_q=32, block_k=16)[0].float() * d_out).sum(), (q, k, v))
    for r, b in zip(ref, got, strict=True):
        assert b.dtype == torch.bfloat16 and rel_rms(b, r) < 1e-2


def test_uninitialised_output_rows_would_be_caught(monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    assert torch.empty(2).isnan().all()
    T, S = 63, 200
    # Queries that no tile covers (hidden rows, fully skipped query blocks) must still be written.
    dense = torch.zeros(1, 1, T, S, dtype=torch.bool)
    dense[:, :, 40:, 100:] = True
    for mask in (MaskSpec(causal=False, dense=dense), masks(T, S)["block-sparse"], masks(T, S)["documents"]):
        q, k, v = qkv(T, S, 2, grad=True)
        out, lse = blockwise_attention(q, k, v, mask, block_q=16, block_k=16)
        assert not out.isnan().any() and not lse.isnan().any()
        ref_out, ref_lse = reference_attention(q, k, v, mask)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert not any(g.isnan().any() for g in grads)


def count_tiles(monkeypatch, mask, T, S, block):
    computed, masked = [], []
    attend, tile = blockwise._attend_tile, MaskSpec.tile

    def counting_attend(*args, **kwargs):
        computed.append(1)
        return attend(*args, **kwargs)

    def counting_tile(self, i0, i1, j0, j1, device="cpu"):
        masked.append((i1 - i0, j1 - j0))
        return tile(self, i0, i1, j0, j1, device)

    monkeypatch.setattr(blockwise, "_attend_tile", counting_attend)
    monkeypatch.setattr(MaskSpec, "tile", counting_tile)
    q, k, v = qkv(T, S, 2)
    blockwise_attention(q, k, v, mask, block_q=block, block_k=block)
    monkeypatch.undo()
    return len(computed), masked


def test_fully_masked_tiles_are_skipped_and_fully_visible_tiles_build_no_mask(monkeypatch):
    # causal, 8 x 8 tiles: the 28 above the diagonal are skipped, only the 8 diagonal ones build a mask
    computed, masked = count_tiles(monkeypatch, MaskSpec(), 256, 256, 32)
    assert computed == 36 and len(masked) == 8
    assert max(masked) == (32, 32)
    # odd length: 17 x 17 tiles of 16, lower triangle with diagonal; the last 1 x 1 diagonal tile is fully visible
    computed, masked = count_tiles(monkeypatch, MaskSpec(), 257, 257, 16)
    assert computed == 17 * 18 // 2 and len(masked) == 16
    # window of 32: the diagonal tile and the one before it
    computed, _ = count_tiles(monkeypatch, MaskSpec(window=32), 256, 256, 32)
    assert computed == 8 + 7
    # four packed documents of 64 tokens: causal tiles inside each document only
    computed, _ = count_tiles(monkeypatch, MaskSpec(doc_ids=torch.arange(256) // 64), 256, 256, 32)
    assert computed == 4 * 3
    computed, _ = count_tiles(monkeypatch, None, 256, 256, 32)
    assert computed == 64


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=8), "'block_q' must be an int >= 16 \\(got 8\\)"),
    (dict(block_k=15), "'block_k' must be an int >= 16"),
    (dict(block_q=32.0), "'block_q' must be an int >= 16"),
    (dict(block_k=True), "'block_k' must be an int >= 16"),
])
def test_bad_block_sizes_name_the_parameter(kwargs, match):
    q, k, v = qkv(20, 20, 2)
    with pytest.raises(MethodError, match=match):
        blockwise_attention(q, k, v, MaskSpec(), **kwargs)


def test_masks_and_tensors_that_do_not_fit_are_clear_errors():
    q, k, v = qkv(20, 30, 2)
    with pytest.raises(MethodError, match="'doc_ids' must have shape"):
        blockwise_attention(q, k, v, MaskSpec(doc_ids=torch.zeros(20, dtype=torch.long)))
    with pytest.raises(MethodError, match="'dense' must have shape"):
        blockwise_attention(q, k, v, MaskSpec(dense=torch.ones(20, 20, dtype=torch.bool)))
    with pytest.raises(MethodError, match="'block_mask' must have shape"):
        blockwise_attention(q, k, v, MaskSpec(block_mask=torch.ones(2, 3, dtype=torch.bool), block_size=16))
    with pytest.raises(MethodError, match="multiple of key/value heads"):
        blockwise_attention(q[:, :3], k, v)


def test_registered_method_checks_its_parameters():
    with pytest.raises(MethodError, match="parameter 'block_q' must be >= 16"):
        REGISTRIES["attention"].create("blockwise", {"block_q": 8})
    with pytest.raises(MethodError, match="parameter 'block_k' expects int"):
        REGISTRIES["attention"].create("blockwise", {"block_k": "big"})
    method = REGISTRIES["attention"].create("blockwise", {"block_q": "32"})
    assert method.block_q == 32 and method.label() == "blockwise:block_q=32"


SPEC = "blockwise:block_q=16,block_k=16"


def ids_and_padding(n: int = 45, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, n), generator=g)
    attention_mask = torch.ones(2, n, dtype=torch.long)
    attention_mask[1, :9] = 0
    return ids, attention_mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_model_logits_match_sdpa_in_prefill_decoding_and_with_left_padding(name):
    model = longkit.load_model(name).model
    ids, attention_mask = ids_and_padding()
    with torch.inference_mode():
        ref = model(ids[:1]).logits
        ref_padded = model(ids, attention_mask=attention_mask).logits
        with longkit.apply(model, attention=SPEC) as applied:
            assert model.config._attn_implementation.startswith("longkit_blockwise")
            prefill = model(ids[:1]).logits
            padded = model(ids, attention_mask=attention_mask).logits
            cache = applied.new_cache()
            model(ids[:, :30], attention_mask=attention_mask[:, :30], cache=cache, use_cache=True)
            steps = [model(ids[:, i : i + 1], attention_mask=attention_mask[:, : i + 1], cache=cache,
                           use_cache=True).logits for i in range(30, 45)]
        after = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(prefill, ref, rtol=1e-5, atol=1e-5)
    # every position, padded ones included (sdpa also gives 0 for queries that see no key)
    torch.testing.assert_close(padded, ref_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref_padded[:, 30:], rtol=1e-5, atol=1e-5)
    assert torch.equal(after, ref_padded)


def test_model_chunked_prefill_and_static_cache_match_sdpa(tiny_llama):
    from transformers import DynamicCache, StaticCache

    model = tiny_llama.model
    ids, attention_mask = ids_and_padding(40, seed=1)
    with torch.inference_mode():
        ref = model(ids, attention_mask=attention_mask).logits
        with longkit.apply(model, attention=SPEC):
            # chunks of 17 queries after a cache: transformers passes a (B, 1, 17, S) boolean mask
            cache = DynamicCache(config=model.config)
            chunks = [model(ids[:, i : i + 17], attention_mask=attention_mask[:, : i + 17], cache=cache,
                            use_cache=True).logits for i in range(0, 40, 17)]
            # prefill into an empty static cache: mask None with S = 64 > T, causal from the first key
            static = StaticCache(config=model.config, max_cache_len=64)
            first = model(ids[:1, :25], cache=static, use_cache=True).logits
            nxt = model(ids[:1, 25:27], cache=static, use_cache=True).logits
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first, nxt], dim=1), ref[:1, :27], rtol=1e-5, atol=1e-5)


def test_model_sliding_window_matches_sdpa():
    from transformers import AutoModelForCausalLM

    config = longkit.load_model("tiny-mistral").model.config
    config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, _ = ids_and_padding(40)
    no_window = longkit.load_model("tiny-mistral").model
    no_window.load_state_dict(model.state_dict())
    with torch.inference_mode():
        ref = model(ids).logits
        with longkit.apply(model, attention=SPEC) as applied:
            out = model(ids).logits
            cache = applied.new_cache()
            model(ids[:, :20], cache=cache, use_cache=True)
            steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(20, 40)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 20:], rtol=1e-5, atol=1e-5)
    # the window matters at this length, so the check above is not vacuous
    with torch.inference_mode():
        assert not torch.allclose(no_window(ids).logits, ref, atol=1e-3)


def test_model_training_gradients_match_sdpa(tiny_llama):
    model = tiny_llama.model
    ids, attention_mask = ids_and_padding(33, seed=2)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=attention_mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    with longkit.apply(model, attention=SPEC):
        got = grads()
    model.zero_grad()
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_two_settings_register_two_implementations():
    from longkit.registry import REGISTRIES

    a = REGISTRIES["attention"].create("blockwise", {"block_q": 16, "block_k": 16})
    b = REGISTRIES["attention"].create("blockwise", {"block_q": 32, "block_k": 32})
    assert a.implementation_name() != b.implementation_name()
    assert a.implementation_name() == REGISTRIES["attention"].create("blockwise", {"block_q": 16, "block_k": 16}).implementation_name()
