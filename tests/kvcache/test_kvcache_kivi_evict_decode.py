"""KIVI composed with eviction, read quantised while decoding (issue 24, item 4): a decode step's attention computed
from the ragged per-head packed rows (native kernel and tiled PyTorch path) against the reference path, which
dequantises the whole cache into a padded view every step (``KIVICompressedCache.read_quantised = False``)."""

from __future__ import annotations

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes, kivi_attention, kivi_native
from longkit.kvcache.kivi import _STORED, KIVICompressedCache, KIVIRaggedLayer
from longkit.kvcache.kivi_attention import kivi_decode
from longkit.kvcache.naive import kivi_decode_reference

native = pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")
KERNELS = [pytest.param("native", marks=native), "tiled"]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


def _ragged_layer(bits, g, residual, n, dtype, *, B=2, H_kv=3, D=64, steps=3, seed=0):
    """A KIVIRaggedLayer that stored a prefill of ``n`` tokens, kept a random, different number of them per head (at
    least one head keeping none quantised when the residual is large), decoded ``steps`` tokens on the reference path,
    then appended one more token deferred (read_next): the storage a deferred decode step attends over."""
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H_kv, n + steps + 1, D, generator=gen) * (1 + 4 * (torch.arange(D) == 3))).to(dtype)
    v = torch.randn(B, H_kv, n + steps + 1, D, generator=gen).to(dtype)
    layer = KIVIRaggedLayer(bits, g, residual, "float16")
    layer.update(k[:, :, :n], v[:, :, :n])
    # (B, H_kv, n) each head keeps its own random share: ragged lengths, odd counts
    keep = torch.rand(B, H_kv, n, generator=gen) < torch.linspace(0.15, 0.9, B * H_kv).view(B, H_kv, 1)
    keep[..., -1] = True
    layer.compact(keep)
    for t in range(n, n + steps):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    layer.read_next = True
    out_k, _ = layer.update(k[:, :, -1:], v[:, :, -1:])
    assert layer.deferred and out_k.shape[-2] == 1
    return layer


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("g,residual,n,H", [(32, 0, 301, 9), (8, 5, 157, 6), (16, 40, 203, 3)])
def test_ragged_read_equals_dequantise_all_then_attend(kernel, dtype, bits, g, residual, n, H):
    layer = _ragged_layer(bits, g, residual, n, dtype, seed=bits + n)
    lengths = layer.stored_lengths()
    assert layer.n_quantized > 0 and lengths.unique().numel() > 1
    q = (2 * torch.randn(2, H, 1, 64, generator=torch.Generator().manual_seed(1))).to(dtype)
    got = kivi_decode(layer, q, scale=0.1, kernel=kernel, tile=64)
    want = kivi_decode_reference(layer, q, scale=0.1)
    assert got.dtype == dtype and got.shape == (2, H, 1, 64)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    # reading the codes is not a dequantised copy: the storage is untouched, and the step's flush follows
    before = [getattr(layer, name).clone() for name in _STORED]
    kivi_decode(layer, q, kernel=kernel)
    assert all(torch.equal(a, getattr(layer, name)) for a, name in zip(before, _STORED, strict=True))
    layer.finish_step()
    assert not layer.deferred and bool((layer.r_lengths < max(residual, 1) + g).all())


@pytest.mark.parametrize("kernel", KERNELS)
def test_ragged_read_honours_a_mask_over_each_heads_rows(kernel):
    layer = _ragged_layer(2, 8, 3, 120, torch.float32, D=32)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 1, 32, generator=gen)
    mask = torch.rand(2, 6, 1, layer.max_length(), generator=gen) > 0.4
    mask[..., 0] = True
    got = kivi_decode(layer, q, mask, kernel=kernel, tile=16)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, kivi_decode_reference(layer, q), atol=1e-3)


def _gqa_model(dtype):
    """A random 2-layer Llama with SmolLM2-135M's attention shape: 9 query heads on 3 kv heads of 64 channels."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=72, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.to(dtype).eval()


def _greedy(model, spec, ids, steps, quantised, forced=None, mask=None, **apply):
    """Greedy decoding of ``steps`` tokens after ``ids`` (or feeding ``forced``): (tokens, logits (B, steps, V), cache)
    with decode steps read quantised or on the reference path."""
    with torch.inference_mode(), longkit.apply(model, kv=spec, **apply) as applied:
        cache = applied.new_cache()
        assert isinstance(cache, KIVICompressedCache)
        cache.read_quantised = quantised
        out = model(ids, cache=cache, use_cache=True, attention_mask=mask)
        tokens, logits = [], []
        for i in range(steps):
            token = out.logits[:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
            tokens.append(token)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(token, cache=cache, use_cache=True, attention_mask=mask)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1), cache


def _count_reads(monkeypatch):
    calls = []
    real = kivi_attention.kivi_decode
    monkeypatch.setattr(kivi_attention, "kivi_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _same_storage(a: KIVICompressedCache, b: KIVICompressedCache, exact_layers: int) -> None:
    assert a.nbytes() == b.nbytes() == cache_nbytes(a)
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        # which tokens are kept, and how each head's rows are split, is the eviction protocol's: identical
        assert torch.equal(x.q_lengths, y.q_lengths) and torch.equal(x.r_lengths, y.r_lengths)
        assert x.seen == y.seen and x.tail == y.tail and x.extras.keys() == y.extras.keys()
        assert all(torch.equal(t, y.extras[n]) for n, t in x.extras.items())
        if i < exact_layers:
            # the first layer's keys and values do not depend on attention: stored bit for bit alike
            assert all(torch.equal(getattr(x, n), getattr(y, n)) for n in (*_STORED, "keys", "values"))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ev,bits", [("snapkv", 2), ("knorm", 4), ("adakv", 2), ("streaming_llm", 4)])
def test_tiny_llama_decoding_reads_quantised_and_equals_the_reference_path(tiny_llama, ev, bits, kernel, monkeypatch):
    if kernel == "tiled":
        monkeypatch.setenv(kivi_native.ENV, "0")
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=131, seed=bits)
    spec = f"kivi:bits={bits},group_size=8,residual=5,evict={ev},ratio=0.5"
    calls = _count_reads(monkeypatch)
    tokens, logits, cache = _greedy(model, spec, ids, 24, quantised=True)
    # every decode step of every layer read the packed rows (the prefill's last token: quantised rows stored)
    assert len(calls) == 24 * model.config.num_hidden_layers
    assert not any(layer.deferred for layer in cache.layers)
    n_read = len(calls)
    ref_tokens, ref_logits, ref_cache = _greedy(model, spec, ids, 24, quantised=False)
    assert len(calls) == n_read
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    _same_storage(cache, ref_cache, exact_layers=1)
    if ev == "adakv":
        assert cache.layers[0].stored_lengths().unique().numel() > 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [2, 4])
def test_smollm2_shaped_decoding_equals_the_reference_path(bits, kernel, monkeypatch):
    if kernel == "tiled":
        monkeypatch.setenv(kivi_native.ENV, "0")
    model = _gqa_model(torch.float32)
    ids = torch.randint(0, 300, (1, 301), generator=torch.Generator().manual_seed(bits))
    spec = f"kivi:bits={bits},group_size=32,residual=16,evict=adakv,ratio=0.5"
    calls = _count_reads(monkeypatch)
    tokens, logits, cache = _greedy(model, spec, ids, 40, quantised=True)
    assert len(calls) == 40 * 2
    ref_tokens, ref_logits, ref_cache = _greedy(model, spec, ids, 40, quantised=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    _same_storage(cache, ref_cache, exact_layers=1)


def test_bfloat16_decoding_stays_close_to_the_reference_path(monkeypatch):
    model = _gqa_model(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 301), generator=torch.Generator().manual_seed(9))
    spec = "kivi:bits=2,group_size=32,residual=16,evict=snapkv,ratio=0.5"
    calls = _count_reads(monkeypatch)
    tokens, logits, _ = _greedy(model, spec, ids, 16, quantised=True)
    assert len(calls) == 16 * 2
    _, ref_logits, _ = _greedy(model, spec, ids, 16, quantised=False, forced=tokens)
    # the reference rounds the dequantised keys and values to bfloat16 before attending; the read does not
    err = (logits.float() - ref_logits.float()).abs().max()
    assert err < 0.05 * ref_logits.float().abs().max()


def test_a_left_padded_batch_reads_each_sequences_rows(tiny_llama, monkeypatch):
    model = tiny_llama.model
    ids = torch.cat([sample_ids(tiny_llama, n=90, seed=1), sample_ids(tiny_llama, n=90, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    spec = "kivi:bits=2,group_size=8,residual=4,evict=snapkv,ratio=0.5"
    calls = _count_reads(monkeypatch)
    tokens, logits, cache = _greedy(model, spec, ids, 12, quantised=True, mask=mask)
    assert len(calls) == 12 * model.config.num_hidden_layers
    ref_tokens, ref_logits, ref_cache = _greedy(model, spec, ids, 12, quantised=False, mask=mask)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    _same_storage(cache, ref_cache, exact_layers=1)


def test_without_eviction_the_models_mask_covers_the_stored_rows(tiny_llama, monkeypatch):
    # ratio 1 keeps everything: no layer compacts, so transformers' own mask reaches the read, in the rows' order
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=70, seed=5)
    spec = "kivi:bits=4,group_size=8,residual=3,evict=knorm,ratio=1.0"
    calls = _count_reads(monkeypatch)
    tokens, logits, cache = _greedy(model, spec, ids, 10, quantised=True)
    # the prefill's own tokens are not quantised by it (eviction may still choose among them): the first step has
    # nothing quantised to read and takes the reference path; its flush quantises, and every later step reads
    assert len(calls) == 9 * model.config.num_hidden_layers and not cache.own_mask
    ref_tokens, ref_logits, _ = _greedy(model, spec, ids, 10, quantised=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_a_method_that_scores_every_step_keeps_the_reference_path(tiny_llama, monkeypatch):
    # H2O updates its accumulated attention at every step from the padded view: nothing is read quantised
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=80, seed=6)
    spec = "kivi:bits=2,group_size=8,residual=4,evict=h2o,ratio=0.5"
    calls = _count_reads(monkeypatch)
    _, logits, cache = _greedy(model, spec, ids, 6, quantised=True)
    _, ref_logits, ref_cache = _greedy(model, spec, ids, 6, quantised=False)
    assert not calls and torch.equal(logits, ref_logits)
    _same_storage(cache, ref_cache, exact_layers=len(cache.layers))


def test_generate_reads_quantised_and_matches_the_reference(tiny_llama, monkeypatch):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=100, seed=11)
    spec = "kivi:bits=2,group_size=8,residual=4,evict=snapkv,ratio=0.25"
    calls = _count_reads(monkeypatch)
    out = {}
    for quantised in (True, False):
        with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
            cache = applied.new_cache()
            cache.read_quantised = quantised
            out[quantised] = model.generate(ids, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert len(calls) == 7 * model.config.num_hidden_layers
    assert torch.equal(out[True], out[False])


def test_a_deferred_step_whose_attention_did_not_run_is_refused():
    layer = _ragged_layer(2, 8, 0, 60, torch.float32, D=16)
    step = torch.randn(2, 3, 1, 16)
    with pytest.raises(MethodError, match="did not read this cache layer"):
        layer.update(step, step)


def test_attention_the_read_does_not_compute_runs_over_the_padded_storage(tiny_llama, monkeypatch):
    # a keyword the model passes to its attention function beyond q, k, v and the mask (here a softcap, injected; on
    # eager, which sdpa refuses it): the step's attention is the model's own over the padded storage, as the
    # reference path's
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=90, seed=12)
    spec = "kivi:bits=2,group_size=8,residual=4,evict=adakv,ratio=0.5"
    seen = []

    def softcap(module, args, kwargs):
        seen.append(1)
        return args, {**kwargs, "softcap": 30.0}

    handles = [m.register_forward_pre_hook(softcap, with_kwargs=True) for m in model.modules()
               if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]  # fmt: skip
    finished = []
    real = KIVIRaggedLayer.finish_step
    monkeypatch.setattr(KIVIRaggedLayer, "finish_step", lambda self: finished.append(1) or real(self))
    try:
        calls = _count_reads(monkeypatch)
        tokens, logits, cache = _greedy(model, spec, ids, 8, quantised=True, attention="eager")
        # the steps were deferred (and finished by the hook), yet none was read from the codes
        assert len(finished) == 8 * model.config.num_hidden_layers
        ref_tokens, ref_logits, ref_cache = _greedy(model, spec, ids, 8, quantised=False, attention="eager")
    finally:
        for h in handles:
            h.remove()
    assert seen and not calls and not any(layer.deferred for layer in cache.layers)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    _same_storage(cache, ref_cache, exact_layers=1)
