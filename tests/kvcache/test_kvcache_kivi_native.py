"""KIVI's native decode kernel (longkit.kvcache.kivi_native) against the reference that dequantises the whole cache
(longkit.kvcache.naive.kivi_decode_reference): every code path of the C source (16-lane registers with 16 tokens
reduced at once, one token at a time, 8- and 4-lane vectors), masks, batches, threads, scale and residual dtypes;
decoding through the hook; and the fallback to the tiled PyTorch path."""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit.kvcache import kivi_attention, kivi_native
from longkit.kvcache.kivi import KIVICache, KIVILayer
from longkit.kvcache.kivi_attention import kivi_decode
from longkit.kvcache.kivi_native import available, kivi_decode_native, shape_problem
from longkit.kvcache.naive import kivi_decode_reference

pytestmark = pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")


def _layer(bits, g, residual, n, dtype, *, B=1, H_kv=3, D=64, scale_dtype="float16", steps=5, seed=0):
    """A dense KIVI layer that saw ``n`` tokens: a prefill of ``n - steps``, then ``steps`` single tokens (flushes)."""
    gen = torch.Generator().manual_seed(seed)
    # keys with an outlier channel (KIVI's reason for per-channel keys), values plain
    k = torch.randn(B, H_kv, n, D, generator=gen) * (1 + 4 * (torch.arange(D) == 3))
    v = torch.randn(B, H_kv, n, D, generator=gen)
    k, v = k.to(dtype), v.to(dtype)
    layer = KIVILayer(bits, g, residual, scale_dtype)
    layer.update(k[:, :, : n - steps], v[:, :, : n - steps])
    for t in range(n - steps, n):
        layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    return layer


def _query(B, H, D, dtype, seed=1):
    return (2 * torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


# (D, group_size, H, H_kv): the C paths each shape compiles to on an AVX-512 host
# (2-bit rows of D / 4 bytes: 16 -> 16 lanes, 8 -> 8 lanes, 4 -> 4 lanes; 4-bit rows twice as long)
SHAPES = [
    pytest.param(64, 32, 9, 3, id="D64-g32-16-tokens-at-once"),  # SmolLM2-135M's shape
    pytest.param(64, 8, 4, 1, id="D64-g8-token-by-token"),
    pytest.param(32, 16, 4, 4, id="D32-g16-8-or-16-lanes"),
    pytest.param(16, 4, 6, 2, id="D16-g4-4-or-8-lanes"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("D,g,H,H_kv", SHAPES)
@pytest.mark.parametrize("residual,n", [(0, 131), (20, 203)])
def test_native_read_equals_dequantise_all_then_attend(dtype, bits, D, g, H, H_kv, residual, n):
    layer = _layer(bits, g, residual, n, dtype, B=2, H_kv=H_kv, D=D, seed=n + bits)
    assert layer.n_quantized > 0
    q = _query(2, H, D, dtype)
    assert available(layer, q) is True
    got = kivi_decode_native(layer, q, scale=0.15)
    want = kivi_decode_reference(layer, q, scale=0.15)
    assert got.dtype == dtype and got.shape == (2, H, 1, D)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    # and the tiled PyTorch path agrees
    torch.testing.assert_close(got.float(), kivi_decode(layer, q, scale=0.15, kernel="tiled").float(), **_tol(dtype))


@pytest.mark.parametrize("n", [53, 519, 1000])
def test_lengths_and_a_partly_filled_residual(n):
    # 53: one group, the rest residual; 519: 15 groups; 1000: 30 groups; each after a flush while decoding
    layer = _layer(2, 32, 16, n, torch.float32, steps=min(40, n - 1), seed=n)
    q = _query(1, 9, 64, torch.float32)
    r = layer.keys.shape[2]
    assert layer.n_quantized % 32 == 0 and 16 <= r < 48 and layer.n_quantized + r == n
    torch.testing.assert_close(kivi_decode_native(layer, q), kivi_decode_reference(layer, q), rtol=1e-5, atol=1e-5)


def test_scale_dtype_float32_and_a_float16_residual():
    for dtype, scale_dtype in ((torch.float32, "float32"), (torch.float16, "float16")):
        layer = _layer(2, 32, 8, 301, dtype, scale_dtype=scale_dtype)
        q = _query(1, 9, 64, dtype)
        assert available(layer, q) is True
        torch.testing.assert_close(kivi_decode_native(layer, q).float(), kivi_decode_reference(layer, q).float(),
                                   **_tol(dtype))  # fmt: skip


@pytest.mark.parametrize("kind", ["per-head bool", "shared bool", "additive"])
def test_masks_hide_what_they_hide(kind):
    layer = _layer(2, 32, 8, 300, torch.float32, B=2)
    S = 300
    gen = torch.Generator().manual_seed(5)
    q = _query(2, 9, 64, torch.float32)
    visible = torch.rand(2, 9 if kind == "per-head bool" else 1, 1, S, generator=gen) > 0.4
    # whole pieces hidden too: a hidden first group and a hidden residual for one sequence
    visible[0, ..., :32] = False
    visible[1, ..., layer.n_quantized :] = False
    visible[..., 100] = True
    mask = (
        visible
        if kind != "additive"
        else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    )
    got = kivi_decode_native(layer, q, mask)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, kivi_decode_reference(layer, q), atol=1e-3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_reference(threads):
    # one kv head: 2 x threads pieces of key groups (the last one empty at 3 threads), merged by their softmax stats
    layer = _layer(4, 32, 8, 700, torch.float32, H_kv=1)
    q = _query(1, 3, 64, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kivi_decode_native(layer, q)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q), rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_fall_back_to_the_tiled_path(monkeypatch):
    # group_size 2 at 2 bits: a byte's four codes span two value groups
    assert "multiple of the 4 codes per byte" in shape_problem(16, 2, 2, 4, 2)
    assert "2 bytes, not a multiple of 4" in shape_problem(8, 2, 4, 4, 2)
    assert shape_problem(64, 2, 32, 9, 3) is None
    layer = _layer(2, 2, 3, 40, torch.float32, H_kv=2, D=16)
    q = _query(1, 4, 16, torch.float32)
    assert "codes per byte" in available(layer, q)
    calls = []
    monkeypatch.setattr(kivi_native, "kivi_decode_native", lambda *a: calls.append(1))
    torch.testing.assert_close(kivi_decode(layer, q), kivi_decode_reference(layer, q), rtol=1e-5, atol=1e-5)
    assert not calls


def test_switched_off_or_without_a_compiler_the_tiled_path_runs(monkeypatch, tmp_path):
    layer = _layer(2, 32, 8, 200, torch.float32)
    q = _query(1, 9, 64, torch.float32)
    monkeypatch.setenv(kivi_native.ENV, "0")
    assert available(layer, q) == f"{kivi_native.ENV}=0"
    monkeypatch.delenv(kivi_native.ENV)
    monkeypatch.setattr(kivi_native, "_LIBS", {})
    monkeypatch.setattr(kivi_native, "_AVAILABLE", {})
    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    reason = available(layer, q)
    assert isinstance(reason, str) and "could not be built" in reason
    calls = []
    real = kivi_attention.kivi_decode
    monkeypatch.setattr(kivi_native, "kivi_decode_native", lambda *a: calls.append(1))
    torch.testing.assert_close(real(layer, q), kivi_decode_reference(layer, q), rtol=1e-5, atol=1e-5)
    assert not calls
    with pytest.raises(longkit.errors.MethodError, match="'kernel' must be one of native, tiled"):
        kivi_decode(layer, q, kernel="fast")


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


def _greedy(model, spec: str, ids: torch.Tensor, steps: int, hooked: bool, forced: torch.Tensor | None = None):
    """Greedy decoding of ``steps`` tokens after ``ids`` (or feeding ``forced`` (1, steps) instead): hooked (KIVI
    applied: decode steps read the cache quantised) or the reference path (a KIVICache without the hook: each step
    dequantises the whole cache). (tokens, logits)."""
    args = dict(kv.split("=") for kv in spec.split(":", 1)[1].split(","))
    with torch.inference_mode(), longkit.apply(model, **({"kv": spec} if hooked else {})) as applied:
        cache = applied.new_cache() if hooked else KIVICache(model.config, **{k: int(v) for k, v in args.items()})
        out = model(ids, cache=cache, use_cache=True)
        tokens, logits = [], []
        for i in range(steps):
            token = out.logits[:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
            tokens.append(token)
            out = model(token, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("bits", [2, 4])
def test_greedy_decoding_through_the_hook_equals_the_reference_path(bits, monkeypatch):
    model = _gqa_model(torch.float32)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(bits))
    spec = f"kivi:bits={bits},group_size=32,residual=16"
    calls = []
    real = kivi_native.kivi_decode_native
    monkeypatch.setattr(kivi_native, "kivi_decode_native", lambda *a: calls.append(1) or real(*a))
    # 150 prompt tokens: 128 quantised, 22 exact; the residual reaches 48 and is flushed at the 26th step
    tokens, logits = _greedy(model, spec, ids, 32, hooked=True)
    assert len(calls) == 32 * 2
    ref_tokens, ref_logits = _greedy(model, spec, ids, 32, hooked=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_bfloat16_decoding_stays_close_to_the_reference_path():
    model = _gqa_model(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(9))
    spec = "kivi:bits=2,group_size=32,residual=16"
    tokens, logits = _greedy(model, spec, ids, 16, hooked=True)
    _, ref_logits = _greedy(model, spec, ids, 16, hooked=False, forced=tokens)
    # the reference rounds the dequantised keys and values to bfloat16 before attending; the kernel does not
    err = (logits.float() - ref_logits.float()).abs().max()
    assert err < 0.05 * ref_logits.float().abs().max()


def _visible(layer, q):
    """An all-visible bool mask over the layer's stored tokens: the general path of kivi_decode_native (mask given),
    whose kernel arguments are checked and built at every call, against the unmasked step's fast path."""
    return torch.ones(1, 1, 1, layer.n_quantized + layer.keys.shape[-2], dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unmasked_fast_path_equals_the_checked_path_across_growth_flushes_and_layouts(dtype):
    # two layers of different lengths decoded in turn: the reused scratch grows and is shared; 300 steps cross
    # flushes (every 32nd) and reallocations of the residual's and the codes' buffers (new strides)
    layers = [_layer(2, 32, 16, n, dtype, H_kv=3, D=64, seed=n) for n in (150, 700)]
    q = _query(1, 9, 64, dtype)
    gen = torch.Generator().manual_seed(5)
    strides = set()
    for _ in range(300):
        for layer in layers:
            k, v = (torch.randn(1, 3, 1, 64, generator=gen).to(dtype) for _ in range(2))
            layer.update(k, v)
            fast = kivi_decode_native(layer, q)
            assert torch.equal(fast, kivi_decode_native(layer, q, _visible(layer, q)))
            strides.add((layer.keys.stride(), layer.qkeys.stride()))
    assert len(strides) > 2, "the buffers were never reallocated: the test misses the stride re-check"
    layer = layers[0]
    # storage the kernel cannot take as it is (keys and values with different strides): copied, same result; then
    # back to the buffers' views
    saved = layer.values
    layer.values = layer.values.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(kivi_decode_native(layer, q), kivi_decode_native(layer, q, _visible(layer, q)))
    assert layer._native_plan.strides is None
    layer.values = saved
    assert torch.equal(kivi_decode_native(layer, q), kivi_decode_native(layer, q, _visible(layer, q)))
    # a query of another dtype or head count rebuilds the plan (or fails as the checked path does)
    q32 = q.float()
    assert torch.equal(kivi_decode_native(layer, q32), kivi_decode_native(layer, q32, _visible(layer, q32)))
    with pytest.raises(longkit.errors.MethodError, match="H \\(8\\) a multiple of H_kv \\(3\\)"):
        kivi_decode_native(layer, _query(1, 8, 64, dtype))
    with pytest.raises(longkit.errors.MethodError, match="one query token"):
        kivi_decode_native(layer, torch.cat([q, q], dim=2))


def test_a_copied_layer_decodes_without_the_originals_plan():
    import copy
    import pickle

    layer = _layer(2, 32, 16, 300, torch.float32)
    q = _query(1, 9, 64, torch.float32)
    out = kivi_decode_native(layer, q)
    assert layer._native_plan is not None
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._native_plan is None
        assert torch.equal(kivi_decode_native(twin, q), out)
