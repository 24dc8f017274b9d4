"""Attention methods on a model whose layers differ (tiny-gemma3: three sliding-window layers, window 16, then one
full-attention layer with its own RoPE base): every registered method acts on the full-attention layer only, the
sliding layers keep the model's own attention, undo restores the model bit for bit, and exact methods decode from a
cache as a full forward computes."""

from __future__ import annotations

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.attention.base import AttentionMethod, layer_inv_freq, transformers_inputs
from longkit.errors import MethodError
from longkit.registry import registry

#: Settings that make each method act at the test length (the defaults are sized for thousands of tokens).
ARGS = {
    "a_shape": {"sinks": 4, "window": 16, "block_q": 16},
    "block_sparse": {"block_size": 16, "top_k": 2},
    "dca": {"chunk_size": 32, "local_window": 8, "block_q": 16, "block_k": 16},
    "entropy_scaling": {"trained": 16, "skip_layers": 0},
    "leaky_rerope": {"window": 8, "block_q": 16, "block_k": 16},
    "lm_infinite": {"window": 24, "n_sinks": 4, "block_q": 16, "block_k": 16},
    "logn": {"trained": 16},
    "moba": {"block_size": 16, "top_k": 2, "block_q": 16},
    "quest": {"skip_layers": 0, "page_size": 16, "top_k": 2},
    "rerope": {"window": 8, "block_q": 16, "block_k": 16},
    "self_extend": {"group_size": 4, "window": 8, "block_q": 16, "block_k": 16},
    "vertical_slash": {"vertical_size": 4, "slash_size": 8, "last_q": 16, "sinks": 2, "local": 8, "block": 16},
    "blockwise": {"block_q": 16, "block_k": 16},
    "ring": {"block_q": 16, "block_k": 16},
    "ulysses": {"block_q": 16, "block_k": 16},
    "sliding_window": {"chunk": 16},
}
#: Methods whose prefill and cached decoding compute the same attention (no sparse prefill-only pattern).
EXACT_DECODING = ["blockwise", "dca", "eager", "entropy_scaling", "leaky_rerope", "lm_infinite", "logn", "rerope",
                  "ring", "sdpa", "self_extend", "sliding_window", "ulysses"]
#: Methods that change the full-attention layer's output at the test length (the others are exact attention).
CHANGING = ["a_shape", "block_sparse", "dca", "entropy_scaling", "leaky_rerope", "lm_infinite", "logn", "moba",
            "rerope", "self_extend", "vertical_slash"]


@pytest.fixture(scope="module")
def gemma():
    return longkit.load_model("tiny-gemma3")


def _attention_outputs(model, ids):
    """(logits, [output of each layer's self-attention])."""
    outs = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, [outs[i] for i in range(len(outs))]


def test_tiny_gemma3_has_both_kinds_of_layer(gemma):
    types = gemma.model.config.layer_types
    assert types[:3] == ["sliding_attention"] * 3 and types[3] == "full_attention"


@pytest.mark.parametrize("name", registry("attention").names())
def test_method_acts_on_full_layers_only_and_undoes_exactly(gemma, name):
    model = gemma.model
    ids = sample_ids(gemma, 80, seed=1)
    ref_logits, ref_outs = _attention_outputs(model, ids)
    with longkit.apply(model, attention=name, attention_args=ARGS.get(name, {})):
        logits, outs = _attention_outputs(model, ids)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    cls = registry("attention").get(name)
    for i in sliding:
        if cls.implementation or cls.own_sliding_layers:
            # eager / sdpa switch the whole model to that transformers implementation; ring / ulysses attend every
            # layer of their shards themselves (exact blockwise attention): equal up to rounding
            torch.testing.assert_close(outs[i], ref_outs[i], atol=1e-5, rtol=1e-4)
        else:
            # the sliding layers run the model's own attention: bit for bit what the plain model computes
            assert torch.equal(outs[i], ref_outs[i]), (name, i)
    full = model.config.layer_types.index("full_attention")
    if name in CHANGING:
        # the method does act, on the full-attention layer
        assert not torch.allclose(outs[full], ref_outs[full], atol=1e-4), name
    else:
        torch.testing.assert_close(outs[full], ref_outs[full], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(logits).all()
    after, _ = _attention_outputs(model, ids)
    assert torch.equal(after, ref_logits)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", EXACT_DECODING)
def test_cached_decoding_equals_full_forward(gemma, name):
    model = gemma.model
    ids = sample_ids(gemma, 60, seed=2)
    with longkit.apply(model, attention=name, attention_args=ARGS.get(name, {})), torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :-4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(56, 59):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    # the sliding layers' cache keeps only its window: decoding past it uses the windowed keys, as the model does
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 55:59], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["self_extend", "rerope", "lm_infinite", "dca"])
def test_remap_rotates_with_the_full_layers_own_frequencies(gemma, name):
    model = gemma.model
    rotary = model.model.rotary_emb
    method = registry("attention").create(name, ARGS[name])
    seen = []
    attend = method.attend

    def recording(q, k, v, inv_freq, trained, **kw):
        seen.append(inv_freq)
        return attend(q, k, v, inv_freq, trained, **kw)

    method.attend = recording
    with longkit.apply(model, attention=method), torch.no_grad():
        model(sample_ids(gemma, 40), use_cache=False)
    # called once per forward, for the one full-attention layer, with its base (1e6), not the sliding base (1e4)
    assert len(seen) == 1
    assert torch.equal(seen[0], rotary.full_attention_inv_freq)
    assert not torch.equal(seen[0], rotary.sliding_attention_inv_freq)


def test_layer_inv_freq_per_layer_type(gemma):
    model = gemma.model
    rotary = model.model.rotary_emb
    method = registry("attention").create("self_extend")
    layers = model.model.layers
    assert torch.equal(layer_inv_freq(method, rotary, layers[0].self_attn), rotary.sliding_attention_inv_freq)
    assert torch.equal(layer_inv_freq(method, rotary, layers[3].self_attn), rotary.full_attention_inv_freq)


def test_sliding_layer_refused_where_it_cannot_be_handed_on(gemma):
    layer = gemma.model.model.layers[0].self_attn
    q = torch.randn(1, 4, 20, 16)
    kv = torch.randn(1, 2, 20, 16)
    method = registry("attention").create("a_shape")
    # called directly (not through forward), a sparse pattern refuses a sliding-window layer
    with pytest.raises(MethodError, match="does not support sliding-window attention layers"):
        transformers_inputs(method, layer, q, kv, None, {"sliding_window": 16})

    class FlashMasked(AttentionMethod):
        name = "flash_masked"
        mask_format = "flash_attention_2"

    with pytest.raises(MethodError, match="'flash_masked' receives 'flash_attention_2' masks"):
        FlashMasked().forward(layer, q, kv, kv, None, 0.25, sliding_window=16)
