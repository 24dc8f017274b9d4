"""longkit.runtime.compiled_decode: compiled one-token steps on a fixed-capacity cache decode as the eager path.

The compiled test compiles tiny-llama once (about 20 s on a quiet 2-core CPU); the other tests run the same
fixed-capacity steps eagerly (``compile=False``), which is what the compiled graph computes, or check refusals.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import longkit
from conftest import sample_ids
from longkit.errors import MethodError
from longkit.kvcache import cache_nbytes, kivi_native
from longkit.runtime.compiled_decode import ATTENTION, compiled_decode

STEPS = 32
#: the native attention kernel builds here (a C compiler); without one the decoder's ``auto`` picks sdpa
NATIVE = kivi_native._compiler() is not None


def _eager(model, ids, steps, **spec):
    """Greedy tokens and (steps, vocab) logits of the seam's eager decoding."""
    with longkit.apply(model, **spec) as applied, torch.inference_mode():
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        token, tokens, logits = out.logits[:, -1:].argmax(-1), [], []
        for _ in range(steps):
            tokens.append(int(token))
            out = model(token, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    return tokens, torch.cat(logits)


def _decoded(model, ids, steps, compile, attention="auto", linear="torch", options=None, **spec):
    """The same through a :class:`CompiledDecoder` (prefill eager)."""
    with longkit.apply(model, **spec) as applied, torch.inference_mode():
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        token, tokens, logits = out.logits[:, -1:].argmax(-1), [], []
        with compiled_decode(model, cache, steps, compile=compile, attention=attention, linear=linear,
                             options=options) as dec:
            assert model.config._attn_implementation == ATTENTION
            for _ in range(steps):
                tokens.append(int(token))
                logits.append(dec.step(token))
                token = logits[-1].argmax(-1, keepdim=True)
    return tokens, torch.cat(logits), dec


def test_compiled_steps_decode_the_eager_tokens_and_logits(tiny_llama):
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 37)
    for spec in ({}, {"kv": "snapkv:ratio=0.3"}):
        tokens, logits = _eager(model, ids, STEPS, **spec)
        got, got_logits, dec = _decoded(model, ids, STEPS, True, **spec)
        assert got == tokens, spec
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
        assert dec.compile_s is not None and dec.steps == STEPS and dec.capacity == 256
        # the compiled graph calls the native kernel (an operator of its own), which reads the filled slots only
        assert dec.attention == ("native" if NATIVE else "sdpa")
    # the decoder gave the model its attention back
    assert model.config._attn_implementation == "sdpa"


def test_concatenated_linears_are_on_with_freezing_and_change_nothing():
    # inductor's cpp.enable_concat_linear (q/k/v and gate/up as one linear over concatenated frozen weights) is on by
    # default with freezing, off when options say so, absent without freezing; bf16 (where oneDNN prepacks the
    # weights and the pass applies): the same tokens and logits within bf16 rounding with and without it.
    from longkit.runtime.compiled_decode import _inductor_settings

    assert _inductor_settings(True, {}) == {"freezing": True, "cpp.enable_concat_linear": True}
    assert _inductor_settings(True, {"cpp.enable_concat_linear": False})["cpp.enable_concat_linear"] is False
    assert _inductor_settings(False, {"cpp_wrapper": True}) == {"cpp_wrapper": True}
    lm = longkit.load_model("tiny-llama", dtype="bfloat16")
    ids = sample_ids(lm, 37)
    on_tokens, on_logits, on = _decoded(lm.model, ids, STEPS, True)
    off_tokens, off_logits, off = _decoded(lm.model, ids, STEPS, True, options={"cpp.enable_concat_linear": False})
    assert on.inductor_settings()["cpp.enable_concat_linear"] and not off.inductor_settings()["cpp.enable_concat_linear"]
    assert on_tokens == off_tokens
    torch.testing.assert_close(on_logits.float(), off_logits.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "spec",
    [{}, {"kv": "snapkv:ratio=0.3"}, {"kv": "adakv:ratio=0.3"}, {"kv": "pyramidkv:ratio=0.3"},
     {"rope": "yarn:factor=2"}],
    ids=["full", "snapkv", "adakv-per-head", "pyramidkv-per-layer", "yarn"],
)  # fmt: skip
@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_fixed_capacity_steps_equal_the_eager_path(tiny_llama, spec, attention):
    # per-head (AdaKV) and per-layer (PyramidKV) budgets exercise the per-layer, per-head mask (and, natively, the
    # per-layer read limit); the token positions after an eviction are the tokens seen, not the slots
    if attention == "native" and not NATIVE:
        pytest.skip("no C compiler for the native kernel")
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 45, seed=3)
    tokens, logits = _eager(model, ids, 12, **spec)
    got, got_logits, dec = _decoded(model, ids, 12, False, attention=attention, **spec)
    assert dec.attention == attention
    assert got == tokens
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_the_mask_hides_the_spare_slots(tiny_llama, attention):
    # garbage in the unused capacity must not reach the outputs: the mask keeps it out (sdpa), or it is never read
    # (native: the read limit)
    if attention == "native" and not NATIVE:
        pytest.skip("no C compiler for the native kernel")
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 20)
    with longkit.apply(model) as applied, torch.inference_mode():
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with compiled_decode(model, cache, 4, compile=False, attention=attention) as dec:
            clean = dec.step(token)
        with compiled_decode(model, cache, 4, compile=False, attention=attention) as dec:
            for layer in dec.cache.layers:
                layer.keys[..., 21:, :] = 1e4
                layer.values[..., 21:, :] = 1e4
            dirty = dec.step(token)
    torch.testing.assert_close(dirty, clean)
    assert int(dec.mask[0].sum()) == 21 * dec.mask.shape[2]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [({"kv": "h2o:ratio=0.5"}, "compresses during decoding"),
     ({"kv": "kivi:bits=2,group_size=16,evict=h2o,ratio=0.5"}, "scores every decoding step"),
     ({"attention": "quest:page_size=8,top_k=2,skip_layers=0"}, "attention implementation")],
    ids=["h2o-per-step", "kivi-h2o", "quest"],
)  # fmt: skip
def test_caches_and_attention_it_cannot_compile_are_refused(tiny_llama, spec, needle):
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 40)
    with longkit.apply(model, **spec) as applied, torch.inference_mode():
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        impl = model.config._attn_implementation
        with pytest.raises(MethodError, match=needle):
            compiled_decode(model, cache, 4)
        assert model.config._attn_implementation == impl


#: KIVI at small settings: a flush of 8 tokens every 8 steps beyond a residual of 16
KIVI = "group_size=8,residual=16"


def _kivi_quantised(model, ids, steps, compiled, spec):
    """Greedy tokens, (steps, vocab) logits, the cache's exact bytes and each layer's quantised tokens after
    ``steps`` steps of KIVI decoding: eagerly (``compiled`` None) or through a decoder (compiled or not)."""
    with longkit.apply(model, kv=spec) as applied, torch.inference_mode():
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        token, tokens, logits = out.logits[:, -1:].argmax(-1), [], []
        with contextlib.ExitStack() as stack:
            dec = None
            if compiled is not None:
                dec = stack.enter_context(compiled_decode(model, cache, steps, compile=compiled))
            for _ in range(steps):
                tokens.append(int(token))
                if dec is None:
                    logits.append(model(token, cache=cache, use_cache=True).logits[:, -1])
                else:
                    logits.append(dec.step(token))
                token = logits[-1].argmax(-1, keepdim=True)
        # a decoder decodes the KIVI cache itself (no copy): the eager steps' storage, byte for byte
        quantised = [layer.n_quantized for layer in cache.layers]
        return tokens, torch.cat(logits), cache_nbytes(cache), quantised, dec


def test_compiled_kivi_steps_decode_the_eager_tokens_logits_and_cache(tiny_llama):
    # tiny-llama is GQA (4 query heads on 2 kv heads). 37 prompt tokens + 32 steps: the prefill quantises 16 tokens,
    # then every 8th step flushes 8 more (4 flushes), 48 quantised in the end; a step that skipped finish_step
    # would leave 16. 2-bit, 4-bit and 2-bit after SnapKV (ragged per-head rows) share one compiled graph (the
    # operator is opaque, the decoder's handle a graph input)
    # the module (longkit.runtime re-exports the function under its name)
    module = importlib.import_module("longkit.runtime.compiled_decode")
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 37)
    for spec, quantised in ((f"kivi:bits=2,{KIVI}", 48), (f"kivi:bits=4,{KIVI}", 48),
                            (f"kivi:bits=2,{KIVI},evict=snapkv,ratio=0.5", None)):  # fmt: skip
        tokens, logits, nbytes, counts, _ = _kivi_quantised(model, ids, STEPS, None, spec)
        got, got_logits, got_nbytes, got_counts, dec = _kivi_quantised(model, ids, STEPS, True, spec)
        assert got == tokens, spec
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
        assert got_nbytes == nbytes and got_counts == counts, spec
        if quantised is not None:
            assert counts == [quantised] * len(counts)
        assert dec.attention == "kivi" and dec.capacity is None and dec.steps == STEPS and dec.compile_s is not None
        # the decoder released its cache and gave the model KIVI's attention back
        assert dec._handle_id not in module._KIVI
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("n", [10, 45])
def test_kivi_steps_through_the_decoder_equal_the_eager_steps(tiny_llama, n):
    # eagerly through the same operator: from a prompt too short to quantise anything (the first steps attend over
    # the exact residual, then its first group is quantised) and a longer one, 2-bit and 4-bit, plain and after
    # SnapKV: bit for bit the eager path (the operator runs its code)
    model, ids = tiny_llama.model, sample_ids(tiny_llama, n, seed=7)
    for spec in (f"kivi:bits=2,{KIVI}", f"kivi:bits=4,{KIVI}", f"kivi:bits=4,{KIVI},evict=snapkv,ratio=0.5"):
        want = _kivi_quantised(model, ids, 24, None, spec)
        got = _kivi_quantised(model, ids, 24, False, spec)
        assert got[0] == want[0] and got[2:4] == want[2:4], spec
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    assert want[3][0] > 0


def test_compiled_kivi_steps_in_bfloat16():
    # bf16: inductor fuses the norms and element-wise operations and rounds at other points than eager, so logits
    # agree at bf16 resolution (about 3 significant digits; the same tolerance as the bf16 GEMV test); the greedy
    # tokens are the same here, and the cache (filled by the same KIVI code) to the byte
    lm = longkit.load_model("tiny-llama", dtype="bfloat16")
    model, ids = lm.model, sample_ids(lm, 37, seed=2)
    spec = f"kivi:bits=2,{KIVI}"
    tokens, logits, nbytes, counts, _ = _kivi_quantised(model, ids, STEPS, None, spec)
    got, got_logits, got_nbytes, got_counts, _ = _kivi_quantised(model, ids, STEPS, True, spec)
    assert got == tokens
    torch.testing.assert_close(got_logits.float(), logits.float(), atol=0.05, rtol=0.02)
    assert got_nbytes == nbytes and got_counts == counts == [48, 48]


def test_kivi_decoder_refusals(tiny_llama):
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 30)
    with longkit.apply(model, kv=f"kivi:bits=2,{KIVI}") as applied, torch.inference_mode():
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        with pytest.raises(MethodError, match="parameter 'attention' must be 'auto' for it"):
            compiled_decode(model, cache, 4, attention="native")
        impl = model.config._attn_implementation
        # without KIVI's hook the cache would return the dequantised cache at every step
        model.set_attn_implementation("sdpa")
        try:
            with pytest.raises(MethodError, match="under KIVI's own attention hook"):
                compiled_decode(model, cache, 4)
        finally:
            model.set_attn_implementation(impl)
        with compiled_decode(model, cache, 1, compile=False) as dec:
            dec.step(ids[:, :1])
            with pytest.raises(MethodError, match="max_new_tokens=1"):
                dec.step(ids[:, :1])
        assert model.config._attn_implementation == impl


def test_steps_past_max_new_tokens_are_refused(tiny_llama):
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 10)
    with longkit.apply(model) as applied, torch.inference_mode():
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with compiled_decode(model, cache, 1, compile=False) as dec:
            dec.step(token)
            with pytest.raises(MethodError, match="max_new_tokens=1"):
                dec.step(token)
        with pytest.raises(MethodError, match="after close"):
            dec.step(token)


def test_native_attention_off_falls_back_or_is_refused(tiny_llama, monkeypatch):
    # the kernel turned off: ``auto`` decodes with sdpa over the whole buffer, ``native`` asked for is refused
    from longkit.kvcache import decode_native

    monkeypatch.setenv(decode_native.ENV, "0")
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 10)
    with longkit.apply(model) as applied, torch.inference_mode():
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        with compiled_decode(model, cache, 4, compile=False) as dec:
            assert dec.attention == "sdpa"
            full = dec.kv_read_bytes
        with pytest.raises(MethodError, match="attention='native' is not available here"):
            compiled_decode(model, cache, 4, attention="native")
        monkeypatch.delenv(decode_native.ENV)
        if NATIVE:
            with compiled_decode(model, cache, 4, compile=False) as dec:
                # the native step reads the 10 filled slots of its 256
                assert dec.attention == "native" and dec.kv_read_bytes * 256 == full * 10


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts the native GEMV's calls (the operator's implementation calls gemv_native.gemv)."""
    from longkit.runtime import gemv_native

    calls = []
    real = gemv_native.gemv

    def counted(x, weight, bias=None, **kw):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias, **kw)

    monkeypatch.setattr(gemv_native, "gemv", counted)
    return calls


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native GEMV")
def test_compiled_steps_with_the_native_gemv_decode_the_eager_tokens(tiny_llama, gemv_calls):
    # float32: the GEMV sums in float32 like torch's linear, in another order: logits within 1e-5
    model, ids = tiny_llama.model, sample_ids(tiny_llama, 37)
    tokens, logits = _eager(model, ids, STEPS)
    gemv_calls.clear()
    got, got_logits, dec = _decoded(model, ids, STEPS, True, linear="native")
    assert dec.linear == "native"
    assert got == tokens
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    # every step ran every linear layer (the head included) through the operator, none ran at prefill
    assert len(gemv_calls) == STEPS * len(_linears(model))
    # the decoder gave the layers their own forward back
    assert not any("forward" in m.__dict__ for m in _linears(model))


@pytest.mark.skipif(not NATIVE, reason="no C compiler for the native GEMV")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_native_gemv_only_in_the_steps(dtype, gemv_calls):
    # the same fixed-capacity steps eagerly with and without the GEMV; a forward outside the steps (a prefill, while
    # the decoder lives) keeps torch's linear. bfloat16: the same float32 sums rounded to bf16 in another order can
    # differ by one bf16 ulp per layer output, so the logits are compared at bf16 resolution (and the tokens, which a
    # near tie could flip, are the same here)
    lm = longkit.load_model("tiny-llama", dtype=dtype)
    model, ids = lm.model, sample_ids(lm, 41, seed=5)
    tokens, logits, _ = _decoded(model, ids, STEPS, False)
    assert not gemv_calls
    got, got_logits, dec = _decoded(model, ids, STEPS, False, linear="native")
    assert got == tokens
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(got_logits.float(), logits.float(), **tol)
    assert len(gemv_calls) == STEPS * len(_linears(model))
    with longkit.apply(model) as applied, torch.inference_mode():
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        with compiled_decode(model, cache, 4, compile=False, linear="native") as dec:
            gemv_calls.clear()
            model(ids[:, :1], cache=applied.new_cache(), use_cache=True)
            assert not gemv_calls
            dec.step(ids[:, :1])
            assert len(gemv_calls) == len(_linears(model))


def test_native_gemv_off_falls_back_or_is_refused(tiny_llama, monkeypatch):
    from longkit.runtime import gemv_native

    model, ids = tiny_llama.model, sample_ids(tiny_llama, 10)
    with longkit.apply(model) as applied, torch.inference_mode():
        cache = applied.new_cache()
        model(ids, cache=cache, use_cache=True)
        with pytest.raises(MethodError, match="parameter 'linear' must be one of torch, auto, native"):
            compiled_decode(model, cache, 4, linear="onednn")
        with compiled_decode(model, cache, 4, compile=False) as dec:
            assert dec.linear == "torch"
        monkeypatch.setenv(gemv_native.ENV, "0")
        with compiled_decode(model, cache, 4, compile=False, linear="auto") as dec:
            assert dec.linear == "torch"
            assert not any("forward" in m.__dict__ for m in _linears(model))
        with pytest.raises(MethodError, match="linear='native' is not available here: LONGKIT_GEMV_NATIVE=0"):
            compiled_decode(model, cache, 4, linear="native")
        assert model.config._attn_implementation == "sdpa"
        monkeypatch.delenv(gemv_native.ENV)
        if NATIVE:
            with compiled_decode(model, cache, 4, compile=False, linear="auto") as dec:
                assert dec.linear == "native"
