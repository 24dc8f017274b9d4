"""The native single-query attention over a dense cache (longkit.kvcache.decode_native) against the plain-PyTorch
reference (longkit.kvcache.naive.decode_reference): dtypes (float32 through 16-lane float products, bfloat16 through
the CPU's bfloat16 dot product where it has one), odd lengths and partial 16-token blocks, per-kv-head masks, the
read limit (slots past it never reach the output), batches, threads and pieces; refusals."""

from __future__ import annotations

import pytest
import torch

from longkit.errors import MethodError
from longkit.kvcache import decode_native, kivi_native
from longkit.kvcache.decode_native import available, decode_attend
from longkit.kvcache.naive import decode_reference

pytestmark = pytest.mark.skipif(kivi_native._compiler() is None, reason="no C compiler to build the native kernel")


def _inputs(B, H, H_kv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, H, 1, D, generator=g)).to(dtype)
    # an outlier channel makes the scores peaked: a wrong max or merge shows
    k = (torch.randn(B, H_kv, S, D, generator=g) * (1 + 3 * (torch.arange(D) == 5))).to(dtype)
    v = torch.randn(B, H_kv, S, D, generator=g).to(dtype)
    return q, k, v


def _ref(q, k, v, mask, limit):
    """The reference over the first ``limit`` slots, the per-kv-head mask repeated over its query heads."""
    H, H_kv = q.shape[1], k.shape[1]
    m = None if mask is None else mask[..., :limit].repeat_interleave(H // H_kv, dim=1)
    return decode_reference(q.float(), k[..., :limit, :].float(), v[..., :limit, :].float(), m)


def _tol(dtype):
    # bfloat16: the output is rounded to bfloat16 (8 bits), the reference is float32
    return dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("B", "H", "H_kv", "S", "D"),
    [(1, 9, 3, 1, 64), (1, 9, 3, 37, 64), (2, 4, 2, 1000, 32), (1, 9, 3, 3001, 64), (2, 8, 8, 21, 16),
     (1, 4, 1, 600, 128)],
)  # fmt: skip
def test_kernel_equals_the_reference(dtype, B, H, H_kv, S, D):
    q, k, v = _inputs(B, H, H_kv, S, D, dtype)
    assert available(q, k) is True
    torch.testing.assert_close(decode_attend(q, k, v).float(), _ref(q, k, v, None, S), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_masks_and_the_read_limit(dtype, threads, monkeypatch):
    B, H, H_kv, S, D = 2, 6, 3, 2100, 64
    q, k, v = _inputs(B, H, H_kv, S, D, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    # per batch and kv head: different tokens kept (AdaKV), the first always visible
    mask = torch.rand(B, H_kv, 1, S, generator=g) > 0.4
    mask[..., 0] = True
    limit = 1777
    # garbage past the limit must not be read into the output
    k[..., limit:, :] = 1e4
    v[..., limit:, :] = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attend(q, k, v, mask, limit=limit)
        shared = decode_attend(q, k, v, mask[:1, :1], limit=limit)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.float(), _ref(q, k, v, mask, limit), **_tol(dtype))
    # a mask broadcast over batch and heads
    torch.testing.assert_close(shared.float(), _ref(q, k, v, mask[:1, :1].expand(B, H_kv, 1, S), limit), **_tol(dtype))


def test_scale_strides_and_pieces(monkeypatch):
    # a non-default scale; a query that is a transposed view (as attention layers hand it over); one piece per head
    q, k, v = _inputs(1, 9, 3, 700, 64, torch.float32, seed=4)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    want = decode_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(decode_attend(qt, k, v, scale=0.3), want, rtol=1e-5, atol=2e-6)
    monkeypatch.setattr(decode_native, "MIN_PIECE", 10**9)
    torch.testing.assert_close(decode_attend(q, k, v, scale=0.3), want, rtol=1e-5, atol=2e-6)


def test_refusals(monkeypatch):
    q, k, v = _inputs(1, 4, 2, 30, 24, torch.float32)
    assert "multiple of 16" in available(q, k)
    with pytest.raises(MethodError, match="not available"):
        decode_attend(q, k, v)
    q, k, v = _inputs(1, 4, 2, 30, 16, torch.float32)
    with pytest.raises(MethodError, match="parameter 'limit' must be in"):
        decode_attend(q, k, v, limit=31)
    with pytest.raises(MethodError, match="parameter 'mask'"):
        decode_attend(q, k, v, torch.ones(1, 4, 1, 30, dtype=torch.bool))
    assert "dtype" in available(q, k.double())
    monkeypatch.setenv(decode_native.ENV, "0")
    assert available(q, k) == f"{decode_native.ENV}=0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gq", [1, 2, 3, 4])
def test_every_loop_layout_equals_the_reference(dtype, D, gq):
    # bf16 takes the register-blocked loops (where the CPU has the bf16 dot instruction; the scores of full blocks by
    # the tile unit where it has AMX, "blocked", or by the dot instruction, "blocked-dot"), fp32 the general ones;
    # lengths: one token, a partial block, a partial last block per piece, several prefetching pieces
    kernels = decode_native.KERNELS if dtype == torch.bfloat16 else ("blocked",)
    for S in (1, 17, 1000, 3001):
        q, k, v = _inputs(1, 2 * gq, 2, S, D, dtype, seed=S)
        want = _ref(q, k, v, None, S)
        for kernel in kernels:
            got = decode_attend(q, k, v, kernel=kernel)
            torch.testing.assert_close(got.float(), want, **_tol(dtype))
            # the same float32 arithmetic in another order: the outputs differ by bf16 rounding at most
            torch.testing.assert_close(got, decode_attend(q, k, v, kernel="v1"), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hidden_blocks_and_pieces(dtype):
    # whole 16-token blocks hidden (the block skips its values), a head with one visible token in a piece of its own
    # (pieces of 256 tokens: its other pieces see nothing and must drop out of the merge), limits off the blocks
    B, H, H_kv, S, D = 1, 6, 2, 1100, 64
    q, k, v = _inputs(B, H, H_kv, S, D, dtype, seed=5)
    mask = torch.ones(B, H_kv, 1, S, dtype=torch.bool)
    mask[:, 0, :, 32:80] = False
    mask[:, 0, :, 500:517] = False
    mask[:, 1] = False
    mask[:, 1, :, 700] = True
    for limit in (1100, 1033, 701):
        for kernel in decode_native.KERNELS:
            got = decode_attend(q, k, v, mask, limit=limit, kernel=kernel)
            torch.testing.assert_close(got.float(), _ref(q, k, v, mask, limit), **_tol(dtype))
    # head 1 sees only token 700: its rows are that value row exactly
    torch.testing.assert_close(got[0, 3:, 0].float(), v[0, 1, 700].float().expand(3, D), rtol=1e-2, atol=1e-2)


def test_the_kernel_parameter_is_checked():
    q, k, v = _inputs(1, 4, 2, 30, 16, torch.float32)
    with pytest.raises(MethodError, match="parameter 'kernel' must be one of blocked, blocked-dot, v1"):
        decode_attend(q, k, v, kernel="fast")
