import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import KVMethod
from longkit.registry import REGISTRIES, register
from registry_cases import CASES, all_cases

CASE_LIST = list(all_cases())


def test_every_registered_method_is_in_the_conformance_matrix():
    registered = {(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()}
    assert registered <= set(CASES), f"add these to tests/registry_cases.py: {sorted(registered - set(CASES))}"


@pytest.mark.parametrize("kind,name,args,changes,case_id", CASE_LIST, ids=[c[-1] for c in CASE_LIST])
def test_apply_then_remove_restores_bit_identical_logits(any_tiny, kind, name, args, changes, case_id):
    model = any_tiny.model
    ids = sample_ids(any_tiny, n=97)
    with torch.inference_mode():
        before = model(ids).logits
        with longkit.apply(model, **{kind: name, f"{kind}_args": args}) as applied:
            assert applied.spec.label().startswith(f"{kind}={name}")
            during = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after)
    if changes:
        assert not torch.allclose(before, during, atol=1e-4), f"{case_id} did not change the logits"
    else:
        torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,name,args,changes,case_id", CASE_LIST, ids=[c[-1] for c in CASE_LIST])
def test_decoding_with_a_cache_matches_one_full_forward(tiny_llama, kind, name, args, changes, case_id):
    # Any method must keep prefill + cached decoding consistent with a single forward pass over the same tokens.
    if CASES[(kind, name)].get("lossy"):
        pytest.skip("a lossy KV cache (eviction) cannot match a full forward; tests/test_kvcache.py checks it instead")
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=41)
    with torch.inference_mode(), longkit.apply(model, **{kind: name, f"{kind}_args": args}) as applied:
        full = model(ids).logits[:, -3:]
        cache = applied.new_cache()
        model(ids[:, :-3], cache=cache, use_cache=True)
        steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(38, 41)]
    if name == "dynamic":
        pytest.skip("dynamic NTK recomputes the base from the current length: chunked and full passes differ by design")
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_default_rope_through_the_seam_is_bit_identical(tiny_llama):
    ids = sample_ids(tiny_llama, n=64)
    with torch.inference_mode():
        ref = tiny_llama.model(ids).logits
        with longkit.apply(tiny_llama.model, rope="default"):
            assert torch.equal(tiny_llama.model(ids).logits, ref)


def test_combination_applies_in_order_and_undoes_everything(tiny_llama):
    model = tiny_llama.model
    rotary = model.model.rotary_emb
    impl = model.config._attn_implementation
    with longkit.apply(model, "rope=yarn:factor=4+attention=eager") as applied:
        assert model.model.rotary_emb is not rotary
        assert model.config._attn_implementation == "eager"
        assert [m.kind for m in applied.spec.methods()] == ["rope", "attention"]
    assert model.model.rotary_emb is rotary
    assert model.config._attn_implementation == impl
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_failed_apply_rolls_back_the_methods_already_applied(tiny_llama):
    model = tiny_llama.model
    rotary = model.model.rotary_emb

    @register("kv", "_explodes")
    @dataclass
    class Explodes(KVMethod):
        paper = "Test (no paper) http://example.invalid"

        def apply(self, model):
            raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            longkit.apply(model, rope="yarn", kv="_explodes")
        assert model.model.rotary_emb is rotary
    finally:
        REGISTRIES["kv"].unregister("_explodes")


def test_kv_method_provides_the_generation_cache(tiny_llama):
    from transformers import DynamicCache

    made = []

    @register("kv", "_counting")
    @dataclass
    class Counting(KVMethod):
        paper = "Test (no paper) http://example.invalid"

        def make_cache(self, model):
            cache = DynamicCache(config=model.config)
            made.append(cache)
            return cache

    try:
        with longkit.apply(tiny_llama.model, kv="_counting") as applied:
            cache = applied.new_cache()
        assert made == [cache]
        with longkit.apply(tiny_llama.model) as applied:
            assert isinstance(applied.new_cache(), DynamicCache)
    finally:
        REGISTRIES["kv"].unregister("_counting")


def test_rope_method_on_a_model_without_rope_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(MethodError, match="needs a model with rotary position embeddings.*GPT2LMHeadModel"):
        longkit.apply(model, rope="yarn")


def test_wrong_kind_and_stray_args_are_errors(tiny_llama):
    with pytest.raises(MethodError, match="expects a rope method"):
        longkit.apply(tiny_llama.model, rope=REGISTRIES["attention"].create("eager"))
    with pytest.raises(MethodError, match="rope_args given without a rope method"):
        longkit.apply(tiny_llama.model, rope_args={"factor": 2})
    with pytest.raises(MethodError, match="unknown argument"):
        longkit.apply(tiny_llama.model, ropee="yarn")


def test_importing_longkit_patches_nothing():
    code = """
import transformers.modeling_rope_utils as r
from transformers import AttentionInterface
from transformers.models.llama import modeling_llama as ml
snap = (sorted(AttentionInterface._global_mapping), sorted(r.ROPE_INIT_FUNCTIONS), ml.LlamaRotaryEmbedding.forward,
        ml.LlamaAttention.forward, ml.apply_rotary_pos_emb)
import longkit, longkit.eval.runner, longkit.cli
after = (sorted(AttentionInterface._global_mapping), sorted(r.ROPE_INIT_FUNCTIONS), ml.LlamaRotaryEmbedding.forward,
         ml.LlamaAttention.forward, ml.apply_rotary_pos_emb)
assert snap == after, (snap, after)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
