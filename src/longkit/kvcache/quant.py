"""Group-wise asymmetric integer quantisation and bit packing for KV caches (pure PyTorch).

Asymmetric (min/max) quantisation of ``b`` bits maps each group of ``G`` consecutive elements along one axis to
codes ``q = round((x - zero) / scale)`` in ``[0, 2^b - 1]`` with ``zero = min(group)`` and
``scale = (max - min) / (2^b - 1)``; ``x ≈ q * scale + zero`` with an error of at most ``scale / 2``.
Scales and zeros are stored in ``float16`` (as KIVI does) or ``float32``; they are rounded *outward* to that dtype
(zero down, scale up) before the codes are computed, so the stored grid still spans the group and the
``scale / 2`` bound holds for the stored scale. Codes are packed little-end first along the last axis:
four 2-bit or two 4-bit codes per ``uint8``.

Based on KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al. 2024),
https://arxiv.org/abs/2402.02750.
"""

from __future__ import annotations

import torch

from longkit.errors import MethodError

BITS = (2, 4)
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise MethodError(f"parameter 'bits' must be one of {', '.join(map(str, BITS))} (got {bits!r})")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last axis: ``(..., N)`` -> ``(..., N * bits / 8)`` uint8."""
    per = _check_bits(bits)
    n = codes.shape[-1]
    if n % per:
        raise MethodError(f"pack: the last axis ({n}) must be a multiple of {per} for {bits}-bit codes")
    # (..., N / per, per): code i of each byte goes to bits [i*b, (i+1)*b)
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // per, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., M)`` uint8 -> ``(..., M * 8 / bits)`` uint8 codes."""
    per = _check_bits(bits)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    # (..., M, per)
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _outward(t: torch.Tensor, dtype: torch.dtype, *, up: bool) -> torch.Tensor:
    """Round float64 ``t`` to ``dtype`` towards +inf (``up``) or -inf, so the stored value bounds the exact one."""
    r = t.to(dtype)
    wrong = r.double() < t if up else r.double() > t
    if wrong.any():
        toward = torch.full_like(r, float("inf") if up else float("-inf"))
        r = torch.where(wrong, torch.nextafter(r, toward), r)
    return r


def quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise quantisation of ``x`` along ``axis`` in groups of ``group_size`` elements.

    Returns ``(codes, scale, zero)``: ``codes`` uint8 of ``x``'s shape (unpacked), ``scale`` and ``zero`` of
    ``x``'s shape with ``axis`` shrunk to ``size / group_size``, in ``scale_dtype``.
    """
    _check_bits(bits)
    axis = axis % x.dim()
    n = x.shape[axis]
    if group_size < 1 or n % group_size:
        raise MethodError(f"quantize: axis {axis} of size {n} is not a multiple of group_size={group_size}")
    levels = (1 << bits) - 1
    # (..., n / G, G) with the grouped axis last
    xt = x.float().movedim(axis, -1)
    g = xt.reshape(*xt.shape[:-1], n // group_size, group_size)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    # float64 so that the outward rounding to float32 scales is exact too
    zero = _outward(lo.double(), scale_dtype, up=False)
    scale = _outward((hi.double() - zero.double()) / levels, scale_dtype, up=True)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise MethodError(
            f"quantize: values overflow scale_dtype={str(scale_dtype).removeprefix('torch.')} "
            f"(largest |x| = {x.abs().max().item():g}); use scale_dtype='float32'"
        )
    # A constant group has scale 0: every code is 0 and dequantises to the exact value.
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.clamp(torch.round((g - zero.float()) / safe), 0, levels).to(torch.uint8)
    codes = codes.reshape(xt.shape).movedim(-1, axis)
    return codes, scale.squeeze(-1).movedim(-1, axis), zero.squeeze(-1).movedim(-1, axis)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, axis: int, dtype: torch.dtype
) -> torch.Tensor:
    """``codes * scale + zero`` with each scale/zero repeated over its group along ``axis``; result in ``dtype``."""
    axis = axis % codes.dim()
    s = scale.float().repeat_interleave(group_size, dim=axis)
    z = zero.float().repeat_interleave(group_size, dim=axis)
    return (codes.float() * s + z).to(dtype)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` packed codes."""
    return numel * bits // 8
