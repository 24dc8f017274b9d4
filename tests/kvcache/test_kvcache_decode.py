"""Single-query decode attention (longkit.kvcache.decode): packed kv heads against the plain reference, and the
hook that runs it while decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import run_kv, sample_ids
from longkit.errors import MethodError
from longkit.kvcache import decode
from longkit.kvcache.decode import decode_attention, decode_reference


@pytest.fixture(autouse=True)
def _default_kernel():
    yield
    decode.set_decode_kernel(None)


def _inputs(B, H, H_kv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, S, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, S, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("kernel", ["packed", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 37, 257])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_kernels_equal_the_reference(kernel, dtype, S, heads):
    H, H_kv = heads
    q, k, v = _inputs(2, H, H_kv, S, 16, dtype)
    got = decode_attention(q, k, v, scale=0.3, kernel=kernel)
    want = decode_reference(q, k, v, scale=0.3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == dtype and got.shape == (2, H, 1, 16)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("kernel", ["packed", "matmul"])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("additive", [True, False])
def test_kernels_honour_masks_per_head_and_shared(kernel, per_head, additive):
    H, H_kv, S = 6, 2, 41
    q, k, v = _inputs(2, H, H_kv, S, 8, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, H if per_head else 1, 1, S, generator=g) > 0.4
    mask[..., 0] = True  # every row sees a key
    m = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if additive else mask
    got = decode_attention(q, k, v, m, kernel=kernel)
    want = decode_reference(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the mask matters: without it the result is different
    assert not torch.allclose(decode_reference(q, k, v), want, atol=1e-3)


def test_kernel_choice_is_checked_and_overridable(monkeypatch):
    with pytest.raises(MethodError, match="must be one of sdpa, packed, matmul, auto"):
        decode.set_decode_kernel("fast")
    monkeypatch.setenv(decode.ENV, "flash")
    with pytest.raises(MethodError, match="LONGKIT_DECODE_ATTENTION must be one of"):
        decode.decode_kernel()
    monkeypatch.setenv(decode.ENV, "matmul")
    assert decode.decode_kernel() == "matmul"
    decode.set_decode_kernel("packed")
    assert decode.decode_kernel() == "packed"
    monkeypatch.delenv(decode.ENV)
    decode.set_decode_kernel(None)
    assert decode.decode_kernel() == "sdpa"


def test_auto_measures_once_and_picks_a_kernel(monkeypatch):
    calls = []

    def fake(dtype, **kw):
        calls.append(dtype)
        return {"sdpa": 1.0, "packed": 0.5, "matmul": 0.95}

    monkeypatch.setattr(decode, "measure_kernels", fake)
    monkeypatch.setattr(decode, "_measured", {})
    decode.set_decode_kernel("auto")
    assert decode.resolved_kernel(torch.float32) == "packed"
    assert decode.resolved_kernel(torch.float32) == "packed" and calls == [torch.float32]
    # within 10% of the model's own call: keep it
    monkeypatch.setattr(decode, "measure_kernels", lambda dtype, **kw: {"sdpa": 1.0, "packed": 0.95, "matmul": 2.0})
    assert decode.resolved_kernel(torch.bfloat16) == "sdpa"


def test_measure_kernels_times_every_kernel():
    ms = decode.measure_kernels(torch.float32, length=64, repeats=2)
    assert set(ms) == {"sdpa", "packed", "matmul"} and all(t > 0 for t in ms.values())


@pytest.mark.parametrize("spec", ["snapkv:ratio=1.0", "adakv:ratio=0.4", "streaming_llm:ratio=0.5,decode_every=2"])
@pytest.mark.parametrize("kernel", ["packed", "matmul"])
def test_hook_decodes_with_the_kernel_as_with_the_models_own_attention(tiny_llama, spec, kernel, monkeypatch):
    model = tiny_llama.model
    ids = sample_ids(tiny_llama, n=50)
    want, _ = run_kv(model, spec, ids, 6)
    used = []
    real = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **kw: used.append(kw["kernel"]) or real(*a, **kw))
    decode.set_decode_kernel(kernel)
    got, _ = run_kv(model, spec, ids, 6)
    # one call per layer and decode step
    assert used == [kernel] * (6 * model.config.num_hidden_layers)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
