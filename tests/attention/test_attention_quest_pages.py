"""Quest's page metadata kept between decoding steps (PageBounds): equal to recomputing it from all keys."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import longkit
import longkit.attention.quest as quest
from conftest import sample_ids
from longkit.attention.quest import PageBounds, page_bounds
from longkit.kvcache.grow import grow_append


@pytest.fixture
def full_recomputes(monkeypatch):
    calls = []
    real = quest.page_bounds
    monkeypatch.setattr(quest, "page_bounds", lambda k, p: calls.append(k.shape[2]) or real(k, p))
    return calls


@pytest.mark.parametrize("inference", [False, True])
def test_bounds_kept_in_place_equal_recomputing_them(full_recomputes, inference):
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(inference):
        k = torch.randn(2, 3, 9, 8, generator=gen)
        buf, view = grow_append(None, k[:, :, :0], k, 2, chunk=64)
        bounds = PageBounds()
        for _ in range(40):
            kmin, kmax = bounds.update(view, 4)
            want = page_bounds(view, 4)
            assert torch.equal(kmin, want[0]) and torch.equal(kmax, want[1])
            buf, view = grow_append(buf, view, torch.randn(2, 3, 1, 8, generator=gen), 2, chunk=64)
    # one full computation (the first step); every later step updated the last page only
    assert full_recomputes == [9]


def test_a_cache_that_moved_or_changed_is_recomputed(full_recomputes):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 10, 4, generator=gen)
    bounds = PageBounds()
    bounds.update(k, 4)
    # re-concatenated (transformers' DynamicCache): a new address
    k2 = torch.cat([k, torch.randn(1, 2, 1, 4, generator=gen)], 2)
    assert torch.equal(bounds.update(k2, 4)[0], page_bounds(k2, 4)[0])
    # rewritten in place at the same address, then one token appended (a reorder): the version counter tells
    buf, view = grow_append(None, k2[:, :, :0], k2, 2)
    bounds.update(view, 4)
    view[:, :, 0] += 100.0
    buf, view = grow_append(buf, view, torch.zeros(1, 2, 1, 4), 2)
    got = bounds.update(view, 4)
    assert torch.equal(got[1], page_bounds(view, 4)[1]) and float(got[1][0, 0, 0].min()) > 50
    assert full_recomputes == [10, 11, 11, 12]


def test_quest_decodes_alike_on_a_growing_and_a_reconcatenated_cache(tiny_llama, full_recomputes):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=70)
    spec = dict(attention="quest", attention_args={"page_size": 4, "top_k": 3, "skip_layers": 0})
    outs = []
    with torch.inference_mode(), longkit.apply(model, **spec) as applied:
        for cache in (applied.new_cache(), DynamicCache(config=model.config)):
            model(ids[:, :60], cache=cache, use_cache=True)
            outs.append(torch.cat([model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(60, 70)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    layers = model.config.num_hidden_layers
    # the growing cache: one full computation per layer; the re-concatenated one: every step
    assert len(full_recomputes) == layers + 10 * layers
