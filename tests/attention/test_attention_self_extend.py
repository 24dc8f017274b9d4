"""Self-Extend: the blockwise attention against the explicit relative-position reference, the model seam,
RoPE re-rotation against transformers' own RoPE, bad input, and bounded memory at 32K keys."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import INV_FREQ, LargestTensor, qkv

import longkit
from conftest import sample_ids
from longkit.attention import self_extend as se
from longkit.attention.naive import self_extend_reference
from longkit.attention.self_extend import self_extend_attention
from longkit.errors import MethodError
from longkit.registry import REGISTRIES
from longkit.rope.rotation import rotate_by

# (T, S, H_kv, group_size, window, block): odd lengths, decoding (T = 1), queries after a cache, GQA, windows
# smaller and larger than the sequence, G = 1, block sizes that do not divide the lengths.
SHAPES = [
    (37, 37, 2, 3, 5, 16),
    (63, 63, 1, 4, 16, 16),
    (1, 50, 2, 4, 7, 16),
    (1, 50, 1, 2, 60, 16),
    (10, 61, 2, 2, 8, 32),
    (61, 61, 2, 4, 100, 16),
    (63, 63, 1, 1, 1, 16),
    (129, 129, 2, 8, 24, 48),
]


@pytest.mark.parametrize("T,S,H_kv,G,W,block", SHAPES, ids=[f"T{s[0]}-S{s[1]}-Hkv{s[2]}-G{s[3]}-W{s[4]}" for s in SHAPES])
def test_blockwise_matches_the_reference_fp32(T, S, H_kv, G, W, block):
    q, k, v = qkv(T, S, H_kv)
    out, lse = self_extend_attention(q, k, v, INV_FREQ, G, W, block_q=block, block_k=block)
    ref, ref_lse = self_extend_reference(q, k, v, INV_FREQ, G, W)
    assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("T,S,H_kv,G,W,block", [SHAPES[1], SHAPES[4]], ids=["T63", "T10-S61"])
def test_blockwise_bf16_is_close_to_the_fp32_reference(T, S, H_kv, G, W, block):
    q, k, v = qkv(T, S, H_kv, dtype=torch.bfloat16)
    out, _ = self_extend_attention(q, k, v, INV_FREQ, G, W, block_q=block, block_k=block)
    ref, _ = self_extend_reference(q.float(), k.float(), v.float(), INV_FREQ, G, W)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.03)


def test_padding_mask_is_respected():
    q, k, v = qkv(20, 20, 2)
    dense = torch.ones(2, 1, 20, 20, dtype=torch.bool).tril()
    # row 1 of the batch: the first 3 keys are padding
    dense[1, :, :, :3] = False
    out, _ = self_extend_attention(q, k, v, INV_FREQ, 3, 4, dense=dense, block_q=16, block_k=16)
    ref, _ = self_extend_reference(q, k, v, INV_FREQ, 3, 4, dense=dense)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_the_reference_differs_from_plain_attention():
    # A wrong remap (or none) must not pass the tests above by accident.
    from longkit.attention import MaskSpec, reference_attention

    q, k, v = qkv(40, 40, 2)
    plain, _ = reference_attention(q, k, v, MaskSpec())
    ref, _ = self_extend_reference(q, k, v, INV_FREQ, 4, 8)
    assert (plain - ref).abs().max() > 1e-2
    torch.testing.assert_close(self_extend_reference(q, k, v, INV_FREQ, 4, 40)[0], plain, rtol=1e-5, atol=1e-5)


def test_rotate_by_moves_transformers_rope_between_positions(tiny_llama):
    # x rotated by the model's own rotary module at p, moved to p', equals x rotated at p' by that module.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = tiny_llama.model.model.rotary_emb
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 50, 16, generator=g)
    old = torch.arange(1000, 1050)
    new = torch.randint(0, 3000, (50,), generator=g)
    cos_o, sin_o = rotary(x, old[None])
    cos_n, sin_n = rotary(x, new[None])
    at_old, _ = apply_rotary_pos_emb(x, x, cos_o, sin_o)
    at_new, _ = apply_rotary_pos_emb(x, x, cos_n, sin_n)
    torch.testing.assert_close(rotate_by(at_old, old, new, rotary.inv_freq), at_new, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_model_with_a_window_covering_the_prompt_equals_the_plain_model(name):
    lm = longkit.load_model(name)
    ids = sample_ids(lm, n=61)
    with torch.inference_mode():
        plain = lm.model(ids).logits
        for args in ({"group_size": 4, "window": 61}, {"group_size": 1, "window": 5}):
            with longkit.apply(lm.model, attention="self_extend", attention_args={**args, "block_q": 16, "block_k": 16}):
                got = lm.model(ids).logits
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_model_blockwise_path_matches_the_reference_path(name, monkeypatch):
    lm = longkit.load_model(name)
    ids = sample_ids(lm, n=53)
    args = {"group_size": 3, "window": 8, "block_q": 16, "block_k": 16}
    with torch.inference_mode():
        with longkit.apply(lm.model, attention="self_extend", attention_args=args) as applied:
            fast = lm.model(ids).logits
            cache = applied.new_cache()
            lm.model(ids[:, :-2], cache=cache, use_cache=True)
            fast_step = lm.model(ids[:, -2:], cache=cache, use_cache=True).logits
        monkeypatch.setattr(se, "self_extend_attention",
                            lambda *a, block_q, block_k, **kw: self_extend_reference(*a, **kw))
        with longkit.apply(lm.model, attention="self_extend", attention_args=args):
            ref = lm.model(ids).logits
        plain = lm.model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_step, ref[:, -2:], rtol=1e-4, atol=1e-4)
    assert (fast - plain).abs().max() > 1e-3


def test_bad_input_names_the_parameter_and_range():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MethodError, match=r"'group_size' must be >= 1 \(got 0\)"):
        REGISTRIES["attention"].create("self_extend", {"group_size": "0"})
    with pytest.raises(MethodError, match=r"'window' must be >= 1 \(got -2\)"):
        REGISTRIES["attention"].create("self_extend", {"window": "-2"})
    q, k, v = qkv(5, 5, 2)
    with pytest.raises(MethodError, match=r"'group_size' must be an int >= 1 \(got 0\)"):
        self_extend_attention(q, k, v, INV_FREQ, 0, 4)
    with pytest.raises(MethodError, match=r"more queries"):
        self_extend_attention(q, k[:, :, :3], v[:, :, :3], INV_FREQ, 2, 4)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(MethodError, match="needs a model with rotary position embeddings.*GPT2LMHeadModel"):
        longkit.apply(gpt2, attention="self_extend")


def test_left_padded_positions_are_a_clear_error(tiny_llama):
    ids = sample_ids(tiny_llama, n=12)
    with longkit.apply(tiny_llama.model, attention="self_extend", attention_args={"window": 4}):
        with pytest.raises(MethodError, match="position_ids = cache index"):
            tiny_llama.model(ids, position_ids=torch.arange(3, 15)[None])




@pytest.mark.parametrize("T,S", [(256, 32768), (4096, 4096)], ids=["32K-keys", "4K-prefill"])
def test_memory_stays_blockwise(T, S):
    # B = 1, H = 2, D = 16, fp32. A (T, S) score matrix would be T·S elements per head; tiles are 256 x 256.
    q, k, v = qkv(T, S, 2, H=2, B=1)
    with LargestTensor() as seen:
        out, lse = self_extend_attention(q, k, v, INV_FREQ, 8, 512, block_q=256, block_k=256)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert seen.largest < T * S / 4, seen.largest


def test_equal_instances_on_two_models_keep_their_own_state(tiny_llama):
    # The state a remap reads at call time (rotary module, trained length) lives on the applied instance, and
    # each instance registers its own attention function: two equal instances on two models do not collide.
    import copy

    model = tiny_llama.model
    twin = copy.deepcopy(model)
    ids = sample_ids(tiny_llama, n=40)
    args = {"window": 4, "block_q": 16, "block_k": 16}
    a, b = (REGISTRIES["attention"].create("self_extend", args) for _ in range(2))
    with torch.inference_mode():
        undo_a, undo_b = a.apply(model), b.apply(twin)
        try:
            got_a, got_b = model(ids).logits, twin(ids).logits
        finally:
            undo_b()
            undo_a()
        plain = model(ids).logits
    assert a == b and a.implementation_name() != b.implementation_name()
    torch.testing.assert_close(got_a, got_b, rtol=0, atol=0)
    assert (got_a - plain).abs().max() > 1e-3
    assert len(a._bound) == 0 and len(b._bound) == 0
    with pytest.raises(MethodError, match="was called for a model it was not applied to"):
        a.attention(model.model.layers[0].self_attn, *qkv(3, 3, 2)[:3], None, None, {})


def test_fused_cpu_off_runs_the_blockwise_primitive_with_equal_logits(tiny_llama, monkeypatch):
    # fused_cpu is an attribute of the instance, not a parameter: a benchmark turns the fused CPU kernel off on
    # the method it runs, and the model's logits stay the same.
    from longkit.attention import position_remap

    ids = sample_ids(tiny_llama, n=45)
    method = REGISTRIES["attention"].create("self_extend", {"group_size": 3, "window": 8, "block_q": 16, "block_k": 16})
    assert "fused_cpu" not in method.params() and method.label() == "self_extend:group_size=3,window=8,block_q=16,block_k=16"
    outs, calls, real = {}, [], position_remap.blockwise_attention
    monkeypatch.setattr(position_remap, "blockwise_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.inference_mode():
        for fused in (True, False):
            method.fused_cpu = fused
            with longkit.apply(tiny_llama.model, attention=method):
                outs[fused] = tiny_llama.model(ids).logits
            outs[fused, "blockwise calls"] = len(calls)
    assert outs[True, "blockwise calls"] == 0 and outs[False, "blockwise calls"] > 0
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
