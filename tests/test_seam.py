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


def test_two_methods_that_keep_their_own_cache_cannot_be_combined():
    # One generation runs on one cache: with two, one method would silently not run.
    with pytest.raises(MethodError, match="each keep their own KV cache"):
        longkit.MethodSpec.parse("kv=snapkv+memory=infllm")


def test_every_method_with_its_own_cache_declares_it():
    from longkit.methods import Method

    for kind, reg in REGISTRIES.items():
        for name in reg.names():
            cls = reg.get(name)
            overrides = cls.make_cache is not Method.make_cache
            assert cls.keeps_cache == overrides, f"{kind}={name}: keeps_cache must say whether make_cache is overridden"
