"""Sliding-window attention by chunks over the key band (``sliding_window_attention``) equals the masked reference,
and the ``sliding_window`` method runs tiny-gemma3's sliding layers through it (window 16) while its full-attention
layer stays plain SDPA: equal logits to the plain model with padding, cached decoding and chunked prefill."""

from __future__ import annotations

import pytest
import torch
from attention_helpers import qkv

import longkit
from conftest import sample_ids
from longkit.attention.base import sliding_layer_attention
from longkit.attention.masks import MaskSpec
from longkit.attention.naive import reference_attention
from longkit.attention.sliding import SlidingWindow, sliding_window_attention
from longkit.errors import MethodError
from longkit.registry import registry


def _reference(q, k, v, window, scale=None):
    # queries are the last T of the S keys
    return reference_attention(q, k, v, MaskSpec(causal=True, window=window, q_offset=k.shape[2] - q.shape[2]), scale)[0]


@pytest.mark.parametrize(
    ("T", "S", "H_kv", "window", "chunk"),
    [
        (37, 37, 4, 8, 5),  # odd length, chunks that do not divide it, MHA
        (64, 64, 2, 16, 16),  # chunk boundaries on the window, GQA
        (50, 50, 1, 64, 16),  # T < W: the band is all causal keys
        (203, 203, 2, 7, 32),  # T >> W, odd window
        (29, 60, 2, 16, 8),  # queries after cached keys (chunked prefill): offset S - T
        (1, 40, 2, 16, 8),  # one decoding step
    ],
)
def test_band_equals_masked_reference(T, S, H_kv, window, chunk):
    q, _, _ = qkv(T, T, H_kv, seed=T)
    _, k, v = qkv(S, S, H_kv, seed=S + 1)
    out = sliding_window_attention(q, k, v, window, chunk=chunk, scale=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, window, 0.3), atol=1e-5, rtol=1e-5)


def test_band_bf16():
    q, k, v = qkv(90, 90, 2, dtype=torch.bfloat16, seed=3)
    out = sliding_window_attention(q, k, v, 12, chunk=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, k, v, 12).float(), atol=2e-2, rtol=2e-2)


def test_band_uses_the_given_mask_slice_for_padding():
    T, W = 48, 10
    q, k, v = qkv(T, T, 2, seed=5)
    spec = MaskSpec(causal=True, window=W)
    visible = spec.to_dense(2, 1, T, T, device="cpu").clone()
    visible[0, :, :, :7] = False  # left padding of the first sequence: its first 7 keys are never seen
    dense = MaskSpec(causal=True, window=W, dense=visible)
    out = sliding_window_attention(q, k, v, W, mask=visible, chunk=8)
    ref = reference_attention(q, k, v, dense)[0]
    # padded query rows see nothing: whatever SDPA makes of them is the model's business; the others must be equal
    torch.testing.assert_close(out[:, :, 7:], ref[:, :, 7:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    # and the mask matters: without it the padded keys are seen
    assert not torch.allclose(out[0, :, 7:17], sliding_window_attention(q, k, v, W, chunk=8)[0, :, 7:17], atol=1e-4)


def test_band_gradients_equal_the_reference():
    q, k, v = (t.requires_grad_() for t in qkv(40, 40, 2, seed=9))
    sliding_window_attention(q, k, v, 9, chunk=16).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _reference(q, k, v, 9).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bad_input_names_the_parameter():
    q, k, v = qkv(8, 8, 2)
    with pytest.raises(MethodError, match="'window' must be an int >= 1"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(MethodError, match="'chunk'"):
        sliding_window_attention(q, k, v, 4, chunk=0)
    with pytest.raises(MethodError, match="'mask' must be"):
        sliding_window_attention(q, k, v, 4, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(MethodError, match="last of the S"):
        sliding_window_attention(q, k[:, :, :4], v[:, :, :4], 4)
    with pytest.raises(MethodError, match="chunk"):
        registry("attention").create("sliding_window", {"chunk": 0})


@pytest.fixture(scope="module")
def gemma():
    return longkit.load_model("tiny-gemma3")


def _count_band_calls(monkeypatch):
    import longkit.attention.sliding as sliding

    calls = []
    real = sliding.sliding_window_attention

    def counting(*a, **kw):
        calls.append(a[0].shape[2])
        return real(*a, **kw)

    monkeypatch.setattr(sliding, "sliding_window_attention", counting)
    return calls


def test_model_logits_equal_plain_sdpa_and_undo_is_exact(gemma, monkeypatch):
    model = gemma.model
    ids = sample_ids(gemma, 77, seed=4)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        calls = _count_band_calls(monkeypatch)
        with longkit.apply(model, attention="sliding_window", attention_args={"chunk": 16}):
            out = model(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits
    # the three sliding layers of tiny-gemma3 went through the band; the full layer did not
    assert calls == [77, 77, 77]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(after, ref)
    assert model.config._attn_implementation == "sdpa"


def test_model_with_left_padding_equals_plain_sdpa(gemma, monkeypatch):
    model = gemma.model
    ids = torch.cat([sample_ids(gemma, 70, seed=6), sample_ids(gemma, 70, seed=7)])
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :9] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=attention_mask, use_cache=False).logits
        calls = _count_band_calls(monkeypatch)
        with longkit.apply(model, attention="sliding_window", attention_args={"chunk": 16}):
            out = model(ids, attention_mask=attention_mask, use_cache=False).logits
    assert len(calls) == 3
    torch.testing.assert_close(out[0, 9:], ref[0, 9:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-4)


def test_chunked_prefill_and_decoding_from_the_sliding_cache_equal_one_forward(gemma, monkeypatch):
    model = gemma.model
    ids = sample_ids(gemma, 90, seed=8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        calls = _count_band_calls(monkeypatch)
        with longkit.apply(model, attention="sliding_window", attention_args={"chunk": 16}):
            # two prefill chunks: the second attends the sliding cache's last W - 1 keys plus its own 40
            out = model(ids[:, :40], use_cache=True)
            cache, logits = out.past_key_values, [out.logits]
            out = model(ids[:, 40:80], cache=cache, use_cache=True)
            logits.append(out.logits)
            for t in range(80, 90):
                out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
                logits.append(out.logits)
    # both prefill chunks ran the band on every sliding layer; decoding steps kept the model's attention
    assert calls == [40, 40, 40, 40, 40, 40]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=2e-4, rtol=1e-4)


def test_short_prompts_full_layers_and_softcapping_keep_the_models_attention(gemma, monkeypatch):
    calls = _count_band_calls(monkeypatch)
    method = SlidingWindow(chunk=16)
    layer = gemma.model.model.layers[0].self_attn
    q, k, v = qkv(40, 40, 1, D=layer.head_dim)
    method.forward(layer, q, k, v, None, 0.25, sliding_window=16)
    assert calls == [40]
    # softcapping (the band would ignore it; transformers' SDPA refuses it), prompts no longer than the window or a chunk, full-attention layers:
    # transformers' own SDPA function, bit for bit
    with pytest.raises(ValueError, match="softcap"):
        method.forward(layer, q, k, v, None, 0.25, sliding_window=16, softcap=30.0)
    for args, kw in [((q[:, :, :16], k[:, :, :16], v[:, :, :16]), {"sliding_window": 16}),
                     ((q, k, v), {"sliding_window": None})]:
        out, _ = method.forward(layer, *args, None, 0.25, **kw)
        assert torch.equal(out, sliding_layer_attention(layer, *args, None, 0.25, 0.0, kw))
    assert calls == [40]
