"""ReRoPE / Leaky ReRoPE: the blockwise attention against the explicit relative-position reference, log-n
scaling, the model seam, bad input, and bounded memory at 32K keys."""

from __future__ import annotations

import math

import pytest
import torch
from attention_helpers import INV_FREQ, LargestTensor, qkv

import longkit
from conftest import sample_ids
from longkit.attention import rerope as rr
from longkit.attention.logn import log_n_factors
from longkit.attention.naive import rerope_reference
from longkit.attention.rerope import rerope_attention
from longkit.attention.self_extend import self_extend_attention
from longkit.errors import MethodError
from longkit.registry import REGISTRIES

# (T, S, H_kv, window, leak, trained): ReRoPE and leaky, with and without log-n, decoding, odd lengths, GQA.
SHAPES = [
    (37, 37, 2, 5, None, None),
    (63, 63, 1, 16, None, 8),
    (1, 50, 2, 7, None, 8),
    (10, 61, 2, 8, 2.0, 16),
    (61, 61, 1, 3, 16.0, None),
    (1, 70, 1, 9, 4.0, 4),
    (129, 129, 2, 24, 3.5, 32),
]


@pytest.mark.parametrize("T,S,H_kv,w,leak,trained", SHAPES, ids=[f"T{s[0]}-S{s[1]}-w{s[3]}-k{s[4]}-L{s[5]}" for s in SHAPES])
def test_blockwise_matches_the_reference_fp32(T, S, H_kv, w, leak, trained):
    q, k, v = qkv(T, S, H_kv)
    out, lse = rerope_attention(q, k, v, INV_FREQ, w, leak=leak, trained=trained, block_q=16, block_k=32)
    ref, ref_lse = rerope_reference(q, k, v, INV_FREQ, w, leak=leak, trained=trained)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("leak", [None, 16.0])
def test_blockwise_bf16_is_close_to_the_fp32_reference(leak):
    q, k, v = qkv(63, 63, 2, dtype=torch.bfloat16)
    out, _ = rerope_attention(q, k, v, INV_FREQ, 9, leak=leak, trained=16, block_q=16, block_k=16)
    ref, _ = rerope_reference(q.float(), k.float(), v.float(), INV_FREQ, 9, leak=leak, trained=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.03)


def test_rerope_is_self_extend_with_an_infinite_group():
    # datamllab/LongLM#40: with G beyond the length every far key sits at distance W, which is ReRoPE.
    q, k, v = qkv(50, 50, 2)
    a, _ = rerope_attention(q, k, v, INV_FREQ, 6, block_q=16, block_k=16)
    b, _ = self_extend_attention(q, k, v, INV_FREQ, 1000, 6, block_q=16, block_k=16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the leak changes the result
    c, _ = rerope_attention(q, k, v, INV_FREQ, 6, leak=2.0, block_q=16, block_k=16)
    assert (a - c).abs().max() > 1e-3


def test_log_n_factors_follow_the_formula():
    got = log_n_factors(torch.tensor([0, 7, 15, 16, 100]), 16)
    want = [1.0, 1.0, 1.0, math.log(17) / math.log(16), math.log(101) / math.log(16)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["rerope", "leaky_rerope"])
def test_model_with_a_window_covering_the_prompt_equals_the_plain_model(tiny_llama, name):
    ids = sample_ids(tiny_llama, n=61)
    with torch.inference_mode():
        plain = tiny_llama.model(ids).logits
        with longkit.apply(tiny_llama.model, attention=name, attention_args={"window": 61, "block_q": 16}):
            got = tiny_llama.model(ids).logits
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,args", [("rerope", {"window": 8}), ("leaky_rerope", {"window": 8, "leak": 3.0})])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_model_blockwise_path_matches_the_reference_path(model, name, args, monkeypatch):
    lm = longkit.load_model(model)
    ids = sample_ids(lm, n=53)
    args = {**args, "block_q": 16, "block_k": 16}
    with torch.inference_mode():
        with longkit.apply(lm.model, attention=name, attention_args=args):
            fast = lm.model(ids).logits
        monkeypatch.setattr(rr, "rerope_attention", lambda *a, block_q, block_k, **kw: rerope_reference(*a, **kw))
        with longkit.apply(lm.model, attention=name, attention_args=args):
            ref = lm.model(ids).logits
        plain = lm.model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert (fast - plain).abs().max() > 1e-3


def test_bad_input_names_the_parameter_and_range():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MethodError, match=r"'window' must be >= 1 \(got 0\)"):
        REGISTRIES["attention"].create("rerope", {"window": "0"})
    with pytest.raises(MethodError, match=r"'leak' must be > 1.0 \(got 1.0\)"):
        REGISTRIES["attention"].create("leaky_rerope", {"leak": "1"})
    q, k, v = qkv(5, 5, 2)
    with pytest.raises(MethodError, match=r"'trained' must be an int >= 2"):
        rerope_attention(q, k, v, INV_FREQ, 2, trained=1)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(MethodError, match="'leaky_rerope' needs a model with rotary position embeddings.*GPT2"):
        longkit.apply(gpt2, attention="leaky_rerope")


@pytest.mark.parametrize("leak", [None, 16.0])
def test_memory_stays_blockwise_at_32k_keys(leak):
    T, S = 256, 32768
    q, k, v = qkv(T, S, 2, H=2, B=1)
    with LargestTensor() as seen:
        out, _ = rerope_attention(q, k, v, INV_FREQ, 512, leak=leak, trained=8192, block_q=256, block_k=256)
    assert bool(torch.isfinite(out).all())
    assert seen.largest < T * S / 4, seen.largest
