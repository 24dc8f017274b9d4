"""The common checks every registered method goes through (the matrix is in ``conformance.py``)."""

import pytest
import torch

import longkit
from conformance import CASES, all_cases
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.registry import REGISTRIES

CASE_LIST = list(all_cases())


def test_every_registered_method_is_in_the_conformance_matrix():
    registered = {(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()}
    assert registered <= set(CASES), f"add these to tests/conformance.py: {sorted(registered - set(CASES))}"


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
        pytest.skip("a lossy KV cache (eviction) cannot match a full forward; kvcache/test_kvcache.py checks it instead")
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


# ---- a hybrid model: Gemma 3's sliding-window and full-attention layers, RoPE given per layer type ----
#: Rooms whose methods must run on tiny-gemma3. The attention and KV methods may instead refuse it with a
#: MethodError (hybrid models are their room's work); a refusal must then say what the model lacks.
MUST_RUN_ON_HYBRID = {"rope"}
#: Methods of other rooms that must run on tiny-gemma3 too (and, where their entry says so, change its logits):
#: InfLLM keeps its block memory on the full-attention layer and the sliding layers' windows
#: (tests/memory/test_memory_infllm_hybrid.py).
MUST_RUN_METHODS_ON_HYBRID = {("memory", "infllm")}
#: case id -> the refusal's message (read when listing which methods refuse hybrid models).
REFUSED_ON_HYBRID: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_gemma3():
    return longkit.load_model("tiny-gemma3")


def _apply_or_refusal(model, kind, name, args):
    """``longkit.apply(...)`` entered, or the MethodError a method raises when it cannot run on ``model``."""
    try:
        applied = longkit.apply(model, **{kind: name, f"{kind}_args": args})
        return applied, applied
    except MethodError as err:
        if kind in MUST_RUN_ON_HYBRID or (kind, name) in MUST_RUN_METHODS_ON_HYBRID:
            raise
        assert str(err).strip() and name in str(err), f"{kind} method {name!r} refused with an unclear error: {err}"
        return None, err


@pytest.mark.parametrize("kind,name,args,changes,case_id", CASE_LIST, ids=[c[-1] for c in CASE_LIST])
def test_on_a_hybrid_model_apply_restores_or_refuses(tiny_gemma3, kind, name, args, changes, case_id):
    model = tiny_gemma3.model
    ids = sample_ids(tiny_gemma3, n=97)
    with torch.inference_mode():
        before = model(ids).logits
        applied, refusal = _apply_or_refusal(model, kind, name, args)
        if applied is None:
            REFUSED_ON_HYBRID[case_id] = str(refusal)
            after = model(ids).logits
            assert torch.equal(before, after), "a refused method left the model changed"
            return
        try:
            during = model(ids).logits
        finally:
            applied.remove()
        after = model(ids).logits
    assert torch.equal(before, after)
    if changes and (kind == "rope" or (kind, name) in MUST_RUN_METHODS_ON_HYBRID):
        assert not torch.allclose(before, during, atol=1e-4), f"{case_id} did not change the logits"


@pytest.mark.parametrize("kind,name,args,changes,case_id", CASE_LIST, ids=[c[-1] for c in CASE_LIST])
def test_on_a_hybrid_model_cached_decoding_matches_one_full_forward(tiny_gemma3, kind, name, args, changes, case_id):
    if CASES[(kind, name)].get("lossy"):
        pytest.skip("a lossy KV cache (eviction) cannot match a full forward")
    if name == "dynamic":
        pytest.skip("dynamic NTK recomputes the base from the current length: chunked and full passes differ by design")
    model = tiny_gemma3.model
    # 41 tokens: past the 16-token sliding window, so the sliding layers' cache rolls during decoding.
    ids = sample_ids(tiny_gemma3, n=41)
    with torch.inference_mode():
        applied, _ = _apply_or_refusal(model, kind, name, args)
        if applied is None:
            return
        try:
            full = model(ids).logits[:, -3:]
            cache = applied.new_cache()
            model(ids[:, :-3], cache=cache, use_cache=True)
            steps = [model(ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(38, 41)]
        finally:
            applied.remove()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
