"""KV methods on a hybrid model prefill through ``attention=sliding_window`` (issue #21, item 3): the sliding layers go
through the banded path with no dense T x T mask, the full-attention layer runs sdpa under the KV hook as before, and
the method's protocol is unchanged — the same compressed cache (kept tokens, KIVI's codes), the same next-token logits
and greedy continuation as one full prefill on plain sdpa (tiny-gemma3: three sliding layers of window 16, then one
full-attention layer)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

import longkit
from conftest import sample_ids
from longkit.attention import sliding
from longkit.kvcache.kivi import KIVILayer
from longkit.kvcache.quant import unpack
from longkit.kvcache.storage import RaggedLayer
from longkit.registry import registry

#: the hybrid test's small settings (tests/kvcache/test_kvcache_hybrid.py) for the tiny model
ARGS = {
    "kivi": "kivi:group_size=16,residual=16",
    "duo_attention": "duo_attention:window=8,sinks=2,probe_tokens=64,retrieval_ratio=0.5",
    "cam": "cam:window=8",
    "snapkv": "snapkv:ratio=0.25,window=8",
}
#: queries per band call: below the prompt lengths, so the sliding layers take the banded path
BAND = "attention=sliding_window:chunk=8"
FULL = 3
STEPS = 4


@pytest.fixture(scope="module")
def gemma():
    return longkit.load_model("tiny-gemma3")


@pytest.fixture(scope="module")
def gemma_bf16():
    return longkit.load_model("tiny-gemma3", dtype="bfloat16")


def _run(model, spec: str, ids: torch.Tensor, steps: int = STEPS):
    """One full prefill of ``ids`` under ``spec``, then ``steps`` greedy tokens: (logits of the prefill's last token
    and of every step (steps + 1, V), the greedy tokens, the cache)."""
    with torch.no_grad(), longkit.apply(model, spec) as applied:
        cache = applied.new_cache()
        out = model(ids, cache=cache, use_cache=True)
        logits, tokens = [out.logits[0, -1]], []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits), tokens, cache


def _prompt_keys(model, ids: torch.Tensor) -> torch.Tensor:
    """(H_kv, T, D) the full-attention layer's keys of the prompt, from the plain model."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return cache.layers[FULL].keys[0]


def kept_indices(layer: RaggedLayer, prompt_keys: torch.Tensor) -> list[list[int]]:
    """Per kv head, the prompt positions a compressed layer kept: each stored key matched to the prompt key nearest
    to it (random token ids: every key is far from the others, so rounding cannot swap two)."""
    keys, _, valid, _ = layer.padded()
    out = []
    for h in range(keys.shape[1]):
        stored = keys[0, h][valid[0, h]] if valid is not None else keys[0, h]
        # (kept, T) distance of each stored key to each prompt key
        dist = torch.cdist(stored.float(), prompt_keys[h].float())
        out.append(dist.argmin(-1).tolist())
    return out


def assert_same_protocol(a, b, atol: float) -> None:
    """Two runs of one KV method (:func:`_run`) agree: greedy tokens, logits within ``atol``, and every layer's cache
    (sliding windows, the compressed layer's stored tokens per head and their keys and values)."""
    (la, ta, ca), (lb, tb, cb) = a, b
    assert ta == tb
    torch.testing.assert_close(lb, la, atol=atol, rtol=0)
    for x, y in zip(ca.layers, cb.layers, strict=True):
        assert type(x) is type(y)
        if isinstance(x, DynamicSlidingWindowLayer):
            kx, vx, ky, vy = x.keys, x.values, y.keys, y.values
        else:
            assert torch.equal(x.stored_lengths(), y.stored_lengths())
            kx, vx, _, _ = x.padded()
            ky, vy, _, _ = y.padded()
        torch.testing.assert_close(ky.float(), kx.float(), atol=atol, rtol=0)
        torch.testing.assert_close(vy.float(), vx.float(), atol=atol, rtol=0)


@pytest.fixture
def band_calls(monkeypatch):
    """The query length of every banded call, and the masks the model handed them (None: no dense mask made)."""
    calls = []
    real = sliding.sliding_window_attention

    def counting(q, k, v, window, **kw):
        calls.append((q.shape[2], kw.get("mask")))
        return real(q, k, v, window, **kw)

    monkeypatch.setattr(sliding, "sliding_window_attention", counting)
    return calls


@pytest.mark.parametrize("name", registry("kv").names())
def test_every_kv_method_keeps_its_protocol_through_the_band(gemma, band_calls, name):
    model = gemma.model
    ids = sample_ids(gemma, 61, seed=11)
    spec = f"kv={ARGS.get(name, name)}"
    plain = _run(model, spec, ids)
    assert band_calls == []
    band = _run(model, f"{BAND}+{spec}", ids)
    # the prefill's three sliding layers went through the band, with no T x T mask; decoding kept the model's path
    # (duo_attention's calibration probe, run on applying, goes through the band before it)
    assert band_calls[-3:] == [(61, None)] * 3 and all(mask is None for _, mask in band_calls)
    assert_same_protocol(plain, band, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def assert_greedy_agrees(a, b, margin: float) -> None:
    """bf16: the greedy tokens of two runs agree wherever the first run's choice is clear (its top two logits more
    than ``margin`` apart), up to the first step where a near tie may go either way."""
    (la, ta, _), (_, tb, _) = a, b
    for step, (x, y) in enumerate(zip(ta, tb, strict=True)):
        top = la[step].float().topk(2).values
        if float(top[0] - top[1]) <= margin:
            return
        assert x == y, step


@pytest.mark.parametrize("n", [37, 70, 101])
def test_snapkv_keeps_the_same_tokens(gemma, gemma_bf16, n):
    spec = f"kv={ARGS['snapkv']}"
    for lm in (gemma, gemma_bf16):
        model = lm.model
        ids = sample_ids(lm, n, seed=n)
        # right after the prefill: the compressed layer holds the prompt's kept tokens only
        plain, band = _run(model, spec, ids, steps=0), _run(model, f"{BAND}+{spec}", ids, steps=0)
        keys = _prompt_keys(model, ids)
        kept = kept_indices(plain[2].layers[FULL], keys)
        assert kept == kept_indices(band[2].layers[FULL], keys)
        # a quarter of the prompt per kv head, the observation window (its last 8 tokens) among it
        assert all(len(set(k)) == len(k) == round(0.25 * n) and set(range(n - 8, n)) <= set(k) for k in kept)
        plain, band = _run(model, spec, ids), _run(model, f"{BAND}+{spec}", ids)
        if model.dtype == torch.float32:
            assert_same_protocol(plain, band, atol=1e-5)
        else:
            # bf16: the band's SDPA calls round differently from the masked kernel (an ulp here and there)
            torch.testing.assert_close(band[0][0].float(), plain[0][0].float(), atol=2e-2, rtol=0)
            assert_greedy_agrees(plain, band, margin=0.05)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_quantises_to_the_same_codes(gemma, gemma_bf16, bits):
    n = 83
    for lm in (gemma, gemma_bf16):
        model = lm.model
        ids = sample_ids(lm, n, seed=bits)
        spec = f"kv={ARGS['kivi']},bits={bits}"
        (la, _, ca), (lb, _, cb) = _run(model, spec, ids, steps=0), _run(model, f"{BAND}+{spec}", ids, steps=0)
        x, y = ca.layers[FULL], cb.layers[FULL]
        assert isinstance(x, KIVILayer) and x.n_quantized == y.n_quantized == (n - 16) // 16 * 16
        if model.dtype == torch.float32:
            # the prompt's keys and values agree to float rounding, so every code, scale and zero is the same
            assert all(torch.equal(getattr(x, name), getattr(y, name)) for name in ("qkeys", "qvalues"))
            for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
                torch.testing.assert_close(getattr(y, name), getattr(x, name), atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)
        else:
            # bf16: the prompt's keys and values differ by an ulp here and there (the band rounds differently from
            # the masked kernel), which moves a value near a level boundary to the next level: codes at most one
            # level apart, and nearly all the same
            for name in ("qkeys", "qvalues"):
                cx, cy = unpack(getattr(x, name), bits).int(), unpack(getattr(y, name), bits).int()
                assert int((cx - cy).abs().max()) <= 1
                assert float((cx == cy).float().mean()) > 0.95, name
            torch.testing.assert_close(lb.float(), la.float(), atol=2e-2, rtol=0)


def test_a_band_one_token_too_narrow_is_caught(gemma, monkeypatch):
    model = gemma.model
    ids = sample_ids(gemma, 61, seed=11)
    spec = f"kv={ARGS['snapkv']}"
    plain = _run(model, spec, ids)
    real = sliding.layer_window

    def narrow(module, kwargs):
        window = real(module, kwargs)
        return None if window is None else window - 1

    monkeypatch.setattr(sliding, "layer_window", narrow)
    with pytest.raises(AssertionError):
        assert_same_protocol(plain, _run(model, f"{BAND}+{spec}", ids), atol=1e-5)


def test_padding_keeps_the_dense_mask_and_the_protocol(gemma, band_calls):
    # left padding: the band gets transformers' mask sliced (nothing skipped), and the method drops the padding
    model = gemma.model
    ids = torch.cat([sample_ids(gemma, 50, seed=1), sample_ids(gemma, 50, seed=2)])
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    spec = f"kv={ARGS['snapkv']}"
    out = {}
    for route in (spec, f"{BAND}+{spec}"):
        with torch.no_grad(), longkit.apply(model, route) as applied:
            cache = applied.new_cache()
            out[route] = (model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1], cache)
    assert [(n, m is not None) for n, m in band_calls] == [(50, True)] * 3
    (la, ca), (lb, cb) = out.values()
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)
    assert torch.equal(ca.layers[FULL].stored_lengths(), cb.layers[FULL].stored_lengths())


def test_attention_methods_that_change_full_layers_are_still_refused(gemma):
    from longkit.errors import MethodError

    with pytest.raises(MethodError, match="one of sdpa, eager or attention=sliding_window"):
        longkit.apply(gemma.model, "attention=blockwise+kv=snapkv")
    assert gemma.model.config._attn_implementation == "sdpa"
