"""KIVI read quantised: single-query attention from the packed codes, tile by tile, against the reference that
dequantises the whole cache; and the hook that runs it while decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import run_kv, sample_ids
from longkit.errors import MethodError
from longkit.kvcache import KIVICache, kivi_attention
from longkit.kvcache.hook import CACHE_KWARG
from longkit.kvcache.kivi import KIVILayer
from longkit.kvcache.kivi_attention import kivi_decode
from longkit.kvcache.naive import kivi_decode_reference


def _layer(bits, g, residual, n, dtype, seed=0, B=2, H_kv=2, D=16):
    """A dense KIVI layer that saw ``n`` tokens: a prefill of n - 5, then 5 single-token steps (no hook)."""
    gen = torch.Generator().manual_seed(seed)
    k = (3 * torch.randn(B, H_kv, n, D, generator=gen)).to(dtype)
    v = torch.randn(B, H_kv, n, D, generator=gen).to(dtype)
    layer = KIVILayer(bits, g, residual, "float16")
    layer.update(k[:, :, : n - 5], v[:, :, : n - 5])
    for t in range(n - 5, n):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("residual,n", [(0, 37), (8, 61), (5, 203)])
@pytest.mark.parametrize("tile", [8, 24, 4096])
def test_quantised_read_equals_dequantise_all_then_attend(dtype, bits, residual, n, tile):
    layer = _layer(bits, 4, residual, n, dtype, seed=bits + n)
    assert layer.n_quantized > 0
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 1, 16, generator=gen).to(dtype)
    got = kivi_decode(layer, q, scale=0.2, tile=tile)
    want = kivi_decode_reference(layer, q, scale=0.2)
    assert got.dtype == dtype and got.shape == (2, 6, 1, 16)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("per_head", [True, False])
def test_quantised_read_honours_the_mask(per_head):
    layer = _layer(2, 4, 3, 50, torch.float32)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    mask = torch.rand(2, 4 if per_head else 1, 1, 50, generator=gen) > 0.5
    mask[..., -1] = True
    got = kivi_decode(layer, q, mask, tile=8)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, kivi_decode_reference(layer, q), atol=1e-3)


def _args(spec):
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(":", 1)[1].split(","))}


@pytest.mark.parametrize("spec", ["kivi:bits=2,group_size=8,residual=4", "kivi:bits=4,group_size=4,residual=0"])
def test_hooked_decoding_reads_quantised_and_matches_the_reference_path(tiny_llama, spec, monkeypatch):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=60, seed=7)
    calls = []
    real = kivi_attention.kivi_decode
    monkeypatch.setattr(kivi_attention, "kivi_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got, cache = run_kv(model, spec, ids, n_decode=60 - 41)
    # every decode step of every layer read the quantised storage
    assert len(calls) == 19 * model.config.num_hidden_layers
    assert not any(layer.deferred for layer in cache.layers)
    # the reference: the same cache without the hook (dequantise everything, then the model's own sdpa)
    ref_cache = KIVICache(model.config, **_args(spec))
    with torch.inference_mode():
        ref = [model(ids[:, :41], cache=ref_cache, use_cache=True).logits[:, -1:]]
        ref += [model(ids[:, i : i + 1], cache=ref_cache, use_cache=True).logits for i in range(41, 60)]
    torch.testing.assert_close(got, torch.cat(ref, 1), rtol=1e-4, atol=1e-5)
    assert cache.nbytes() == ref_cache.nbytes()
    # the first layer's keys do not depend on attention: stored exactly alike
    a, b = cache.layers[0], ref_cache.layers[0]
    assert torch.equal(a.qkeys, b.qkeys) and torch.equal(a.keys, b.keys) and torch.equal(a.v_scale, b.v_scale)


def test_a_deferred_step_whose_attention_did_not_run_is_refused():
    layer = _layer(2, 4, 0, 20, torch.float32)
    step = torch.randn(2, 2, 1, 16)
    k, _ = layer.update(step, step, kwargs={CACHE_KWARG: object()})
    # only the residual came back: the attention must read the quantised part itself
    assert layer.deferred and k.shape[-2] == layer.keys.shape[-2] < 21
    with pytest.raises(MethodError, match="did not read this cache layer"):
        layer.update(step, step)


def test_quantised_groups_append_in_place(tiny_llama):
    layer = KIVILayer(2, 4, 4, "float16")
    gen = torch.Generator().manual_seed(0)
    layer.update(torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen))
    ptrs = {layer.qkeys.data_ptr(), layer.keys.data_ptr()}
    for _ in range(12):
        x = torch.randn(1, 2, 1, 16, generator=gen)
        layer.update(x, x)
    assert layer.n_quantized == 28 and {layer.qkeys.data_ptr(), layer.keys.data_ptr()} == ptrs
