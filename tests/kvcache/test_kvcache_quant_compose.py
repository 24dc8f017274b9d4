"""KIVI composed with eviction: ``kv=kivi:evict=<method>,ratio=r`` evicts in full precision, then quantises the kept
tokens (ragged per-head storage preserved). Bytes are exact; the kept set is the eviction method's own."""

from __future__ import annotations

import pytest
import torch
from test_kvcache_quant import _loop_fake_quant

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes
from longkit.kvcache.kivi import KIVICompressedCache, KIVIRaggedLayer
from longkit.registry import REGISTRIES

SPEC = "kivi:bits={bits},group_size=8,residual={r},evict={ev},ratio=0.5"


def _prefill(model, ids, spec):
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        logits = model(ids, cache=cache, use_cache=True).logits
    return cache, logits


def _layer_bytes(q: torch.Tensor, r: torch.Tensor, d: int, bits: int, g: int, scale_bytes: int, elem_bytes: int) -> int:
    """Formula for one layer from per-head quantised/residual counts (B, H_kv)."""
    sq, sr = int(q.sum()), int(r.sum())
    codes = 2 * sq * d * bits // 8
    key_scales = 2 * (sq // g) * d * scale_bytes
    value_scales = 2 * sq * (d // g) * scale_bytes
    residual = 2 * sr * d * elem_bytes
    counts = 2 * q.numel() * 8  # q_lengths and r_lengths, int64 per (sequence, head)
    return codes + key_scales + value_scales + residual + counts


@pytest.mark.parametrize("ev,bits,r", [("snapkv", 2, 8), ("adakv", 4, 5), ("knorm", 2, 0)])
def test_composed_bytes_are_exact_and_eviction_keeps_its_own_budget(tiny_llama, ev, bits, r):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=97, seed=4)
    plain, plain_logits = _prefill(model, ids, f"{ev}:ratio=0.5")
    cache, logits = _prefill(model, ids, SPEC.format(bits=bits, r=r, ev=ev))
    assert isinstance(cache, KIVICompressedCache)
    # prefill attends to exact keys: the same logits as plain eviction
    assert torch.equal(logits, plain_logits)
    total = 0
    for layer, plain_layer in zip(cache.layers, plain.layers, strict=True):
        kept = plain_layer.stored_lengths()
        # same per-head budget; per head the newest `r` kept tokens stay exact, older ones fill whole groups of 8
        assert torch.equal(layer.stored_lengths(), kept)
        assert torch.equal(layer.q_lengths, torch.clamp((kept - r) // 8 * 8, min=0))
        total += _layer_bytes(layer.q_lengths, layer.r_lengths, 16, bits, 8, 2, 4)
    assert cache.nbytes() == cache_nbytes(cache) == total
    # and far fewer bytes than plain eviction alone
    assert cache.nbytes() < (0.45 if bits == 2 else 0.6) * cache_nbytes(plain)


def test_composed_storage_is_the_fake_quantised_eviction(tiny_llama):
    # adakv gives ragged per-head lengths: every head's rows are quantised in its own groups
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=97, seed=6)
    plain, _ = _prefill(model, ids, "adakv:ratio=0.5")
    cache, _ = _prefill(model, ids, SPEC.format(bits=2, r=3, ev="adakv"))
    for layer, plain_layer in zip(cache.layers, plain.layers, strict=True):
        pk, pv, pvalid, _ = plain_layer.padded()
        qk, qv, qvalid, _ = layer.padded()
        for h in range(pk.shape[1]):
            n = int(plain_layer.stored_lengths()[0, h])
            nq = int(layer.q_lengths[0, h])
            # (n, D) the head's kept keys/values, exact from plain eviction
            k = pk[0, h][pvalid[0, h]] if pvalid is not None else pk[0, h, :n]
            v = pv[0, h][pvalid[0, h]] if pvalid is not None else pv[0, h, :n]
            got_k = qk[0, h][qvalid[0, h]] if qvalid is not None else qk[0, h, :n]
            got_v = qv[0, h][qvalid[0, h]] if qvalid is not None else qv[0, h, :n]
            ref_k, _ = _loop_fake_quant(k[:nq], 2, 8, 0, torch.float16)
            ref_v, _ = _loop_fake_quant(v[:nq], 2, 8, -1, torch.float16)
            torch.testing.assert_close(got_k[:nq], ref_k, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_v[:nq], ref_v, rtol=0, atol=1e-5)
            assert torch.equal(got_k[nq:], k[nq:]) and torch.equal(got_v[nq:], v[nq:])


@pytest.mark.parametrize("ev", ["snapkv", "adakv", "streaming_llm", "h2o", "tova"])
def test_composed_decoding_stays_close_to_plain_eviction_and_generate_works(tiny_llama, ev):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=80, seed=2)
    nxt = sample_ids(tiny_llama, n=6, seed=3)
    out = {}
    # the composition evicts once, after prefill: compare with the method doing the same
    for spec in (f"{ev}:ratio=0.5,decode_every=0", SPEC.format(bits=4, r=4, ev=ev)):
        with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
            cache = applied.new_cache()
            model(ids, cache=cache, use_cache=True)
            out[spec] = torch.cat([model(nxt[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(6)], 1)
            assert cache.get_seq_length() == 86
            gen = model.generate(ids, cache=applied.new_cache(), max_new_tokens=6, min_new_tokens=6, do_sample=True)
            assert gen.shape == (1, 86)
    plain, quant = out.values()
    assert torch.isfinite(quant).all()
    assert float((quant - plain).abs().max()) < 0.05 * float(plain.abs().max())


def test_decoding_quantises_in_groups_per_head(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=64, seed=8)
    with torch.inference_mode(), longkit.apply(model, kv=SPEC.format(bits=2, r=4, ev="adakv")) as applied:
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        kept = [layer.stored_lengths().clone() for layer in cache.layers]
        for step in range(12):
            model(sample_ids(tiny_llama, n=1, seed=50 + step), cache=cache, use_cache=True)
            for layer in cache.layers:
                assert bool((layer.q_lengths % 8 == 0).all())
                # the newest max(residual, 1) tokens are exact, and a whole group is never left waiting
                assert bool((layer.r_lengths >= 4).all()) and bool((layer.r_lengths < 4 + 8).all())
        assert isinstance(cache.layers[0], KIVIRaggedLayer)
        # eviction is one-shot in the composition: decoding appends, it never drops (or re-quantises) a token
        assert all(torch.equal(layer.stored_lengths(), k + 12) for layer, k in zip(cache.layers, kept, strict=True))


@pytest.mark.parametrize(
    "args,match",
    [
        ({"evict": "nonsense"}, r"'evict' must be one of .*snapkv"),
        ({"evict": "kivi"}, r"'evict' must be one of"),
        ({"ratio": "0.5"}, r"'ratio' needs an eviction method in 'evict'"),
        ({"evict": "snapkv", "ratio": "0"}, r"'ratio' must be > 0.0"),
    ],
)
def test_bad_composition_parameters(args, match):
    with pytest.raises(MethodError, match=match):
        REGISTRIES["kv"].create("kivi", args)


def test_composition_through_the_spec_string(tiny_llama):
    spec = longkit.MethodSpec.parse("kv=kivi:bits=2,group_size=8,evict=snapkv,ratio=0.25")
    assert spec.label() == "kv=kivi:bits=2,group_size=8,evict=snapkv,ratio=0.25"
    with pytest.raises(MethodError, match="must divide the head dimension 16"):
        with longkit.apply(tiny_llama.model, kv="kivi:evict=snapkv,ratio=0.5") as applied:
            applied.new_cache()
