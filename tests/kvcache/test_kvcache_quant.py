"""KIVI quantisation: packing, the quantiser against a per-group loop, the cache against a fake-quant reference,
exact bytes, and the model-level behaviour (logits, decoding, generate, batching, bad parameters)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import KIVICache, cache_nbytes
from longkit.kvcache.quant import dequantize, pack, quantize, unpack
from longkit.registry import REGISTRIES

SD = {"float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 7, 24), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 7, 24 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_is_little_end_first():
    # four 2-bit codes per byte: 1 | 2<<2 | 3<<4 | 0<<6 = 57; two 4-bit codes: 5 | 12<<4 = 197
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [57]
    assert pack(torch.tensor([5, 12, 15, 0]), 4).tolist() == [197, 15]


def test_pack_rejects_bad_bits_and_lengths():
    with pytest.raises(MethodError, match="'bits' must be one of 2, 4"):
        pack(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(MethodError, match="multiple of 4"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)


# ---------------------------------------------------------------- the quantiser


def _loop_fake_quant(
    x: torch.Tensor, bits: int, g: int, axis: int, sd: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-group loop: (dequantised x, per-element scale of its group), independent of quant.py's reshapes."""
    levels = 2**bits - 1
    xt = x.float().movedim(axis, -1).contiguous()
    out = torch.empty_like(xt)
    scl = torch.empty_like(xt)
    flat, fout, fscl = xt.reshape(-1, xt.shape[-1]), out.view(-1, xt.shape[-1]), scl.view(-1, xt.shape[-1])
    for r in range(flat.shape[0]):
        for s in range(0, flat.shape[1], g):
            grp = flat[r, s : s + g]
            lo, hi = float(grp.min()), float(grp.max())
            zero = torch.tensor(lo).to(sd)
            if float(zero) > lo:
                zero = torch.nextafter(zero, torch.tensor(float("-inf"), dtype=sd))
            scale = torch.tensor((hi - float(zero)) / levels, dtype=torch.float32).to(sd)
            if float(scale) < (hi - float(zero)) / levels:
                scale = torch.nextafter(scale, torch.tensor(float("inf"), dtype=sd))
            z, sc = float(zero), float(scale)
            # divide by a tensor: torch turns division by a Python scalar into a multiply by its reciprocal
            q = torch.clamp(torch.round((grp - z) / torch.full_like(grp, sc)), 0, levels) if sc > 0 else grp * 0
            fout[r, s : s + g] = q * sc + z
            fscl[r, s : s + g] = sc
    return out.movedim(-1, axis), scl.movedim(-1, axis)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("axis", [-2, -1], ids=["per-channel", "per-token"])
def test_quantiser_matches_a_per_group_loop_and_error_is_at_most_half_a_step(bits, dtype, scale_dtype, axis):
    g = torch.Generator().manual_seed(7)
    # (B, H_kv, S, D) with a few outlier channels, as real keys have
    x = torch.randn(1, 2, 24, 16, generator=g) * torch.linspace(0.1, 8.0, 16)
    x[..., 3, :] = 1.5  # a constant group along tokens for channel-wise groups
    x = x.to(dtype)
    codes, scale, zero = quantize(x, bits, 8, axis=axis, scale_dtype=SD[scale_dtype])
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == SD[scale_dtype] and zero.dtype == SD[scale_dtype]
    expect = list(x.shape)
    expect[axis] //= 8
    assert list(scale.shape) == expect == list(zero.shape)
    deq = dequantize(codes, scale, zero, 8, axis=axis, dtype=torch.float32)
    ref, step = _loop_fake_quant(x, bits, 8, axis, SD[scale_dtype])
    torch.testing.assert_close(deq, ref, rtol=0, atol=1e-5)
    # the KIVI bound, per group: |x - x_hat| <= scale / 2 (plus float32 rounding of q * scale + zero)
    err = (x.float() - deq).abs()
    assert bool((err <= step / 2 + 1e-5 * (1 + x.float().abs())).all())
    # and it is tight: half a step is reached somewhere (a wrong rounding would not show up otherwise)
    assert float((err / step.clamp_min(1e-12)).max()) > 0.4


def test_quantiser_rejects_overflow_in_float16_scales():
    x = torch.tensor([[0.0, 1e6, -1e6, 3.0]])
    with pytest.raises(MethodError, match="scale_dtype='float32'"):
        quantize(x, 4, 4, axis=-1, scale_dtype=torch.float16)
    codes, s, z = quantize(x, 4, 4, axis=-1, scale_dtype=torch.float32)
    assert torch.isfinite(dequantize(codes, s, z, 4, -1, torch.float32)).all()


# ---------------------------------------------------------------- the cache layer against a fake-quant reference


def _reference(k: torch.Tensor, v: torch.Tensor, bits: int, g: int, residual: int, sd: torch.dtype, seen: int):
    """What a KIVI cache holding ``seen`` tokens must return: tokens older than the flushed groups fake-quantised
    (keys in groups of g tokens per channel from token 0, values in groups of g channels per token), rest exact."""
    extra = seen - residual
    n = (extra // g) * g if extra >= g else 0
    kq, _ = _loop_fake_quant(k[..., :n, :], bits, g, -2, sd) if n else (k[..., :0, :], None)
    vq, _ = _loop_fake_quant(v[..., :n, :], bits, g, -1, sd) if n else (v[..., :0, :], None)
    return torch.cat([kq.to(k.dtype), k[..., n:seen, :]], -2), torch.cat([vq.to(v.dtype), v[..., n:seen, :]], -2), n


@pytest.mark.parametrize("bits,g,residual,prefill", [(2, 8, 4, 29), (4, 4, 0, 3), (2, 16, 32, 40), (4, 8, 128, 50)])
def test_cache_matches_fake_quant_reference_step_by_step(bits, g, residual, prefill):
    from longkit.kvcache.kivi import KIVILayer

    gen = torch.Generator().manual_seed(bits * 100 + g)
    k = torch.randn(2, 2, prefill + 21, 16, generator=gen)
    v = torch.randn(2, 2, prefill + 21, 16, generator=gen)
    layer = KIVILayer(bits, g, residual, "float16")
    # prefill attends to exact keys (as in KIVI): the update's return is the exact input
    out_k, out_v = layer.update(k[..., :prefill, :], v[..., :prefill, :])
    assert torch.equal(out_k, k[..., :prefill, :]) and torch.equal(out_v, v[..., :prefill, :])
    seen = prefill
    for t in range(prefill, k.shape[-2], 3):
        step_k, step_v = k[..., t : t + 3, :], v[..., t : t + 3, :]
        out_k, out_v = layer.update(step_k, step_v)
        # what attention sees now = the cache before this step (stored state) + the new tokens exactly
        ref_k, ref_v, _ = _reference(k, v, bits, g, residual, torch.float16, seen)
        torch.testing.assert_close(out_k, torch.cat([ref_k, step_k], -2), rtol=0, atol=1e-5)
        torch.testing.assert_close(out_v, torch.cat([ref_v, step_v], -2), rtol=0, atol=1e-5)
        seen += step_k.shape[-2]
        _, _, n = _reference(k, v, bits, g, residual, torch.float16, seen)
        assert layer.n_quantized == n and layer.get_seq_length() == seen
        # the most recent `residual` tokens are always exact; the residual never holds a whole extra group
        assert residual <= layer.keys.shape[-2] < residual + g or seen < residual + g


def _expected_bytes(b, h, d, layers, sq, sr, bits, g, scale_bytes, elem_bytes):
    codes = 2 * b * h * sq * d * bits // 8
    key_scales = 2 * b * h * (sq // g) * d * scale_bytes  # scale + zero per (G tokens, channel)
    value_scales = 2 * b * h * sq * (d // g) * scale_bytes  # scale + zero per (token, G channels)
    residual = 2 * b * h * sr * d * elem_bytes
    return layers * (codes + key_scales + value_scales + residual)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("g,residual,scale_dtype", [(8, 16, "float16"), (16, 0, "float32"), (4, 7, "float16")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_exact(tiny_llama, bits, g, residual, scale_dtype, dtype):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=53)
    cache = KIVICache(model.config, bits, g, residual, scale_dtype)
    # A copy: casting the shared fixture to bf16 and back would round its weights for every later test.
    run = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
    with torch.inference_mode():
        run(ids, cache=cache, use_cache=True)
    cfg = model.config
    sq = ((53 - residual) // g) * g if 53 - residual >= g else 0
    expect = _expected_bytes(
        1,
        cfg.num_key_value_heads,
        16,
        cfg.num_hidden_layers,
        sq,
        53 - sq,
        bits,
        g,
        2 if scale_dtype == "float16" else 4,
        2 if dtype == torch.bfloat16 else 4,
    )
    assert cache.nbytes() == cache_nbytes(cache) == expect
    assert cache.layers[0].n_quantized == sq and cache.get_seq_length() == 53


def test_two_bit_cache_is_about_a_fifth_of_bf16_at_long_lengths():
    # KIVI-2, G=32, fp16 scales, D=64 (SmolLM2): 2-bit codes + (scale + zero) * 16 bits / 32 elements = 3 bits/element
    from longkit.kvcache.kivi import KIVILayer

    layer = KIVILayer(2, 32, 128, "float16")
    k = torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16)
    layer.update(k, k.clone())
    full = 2 * k.numel() * 2
    assert layer.n_quantized == 3968
    quant_part = layer.nbytes() - 2 * 3 * 128 * 64 * 2
    assert quant_part * 8 == 3 * (2 * 3 * 3968 * 64)  # 3 bits per element = 3/16 of bf16
    assert layer.nbytes() / full < 0.22


# ---------------------------------------------------------------- through the seam, on models


def _decode_logits(model, ids, cache, prefill):
    model(ids[:, :prefill], cache=cache, use_cache=True)
    return torch.cat(
        [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(prefill, ids.shape[1])], 1
    )


def test_four_bit_logits_are_close_to_full_precision_and_two_bit_is_further(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=90, seed=3)
    errs = {}
    with torch.inference_mode():
        full = model(ids).logits[:, 70:]
        for bits in (4, 2):
            with longkit.apply(model, kv=f"kivi:bits={bits},group_size=8,residual=0") as applied:
                cache = applied.new_cache()
                got = _decode_logits(model, ids, cache, 70)
                assert cache.layers[0].n_quantized == 88
            errs[bits] = float((got - full).abs().max())
    scale = float(full.abs().max())
    assert errs[4] < 0.02 * scale, errs
    assert errs[2] > 2 * errs[4], errs
    assert errs[2] < 0.2 * scale, errs


def test_residual_covering_everything_is_bit_identical_to_the_plain_cache(any_tiny):
    model = any_tiny.model
    ids = sample_ids(any_tiny, n=40)
    with torch.inference_mode():
        ref = _decode_logits(model, ids, DynamicCache(config=model.config), 30)
        with longkit.apply(model, kv="kivi:bits=2,group_size=8,residual=64") as applied:
            got = _decode_logits(model, ids, applied.new_cache(), 30)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_works_and_greedy_matches_fp_when_quantisation_is_mild(tiny_llama, do_sample):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=48, seed=5)
    with torch.inference_mode(), longkit.apply(model, kv="kivi:bits=4,group_size=8,residual=8") as applied:
        cache = applied.new_cache()
        torch.manual_seed(0)
        out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=do_sample, min_new_tokens=12)
        assert out.shape == (1, 60)
        assert cache.get_seq_length() == 59 and cache.layers[0].n_quantized == 48
    if not do_sample:
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert torch.equal(out, ref)


def test_batch_rows_are_quantised_independently(tiny_qwen2):
    model = tiny_qwen2.model
    a, b = sample_ids(tiny_qwen2, n=40, seed=1), sample_ids(tiny_qwen2, n=40, seed=2)
    spec = "kivi:bits=2,group_size=8,residual=0"
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        both = _decode_logits(model, torch.cat([a, b]), applied.new_cache(), 30)
        one = _decode_logits(model, a, applied.new_cache(), 30)
        two = _decode_logits(model, b, applied.new_cache(), 30)
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=1e-4, atol=1e-5)


def test_beam_reorder_and_batch_select_move_every_stored_tensor():
    from longkit.kvcache.kivi import KIVILayer

    layer = KIVILayer(2, 4, 2, "float16")
    k = torch.randn(3, 1, 11, 8)
    layer.update(k, -k)
    before_k, before_v = layer.dequantized()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after_k, after_v = layer.dequantized()
    assert torch.equal(after_k, before_k[[2, 0, 1]]) and torch.equal(after_v, before_v[[2, 0, 1]])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.dequantized()[0], before_k[[0]])
    layer.crop(-1)
    assert layer.get_seq_length() == 10
    with pytest.raises(MethodError, match="can only crop the 2 full-precision residual tokens"):
        layer.crop(-5)


@pytest.mark.parametrize(
    "args,match",
    [
        ({"bits": "3"}, r"'bits' must be one of 2, 4 \(got 3\)"),
        ({"bits": "8"}, r"'bits' must be one of 2, 4"),
        ({"group_size": "0"}, r"'group_size' must be >= 1"),
        ({"residual": "-1"}, r"'residual' must be >= 0"),
        ({"scale_dtype": "bfloat16"}, r"'scale_dtype' must be one of 'float16', 'float32'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_range(args, match):
    with pytest.raises(MethodError, match=match):
        REGISTRIES["kv"].create("kivi", args)


def test_group_size_must_divide_the_head_dim(tiny_llama):
    with pytest.raises(MethodError, match=r"'group_size' must divide the head dimension 16 .*got 32"):
        with longkit.apply(tiny_llama.model, kv="kivi") as applied:
            applied.new_cache()
    with pytest.raises(MethodError, match="must divide the head dimension 16"):
        with longkit.apply(tiny_llama.model, kv="kivi:group_size=6") as applied:
            applied.new_cache()


def test_spec_label_and_describe():
    m = REGISTRIES["kv"].create("kivi", {"bits": "4", "group_size": "16"})
    assert m.label() == "kivi:bits=4,group_size=16"
    assert REGISTRIES["kv"].create("kivi").label() == "kivi:bits=2"
    d = m.describe()
    assert "arxiv.org/abs/2402.02750" in d["paper"]
    assert {p["name"] for p in d["parameters"]} == {"bits", "group_size", "residual", "scale_dtype", "evict", "ratio"}
