"""KV methods on a model whose layers differ (tiny-gemma3: three sliding-window layers, window 16, then one
full-attention layer): the sliding layers stay transformers' own window-bounded layers, untouched by the method; the
full-attention layer is compressed; ``cache_nbytes`` counts both exactly."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache.base import cache_nbytes
from longkit.kvcache.cache import CompressedCache
from longkit.kvcache.storage import RaggedLayer
from longkit.registry import registry

ARGS = {
    "kivi": {"group_size": 16, "residual": 16},
    "duo_attention": {"window": 8, "sinks": 2, "probe_tokens": 64, "retrieval_ratio": 0.5},
    "cam": {"window": 8},
}
N, WINDOW = 60, 16


@pytest.fixture(scope="module")
def gemma():
    return longkit.load_model("tiny-gemma3")


def _decode(model, ids, cache, steps=3):
    """Prefill all but the last ``steps`` tokens, then decode them one at a time; returns (logits of the decoded
    steps (B, steps, V), per decoding step the attention output of every layer)."""
    layer_outs: list[dict[int, torch.Tensor]] = []
    current: dict[int, torch.Tensor] = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: current.__setitem__(i, o[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    logits = []
    try:
        with torch.no_grad():
            model(ids[:, :-steps], cache=cache, use_cache=True)
            for t in range(ids.shape[1] - steps, ids.shape[1]):
                current.clear()
                logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
                layer_outs.append(dict(current))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(logits, 1), layer_outs


def _expected_bytes(cache) -> int:
    # sliding layers: their key and value tensors; compressed layers: their own exact count (tested in
    # test_kvcache.py and the storage tests)
    return sum(
        layer.keys.nbytes + layer.values.nbytes if isinstance(layer, DynamicSlidingWindowLayer) else layer.nbytes()
        for layer in cache.layers
    )


@pytest.mark.parametrize("name", registry("kv").names())
def test_kv_method_compresses_full_layers_and_leaves_sliding_layers(gemma, name):
    model = gemma.model
    ids = sample_ids(gemma, N, seed=3)
    plain_logits, plain_outs = _decode(model, ids, DynamicCache(config=model.config))
    with longkit.apply(model, kv=name, kv_args=ARGS.get(name, {})) as applied:
        cache = applied.new_cache()
        logits, outs = _decode(model, ids, cache)
    types = model.config.layer_types
    for i, kind in enumerate(types):
        layer = cache.layers[i]
        if kind == "sliding_attention":
            # transformers' own sliding layer: the last window - 1 tokens, whatever the method
            assert type(layer) is DynamicSlidingWindowLayer and layer.keys.shape[2] == WINDOW - 1
            for step in range(len(outs)):
                # upstream of the full layer, decoding sees exactly what the plain model sees
                assert torch.equal(outs[step][i], plain_outs[step][i]), (name, i, step)
        else:
            assert isinstance(layer, RaggedLayer) or name == "kivi"
    assert torch.isfinite(logits).all()
    if name != "kivi":
        full = types.index("full_attention")
        # the method compressed the full-attention layer (ratio 0.5 / streaming heads / quantised storage)
        assert int(cache.stored_tokens()[full].min()) < N
    assert cache_nbytes(cache) == _expected_bytes(cache) > 0


def test_full_budget_decodes_exactly_like_the_model(gemma):
    model = gemma.model
    ids = sample_ids(gemma, N, seed=4)
    plain, _ = _decode(model, ids, DynamicCache(config=model.config))
    with longkit.apply(model, kv="snapkv", kv_args={"ratio": 1.0}) as applied:
        cache = applied.new_cache()
        logits, _ = _decode(model, ids, cache)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-4)
    assert int(cache.stored_tokens()[3].min()) == N


def test_nbytes_counts_sliding_window_and_compressed_layers(gemma):
    model = gemma.model
    cfg = model.config
    with longkit.apply(model, kv="snapkv", kv_args={"tokens": 10}) as applied, torch.no_grad():
        cache = applied.new_cache()
        model(sample_ids(gemma, N), cache=cache, use_cache=True)
    head_dim, h_kv = cfg.head_dim, cfg.num_key_value_heads
    ragged = cache.layers[3]
    # three sliding layers of window - 1 = 15 tokens: keys and values, float32
    assert cache_nbytes(cache) - ragged.nbytes() == 3 * (WINDOW - 1) * h_kv * head_dim * 2 * 4
    # the full layer holds 10 tokens per head (plus its per-head counts)
    assert int(cache.stored_tokens()[3].max()) == 10
    assert 10 * h_kv * head_dim * 2 * 4 <= ragged.nbytes() < 11 * h_kv * head_dim * 2 * 4


def test_only_sliding_layers_refused(gemma):
    cfg = type(gemma.model.config)(**{**gemma.model.config.to_dict(), "layer_types": ["sliding_attention"] * 4})
    method = registry("kv").create("snapkv")
    with pytest.raises(MethodError, match="every layer of this model is a sliding-window layer"):
        CompressedCache(cfg, method)


def test_crop_refused_once_sliding_layers_dropped_tokens(gemma):
    model = gemma.model
    with longkit.apply(model, kv="snapkv") as applied, torch.no_grad():
        cache = applied.new_cache()
        model(sample_ids(gemma, 30), cache=cache, use_cache=True)
    with pytest.raises(MethodError, match="sliding-window layer 0 has dropped the tokens before its window of 16"):
        cache.crop(-2)
