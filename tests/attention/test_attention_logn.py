"""log-n and entropy-aware attention scaling: the factors, the scaled kernels against explicit logit scaling,
the model seam (any RoPE model, left padding, skipped layers, composition with rope=abf), bad input."""

from __future__ import annotations

import math

import pytest
import torch
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention import MaskSpec, blockwise_attention
from longkit.attention.logn import log_n_scale_queries
from longkit.attention.naive import log_n_reference
from longkit.errors import MethodError
from longkit.registry import REGISTRIES


def test_scaled_queries_equal_explicitly_scaled_logits():
    # 10 queries after 51 keys, trained length 16: queries past position 15 get log(p + 1) / log(16) > 1.
    q, k, v = qkv(10, 61, 2)
    pos = torch.arange(51, 61)
    scaled = log_n_scale_queries(q, pos, 16)
    torch.testing.assert_close(scaled[0, 0, 3], q[0, 0, 3] * math.log(55) / math.log(16))
    out, lse = blockwise_attention(scaled, k, v, MaskSpec(causal=True, q_offset=51), block_q=16, block_k=16)
    ref, ref_lse = log_n_reference(q, k, v, 16)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    # below the trained length nothing changes
    torch.testing.assert_close(log_n_scale_queries(q, torch.arange(10), 16), q)


def test_bf16_scaling_is_close():
    q, _, _ = qkv(9, 9, 2, dtype=torch.bfloat16)
    got = log_n_scale_queries(q, torch.arange(100, 109), 8)
    assert got.dtype == torch.bfloat16
    want = q.float() * (torch.log(torch.arange(101, 110).float()) / math.log(8))[:, None]
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("inner", ["sdpa", "blockwise"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_model_equals_explicit_logit_scaling_and_decodes_token_by_token(name, inner):
    lm = longkit.load_model(name)
    ids = sample_ids(lm, n=41)
    args = {"trained": 6, "inner": inner, "block_q": 16, "block_k": 16}
    seen = []

    def record(module, args_, kwargs, out):
        seen.append(out)

    with torch.inference_mode():
        plain = lm.model(ids).logits
        with longkit.apply(lm.model, attention="logn", attention_args=args) as applied:
            got = lm.model(ids).logits
            cache = applied.new_cache()
            lm.model(ids[:, :20], cache=cache, use_cache=True)
            steps = torch.cat(
                [lm.model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(20, 41)], 1
            )
        # the same model with eager attention, its q_proj scaled per position, is the explicit reference for
        # models without a q norm (RoPE is linear, so scaling before or after rotation is the same)
        if name == "tiny-llama":
            lam = torch.clamp(torch.log(torch.arange(41).double() + 1) / math.log(6), min=1).float()
            hooks = [
                layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: o * lam[:, None])
                for layer in lm.model.model.layers
            ]
            try:
                want = lm.model(ids).logits
            finally:
                for h in hooks:
                    h.remove()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, got[:, 20:], rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3


def test_left_padding_uses_the_real_positions(tiny_llama):
    # A left-padded row must get the same logits as the same tokens unpadded: the factors follow position_ids.
    ids = sample_ids(tiny_llama, n=20)
    pad = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    with torch.inference_mode(), longkit.apply(tiny_llama.model, attention="logn", attention_args={"trained": 4}):
        alone = tiny_llama.model(ids).logits
        # transformers does not derive positions from the mask; a caller passes them as generate() does
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = tiny_llama.model(pad, attention_mask=mask, position_ids=positions).logits[:, 5:]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_entropy_scaling_skips_the_first_layers_and_composes_with_abf(tiny_llama):
    ids = sample_ids(tiny_llama, n=41)
    with torch.inference_mode():
        plain = tiny_llama.model(ids).logits
        # tiny models have 2 layers: the paper's skip of 2 leaves them unscaled
        with longkit.apply(tiny_llama.model, attention="entropy_scaling", attention_args={"trained": 4}):
            torch.testing.assert_close(tiny_llama.model(ids).logits, plain, rtol=1e-5, atol=1e-5)
        with longkit.apply(
            tiny_llama.model, attention="entropy_scaling", attention_args={"trained": 4, "skip_layers": 1}
        ):
            one = tiny_llama.model(ids).logits
        with longkit.apply(tiny_llama.model, attention="logn", attention_args={"trained": 4}):
            every = tiny_llama.model(ids).logits
        assert (one - plain).abs().max() > 1e-3 and (one - every).abs().max() > 1e-3
        with longkit.apply(tiny_llama.model, rope="abf", rope_args={"rope_theta": 5e5}):
            abf = tiny_llama.model(ids).logits
        with longkit.apply(
            tiny_llama.model,
            rope="abf",
            rope_args={"rope_theta": 5e5},
            attention="entropy_scaling",
            attention_args={"trained": 4, "skip_layers": 1},
        ):
            eabf = tiny_llama.model(ids).logits
    assert (eabf - abf).abs().max() > 1e-3 and (eabf - one).abs().max() > 1e-3


def test_defaults():
    assert REGISTRIES["attention"].create("entropy_scaling", {}).skip_layers == 2
    assert REGISTRIES["attention"].create("logn", {}).skip_layers == 0


def test_bad_input_names_the_parameter_and_range():
    with pytest.raises(MethodError, match=r"'trained' must be >= 2 \(got 1\)"):
        REGISTRIES["attention"].create("logn", {"trained": "1"})
    with pytest.raises(MethodError, match=r"'skip_layers' must be >= 0 \(got -1\)"):
        REGISTRIES["attention"].create("entropy_scaling", {"skip_layers": "-1"})
    with pytest.raises(MethodError, match=r"'inner' must be one of 'sdpa', 'blockwise'"):
        REGISTRIES["attention"].create("logn", {"inner": "flash"})
    q, _, _ = qkv(3, 3, 2)
    with pytest.raises(MethodError, match=r"'trained' must be an int >= 2 \(got 0\)"):
        log_n_scale_queries(q, torch.arange(3), 0)
