"""One prefill, many KV methods (kvcache/sweep.py): a replayed prefill must leave exactly the cache a real prefill
leaves, and decode the same tokens, for every registered KV method (the benchmark's numbers rest on this)."""

from __future__ import annotations

import copy

import pytest
import torch

import longkit
from conformance import CASES
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes
from longkit.runtime.prefill_capture import capture_prefill

KV_CASES = [
    f"{name}:" + ",".join(f"{k}={v}" for k, v in args.items())
    for (kind, name), case in sorted(CASES.items())
    if kind == "kv"
    for args in case["args"]
] + ["kivi:bits=2,group_size=8,residual=16", "kivi:evict=snapkv,ratio=0.25,group_size=8,residual=8"]


def _state(cache) -> list[dict[str, torch.Tensor]]:
    """Every tensor each layer holds (keys, values, packed quantised storage, per-slot extras)."""
    out = []
    for layer in cache.layers:
        tensors = {}
        for k, v in vars(layer).items():
            if isinstance(v, torch.Tensor):
                tensors[k] = v
            elif isinstance(v, dict):
                tensors.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, torch.Tensor)})
        out.append(tensors)
    return out


@pytest.fixture(scope="module")
def prompt(tiny_llama):
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, tiny_llama.model.config.vocab_size, (1, 61), generator=g)


@pytest.fixture(scope="module")
def captured(tiny_llama, prompt):
    return capture_prefill(tiny_llama.model, prompt)


def test_capture_matches_plain_forward(tiny_llama, prompt, captured):
    with torch.inference_mode():
        ref = tiny_llama.model(prompt).logits[:, -1].float()
    torch.testing.assert_close(captured.logits, ref, rtol=1e-5, atol=1e-5)
    assert len(captured.calls) == tiny_llama.model.config.num_hidden_layers
    assert tiny_llama.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("spec", KV_CASES)
def test_replay_equals_real_prefill(tiny_llama, prompt, captured, spec):
    model = tiny_llama.model
    with longkit.apply(model, kv=spec) as applied:
        real = applied.new_cache()
        with torch.inference_mode():
            model(prompt, cache=real)
        replayed = captured.cache(applied)
        assert cache_nbytes(replayed) == cache_nbytes(real)
        for layer, (a, b) in enumerate(zip(_state(real), _state(replayed), strict=True)):
            assert a.keys() == b.keys(), layer
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=f"layer {layer} {k}")
        with torch.inference_mode():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=applied.new_cache(),
                                 max_new_tokens=7, do_sample=False, eos_token_id=None)  # fmt: skip
        out = captured.generate(replayed, max_new_tokens=7, eos_token_id=None)
    assert torch.equal(out, gen), (out[0, -7:], gen[0, -7:])


def test_replay_compresses(tiny_llama, captured):
    """The replayed cache is really compressed (a replay that kept everything would pass the equality trivially
    only if the real path did too; this pins that both drop tokens)."""
    model = tiny_llama.model
    with longkit.apply(model) as plain:
        full = cache_nbytes(captured.cache(plain))
    with longkit.apply(model, kv="snapkv:ratio=0.25") as applied:
        assert cache_nbytes(captured.cache(applied)) < 0.4 * full


def test_bad_input(tiny_llama, captured, prompt):
    model = tiny_llama.model
    with pytest.raises(MethodError, match="input_ids"):
        capture_prefill(model, prompt.repeat(2, 1))
    with pytest.raises(MethodError, match="max_new_tokens"):
        captured.generate(None, max_new_tokens=0)
    other = copy.deepcopy(model)
    with longkit.apply(other, kv="snapkv") as applied, pytest.raises(MethodError, match="another model"):
        captured.cache(applied)
    with longkit.apply(model, attention="blockwise") as applied, pytest.raises(MethodError, match="sdpa/eager"):
        captured.cache(applied)


@pytest.mark.parametrize("spec", ["snapkv:ratio=0.3", "expected_attention:ratio=0.3", "streaming_llm:ratio=0.3"])
def test_replay_other_families(any_tiny, spec):
    model = any_tiny.model
    prompt = torch.randint(5, model.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(1))
    pre = capture_prefill(model, prompt)
    with longkit.apply(model, kv=spec) as applied:
        with torch.inference_mode():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=applied.new_cache(),
                                 max_new_tokens=5, do_sample=False, eos_token_id=None)  # fmt: skip
        out = pre.generate(pre.cache(applied), max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out, gen)
