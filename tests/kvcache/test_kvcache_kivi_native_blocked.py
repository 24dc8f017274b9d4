"""KIVI's native packed read, kernels ``blocked`` (tile unit where the CPU has one) and ``blocked-vec`` (vector units
only), against the reference that dequantises the whole cache (longkit.kvcache.naive.kivi_decode_reference) and
against the first loops (``v1``): 2 and 4 bits, 1 to 4 query heads per kv head, head dims 64 and 128, group sizes
16 and 32, lengths that are not whole groups, masks, float32 and bfloat16, several threads and pieces, ragged rows
(kivi_attend_rows). On a CPU without AVX-512 both blocked kernels run the v1 loops, and these tests still hold."""

from __future__ import annotations

import pytest
import torch

from longkit.errors import MethodError
from longkit.kvcache import kivi_native
from longkit.kvcache.kivi import KIVILayer, KIVIRaggedLayer
from longkit.kvcache.kivi_attention import kivi_decode
from longkit.kvcache.kivi_native import KERNELS, available, kivi_decode_native
from longkit.kvcache.naive import kivi_decode_reference

pytestmark = pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")

BLOCKED = ["blocked", "blocked-vec"]
FP32 = dict(rtol=1e-5, atol=1e-5)


def _layer(bits, g, residual, n, dtype, *, B=1, H_kv=2, D=64, seed=0):
    """A dense KIVI layer after a prefill of ``n`` tokens (keys with an outlier channel, as KIVI's motivation)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H_kv, n, D, generator=gen) * (1 + 4 * (torch.arange(D) == 3))
    v = torch.randn(B, H_kv, n, D, generator=gen) + 0.5
    layer = KIVILayer(bits, g, residual)
    layer.update(k.to(dtype), v.to(dtype))
    return layer


def _query(B, H, D, dtype, seed=1):
    return (2 * torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(seed))).to(dtype)


def test_the_kernels_are_listed_and_a_wrong_name_is_refused():
    assert KERNELS == ("blocked", "blocked-vec", "v1")
    layer = _layer(2, 32, 0, 64, torch.float32)
    with pytest.raises(MethodError, match="parameter 'kernel' must be one of blocked, blocked-vec, v1"):
        kivi_decode_native(layer, _query(1, 4, 64, torch.float32), kernel="fast")


@pytest.mark.parametrize("kernel", BLOCKED)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("gq", [1, 2, 3, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_blocked_read_equals_the_reference_over_lengths_and_groups(kernel, bits, gq, D):
    # 1 and 17 tokens: nothing (or one group of 16) quantised; 1000 and 3001: not whole groups, an odd number of
    # 16-token blocks of group 16 (the tile path for values takes 32 at a time), a short residual
    q = _query(2, 2 * gq, D, torch.float32)
    for g in (16, 32):
        for n in (1, 17, 1000, 3001):
            layer = _layer(bits, g, 0 if n > 17 else 1, n, torch.float32, B=2, D=D, seed=n + bits + gq)
            want = kivi_decode_reference(layer, q)
            if layer.qkeys is None:
                assert available(layer, q) == "no quantised tokens"
                torch.testing.assert_close(kivi_decode(layer, q), want, **FP32)
                continue
            assert layer.n_quantized == n - n % g if n > 17 else layer.n_quantized == 16 and g == 16
            got = kivi_decode_native(layer, q, kernel=kernel)
            torch.testing.assert_close(got, want, **FP32)
            torch.testing.assert_close(got, kivi_decode_native(layer, q, kernel="v1"), **FP32)


@pytest.mark.parametrize("kernel", BLOCKED)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, "float16"), (torch.float16, "float32")])
def test_blocked_read_in_half_dtypes(kernel, bits, dtype, scale_dtype):
    gen = torch.Generator().manual_seed(bits)
    k, v = torch.randn(1, 3, 1100, 64, generator=gen).to(dtype), torch.randn(1, 3, 1100, 64, generator=gen).to(dtype)
    layer = KIVILayer(bits, 32, 128, scale_dtype)
    layer.update(k, v)
    q = _query(1, 9, 64, dtype)
    got = kivi_decode_native(layer, q, kernel=kernel)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), kivi_decode_reference(layer, q).float(), rtol=3e-2, atol=3e-2)
    # the same float32 arithmetic as the v1 loops up to summation order: within one rounding of the output dtype
    torch.testing.assert_close(got.float(), kivi_decode_native(layer, q, kernel="v1").float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("kernel", BLOCKED)
@pytest.mark.parametrize("kind", ["per-head bool", "additive"])
def test_blocked_read_with_a_mask(kernel, kind):
    layer = _layer(2, 32, 40, 700, torch.float32, B=2, H_kv=3)
    S = 700
    gen = torch.Generator().manual_seed(3)
    q = _query(2, 9, 64, torch.float32)
    visible = torch.rand(2, 9, 1, S, generator=gen) > 0.4
    visible[0, ..., :64] = False  # whole blocks hidden
    visible[1, ..., layer.n_quantized :] = False  # the whole residual hidden
    visible[..., 100] = True
    mask = (
        visible
        if kind != "additive"
        else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    )
    got = kivi_decode_native(layer, q, mask, kernel=kernel)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q, mask), **FP32)
    assert not torch.allclose(got, kivi_decode_reference(layer, q), atol=1e-3)


@pytest.mark.parametrize("kernel", BLOCKED)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocked_read_in_pieces_on_threads(kernel, threads):
    # one kv head: 2 x threads pieces of whole groups (odd and even numbers of 32-token steps), merged by their stats
    layer = _layer(4, 32, 20, 1500, torch.float32, H_kv=1)
    q = _query(1, 3, 64, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kivi_decode_native(layer, q, kernel=kernel)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, kivi_decode_reference(layer, q), **FP32)


def _ragged_layer(bits, g, residual, n, dtype, *, B=2, H_kv=3, D=64, seed=0):
    """A KIVIRaggedLayer after a prefill of ``n`` tokens of which each head kept its own random share."""
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H_kv, n, D, generator=gen) * (1 + 4 * (torch.arange(D) == 3))).to(dtype)
    v = torch.randn(B, H_kv, n, D, generator=gen).to(dtype)
    layer = KIVIRaggedLayer(bits, g, residual, "float16")
    layer.update(k, v)
    keep = torch.rand(B, H_kv, n, generator=gen) < torch.linspace(0.2, 0.95, B * H_kv).view(B, H_kv, 1)
    keep[..., -1] = True
    layer.compact(keep)
    return layer


@pytest.mark.parametrize("kernel", BLOCKED)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_read_of_ragged_rows(kernel, bits, dtype):
    layer = _ragged_layer(bits, 32, 16, 1400, dtype, seed=bits)
    lengths = layer.q_lengths.flatten()
    assert layer.packed and lengths.unique().numel() > 1 and int(lengths.min()) > 0
    q = _query(2, 9, 64, dtype)
    got = kivi_decode_native(layer, q, kernel=kernel)
    tol = FP32 if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), kivi_decode_reference(layer, q).float(), **tol)
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(2, 9, 1, layer.max_length(), generator=gen) > 0.3
    mask[..., 0] = True
    got = kivi_decode_native(layer, q, mask, kernel=kernel)
    torch.testing.assert_close(got.float(), kivi_decode_reference(layer, q, mask).float(), **tol)
