"""Caches that do not copy themselves: growing buffers (longkit.kvcache.grow) under RaggedLayer's dense layout."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import longkit
from conftest import sample_ids
from longkit.kvcache import cache_nbytes
from longkit.kvcache.grow import CHUNK, grow_append, is_prefix
from longkit.kvcache.storage import RaggedLayer


def test_grow_append_equals_cat_and_writes_in_place_until_full():
    cur = torch.arange(24.0).view(1, 2, 3, 4)
    buf, view = grow_append(None, cur, cur[:, :, :1] + 100, dim=-2, chunk=2)
    assert torch.equal(view, torch.cat([cur, cur[:, :, :1] + 100], dim=-2))
    # room for 4 + max(2, 4 // 8) = 6 slots
    assert buf.shape == (1, 2, 6, 4) and is_prefix(buf, view, 2)
    ptr = buf.data_ptr()
    new = torch.full((1, 2, 2, 4), 7.0)
    buf2, view2 = grow_append(buf, view, new, dim=2, chunk=2)
    assert buf2 is buf and view2.data_ptr() == ptr and torch.equal(view2[:, :, 4:], new)
    # full: a new buffer, with the same contents
    buf3, view3 = grow_append(buf2, view2, new, dim=2, chunk=2)
    assert buf3 is not buf and torch.equal(view3, torch.cat([view2, new], dim=2))
    # a tensor that is not the buffer's filled part (replaced by a compaction) is never written into the buffer
    other = view3.clone()
    buf4, _ = grow_append(buf3, other, new, dim=2)
    assert buf4 is not buf3 and torch.equal(buf3.narrow(2, 0, 8), view3)


def _steps(model, spec, ids, n_decode):
    """Prefill, then decode n_decode tokens; yield the cache after every forward."""
    with torch.inference_mode(), longkit.apply(model, kv=spec) as applied:
        cache = applied.new_cache()
        T = ids.shape[1] - n_decode
        model(ids[:, :T], cache=cache, use_cache=True)
        yield cache
        for i in range(T, ids.shape[1]):
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
            yield cache


def test_decoding_appends_in_place_and_counts_only_stored_bytes(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    ptrs, caches = [], []
    for cache in _steps(model, "snapkv:ratio=1.0", ids, 8):
        layer = cache.layers[0]
        ptrs.append((layer.keys.data_ptr(), layer.values.data_ptr()))
        caches.append(cache)
    # every decode step wrote into the buffer allocated at prefill: the stored tokens were never copied again
    assert len(set(ptrs)) == 1
    layer = cache.layers[0]
    assert set(layer.buffers) == {"keys", "values"}
    with torch.inference_mode():
        dyn = DynamicCache(config=model.config)
        model(ids[:, :32], cache=dyn, use_cache=True)
        for i in range(32, 40):
            model(ids[:, i : i + 1], cache=dyn, use_cache=True)
    # nbytes: the bytes of the 40 stored tokens, as transformers' own cache holds them; spare capacity apart
    assert cache_nbytes(cache) == cache_nbytes(dyn)
    per_token = 2 * model.config.num_key_value_heads * layer.keys.shape[-1] * layer.keys.element_size()
    assert layer.capacity_nbytes() == layer.nbytes() + per_token * (32 + CHUNK - 40)
    for got, want in zip(cache.layers, dyn.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_eviction_releases_the_buffers_and_decoding_starts_new_ones(tiny_llama):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=40)
    steps = _steps(model, "snapkv:ratio=0.5", ids, 3)
    cache = next(steps)
    layer = cache.layers[0]
    # the compaction after prefill replaced the stored tensors: no buffer holds the evicted tokens' memory
    assert layer.buffers == {} and layer.capacity_nbytes() == layer.nbytes()
    next(steps)
    ptr = layer.keys.data_ptr()
    list(steps)
    assert layer.keys.data_ptr() == ptr and layer.keys.shape[-2] == 18 + 3


def test_copy_crop_and_tracked_extras_stay_right():
    layer = RaggedLayer(track=("pos",))
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, -k)
    twin = __import__("copy").deepcopy(layer)
    for t in range(3):
        step = torch.full((1, 2, 1, 4), float(t))
        layer.update(step, -step)
    # the copy shares nothing with the original's buffers
    assert twin.keys.shape[-2] == 5 and torch.equal(twin.keys, k)
    layer.crop(-2)
    new = torch.full((1, 2, 1, 4), 9.0)
    keys, values = layer.update(new, -new)
    assert torch.equal(keys[0, 0, :, 0], torch.tensor([*k[0, 0, :, 0].tolist(), 0.0, 9.0]))
    assert torch.equal(values, -keys)
    assert layer.extras["pos"][0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert "pos" in layer.buffers and layer.nbytes() == 2 * 7 * 2 * 4 * 4 + 2 * 7 * 8


def test_the_seams_default_cache_grows_in_place_and_equals_transformers_own(any_tiny):
    from longkit.kvcache.grow import GrowingLayer

    model = any_tiny.model
    ids = sample_ids(any_tiny, n=30)
    with torch.inference_mode(), longkit.apply(model) as applied:
        cache, dyn = applied.new_cache(), DynamicCache(config=model.config)
        assert isinstance(cache, DynamicCache) and any(isinstance(la, GrowingLayer) for la in cache.layers)
        outs = []
        for c in (cache, dyn):
            logits = [model(ids[:, :20], cache=c, use_cache=True).logits]
            ptr = c.layers[0].keys.data_ptr()
            logits += [model(ids[:, i : i + 1], cache=c, use_cache=True).logits for i in range(20, 30)]
            outs.append((torch.cat(logits, 1), c.layers[0].keys.data_ptr() == ptr))
    assert torch.equal(outs[0][0], outs[1][0])
    # the growing cache kept its buffer (whether transformers' re-concatenated cache lands at the same address is
    # up to the allocator, which may hand the freed block back: not asserted)
    assert outs[0][1]
    assert cache_nbytes(cache) == cache_nbytes(dyn) and cache.get_seq_length() == 30
    cache.crop(-3)
    assert cache.get_seq_length() == 27


def test_appends_to_the_view_last_returned_skip_the_prefix_check_and_nothing_else():
    layer = RaggedLayer()
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, -k)
    buf = layer.buffers["keys"]
    expected = k
    for t in range(3):
        step = torch.full((1, 2, 1, 4), float(t))
        keys, _ = layer.update(step, -step)
        expected = torch.cat([expected, step], dim=-2)
        # the remembered (buffer, view) pair is the stored view of the same buffer: written in place
        assert layer.buffers["keys"] is buf and layer._grown["keys"] == (buf, keys) and keys is layer.keys
        assert keys.data_ptr() == buf.data_ptr() and torch.equal(keys, expected)
    # a stored tensor replaced from outside (a compaction would) is never the remembered view: a new buffer, and
    # the old one keeps what it held
    layer.keys = layer.keys.clone()
    before = buf.narrow(2, 0, 8).clone()
    step = torch.full((1, 2, 1, 4), 9.0)
    keys, _ = layer.update(step, -step)
    assert layer.buffers["keys"] is not buf and torch.equal(buf.narrow(2, 0, 8), before)
    assert torch.equal(keys, torch.cat([expected, step], dim=-2))
    # a forgotten buffer's view is forgotten too (it would keep the buffer's memory alive)
    layer.keys = layer.keys.clone()
    layer.prune_buffers()
    assert "keys" not in layer.buffers and "keys" not in layer._grown and "values" in layer._grown
