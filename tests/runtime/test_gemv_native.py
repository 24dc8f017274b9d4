"""The native single-token linear layer (longkit.runtime.gemv_native) against the plain-PyTorch reference
(longkit.runtime.naive.linear_reference) and F.linear: float32 and bfloat16 (the CPU's bf16 dot product where it has
one, and the portable vector path), 1 to 4 rows, odd shapes (tails of the vector width, output rows not a multiple
of the block), bias, strided activations, threads; refusals and the environment switch."""

from __future__ import annotations

import pytest
import torch

from longkit.errors import MethodError
from longkit.kvcache import kivi_native
from longkit.runtime import gemv_native
from longkit.runtime.gemv_native import available, gemv
from longkit.runtime.naive import linear_reference

pytestmark = pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")

SHAPES = [(1, 1), (3, 7), (5, 33), (192, 576), (13, 100), (65, 1537), (576, 1536)]


def _inputs(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, w, b


def _close(got, ref, dtype, K):
    if dtype == torch.float32:
        # float32 sums in another order: a few ulps of the terms' magnitude
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        # the same float32 sum rounded once to bfloat16 (8 bits); a different summation order can land on the
        # neighbouring bf16 value
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("portable", [False, True], ids=["best", "portable"])
def test_kernel_equals_the_reference(dtype, M, portable):
    for N, K in SHAPES:
        x, w, b = _inputs(M, N, K, dtype, seed=N + K)
        assert available(x, w) is True
        for bias in (None, b):
            got = gemv(x, w, bias, portable=portable)
            assert got.shape == (M, N) and got.dtype == dtype
            _close(got, linear_reference(x, w, bias), dtype, K)
            _close(got, torch.nn.functional.linear(x, w, bias), dtype, K)


def test_a_wrong_row_or_column_shows():
    # every output row and column is computed from its own weight row and activation row (a wrong stride or a lost
    # tail would not pass): one-hot activations pick out single weight columns
    N, K = 7, 37
    w = torch.arange(N * K, dtype=torch.float32).reshape(N, K)
    x = torch.zeros(4, K)
    for m, k in enumerate((0, 31, 32, 36)):
        x[m, k] = 1.0
    assert torch.equal(gemv(x, w), w[:, [0, 31, 32, 36]].T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_leading_dims_strides_and_threads(dtype, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    # (B, 1, K) as a decode step passes it, and a strided view of wider rows; big enough for 2 threads to split it
    x, w, b = _inputs(2, 1000, 576, dtype, seed=1)
    wide = torch.randn(2, 1, 2 * 576).to(dtype)[..., ::2]
    for xx in (x.reshape(2, 1, 576), wide):
        got = gemv(xx, w, b)
        assert got.shape == (*xx.shape[:-1], 1000)
        _close(got, linear_reference(xx, w, b), dtype, 576)


def test_refusals_and_the_switch(monkeypatch):
    x, w, b = _inputs(1, 8, 16, torch.float32)
    with pytest.raises(MethodError, match="'x' must hold 1 to 4 rows"):
        gemv(torch.zeros(5, 16), w)
    with pytest.raises(MethodError, match="'weight' must be"):
        gemv(x, torch.zeros(8, 15))
    with pytest.raises(MethodError, match="'bias' must be"):
        gemv(x, w, torch.zeros(7))
    assert "dtype" in available(x.half(), w.half())
    with pytest.raises(MethodError, match="not available"):
        gemv(x.double(), w.double())
    monkeypatch.setenv(gemv_native.ENV, "0")
    assert available(x, w) == f"{gemv_native.ENV}=0"
    with pytest.raises(MethodError, match="LONGKIT_GEMV_NATIVE=0"):
        gemv(x, w)


def test_a_failed_build_says_why(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no C compiler (set CC, or install cc/gcc)")

    monkeypatch.setattr(kivi_native, "compile_library", broken)
    monkeypatch.setattr(gemv_native, "_LIBS", {})
    x, w, _ = _inputs(1, 4, 16, torch.float32)
    assert "could not be built" in available(x, w)
