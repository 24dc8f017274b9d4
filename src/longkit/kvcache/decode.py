"""Single-query (decode) attention that reads each key/value head once, and the choice of its kernel.

At one query token per sequence, attention is bound by reading the cache. Grouped-query models have ``G`` query
heads per key/value head; repeating K and V for them (``repeat_kv``, or an implementation that indexes the kv head
per query head) reads the cache ``G`` times. Packing each kv head's query heads together instead, q ``(B, H, 1, D)``
-> ``(B, H_kv, G, D)`` against K ``(B, H_kv, S, D)``, reads it once: the ``G`` query heads become the rows of one
small matrix product per kv head.

Kernels (:data:`KERNELS`):

- ``sdpa``: the model's own call, transformers' ``sdpa_attention_forward`` (GQA inside sdpa when there is no mask,
  packed when there is one): outputs bit for bit those of a model without longkit. The default.
- ``packed``: torch's fused ``scaled_dot_product_attention`` on the packed query.
- ``matmul``: two matrix products and a float32 softmax on the packed query (what fused kernels lose to on CPUs
  without AVX-512: 14 ms against 1.6 ms per layer at 8K on an AVX2 host, issue 24).
- ``auto``: the fastest of the three, measured once per process for the dtype (:func:`measure_kernels`, at a
  representative size) and remembered per CPU capability, dtype and thread count.

The kernel differs by float rounding only (fp32: about 1e-7), which is why ``sdpa`` stays the default: with it a
longkit cache decodes exactly as transformers' own. Choose with ``LONGKIT_DECODE_ATTENTION=<kernel>`` or
:func:`set_decode_kernel`; the decode benchmark (``benchmarks/decode/decode.py``) records the measurement and the
choice. :func:`longkit.kvcache.naive.decode_reference` (plain PyTorch, float32, repeated heads) is the ground truth the kernels are tested
against.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from longkit.errors import MethodError
from longkit.kvcache.naive import bool_mask as _bool_mask
from longkit.kvcache.naive import decode_reference  # noqa: F401  (the reference, re-exported beside the kernels)

KERNELS = ("sdpa", "packed", "matmul", "auto")
#: the environment variable that picks the kernel (one of :data:`KERNELS`)
ENV = "LONGKIT_DECODE_ATTENTION"

_override: str | None = None
#: (cpu capability, dtype, threads) -> the measured fastest kernel
_measured: dict[tuple[str, torch.dtype, int], str] = {}


def _check_kernel(kernel: str, where: str) -> str:
    if kernel not in KERNELS:
        raise MethodError(f"{where} must be one of {', '.join(KERNELS)} (got {kernel!r})")
    return kernel


def set_decode_kernel(kernel: str | None) -> None:
    """Use ``kernel`` for decode attention in this process (None: back to ``$LONGKIT_DECODE_ATTENTION`` / sdpa)."""
    global _override
    _override = None if kernel is None else _check_kernel(kernel, "set_decode_kernel: parameter 'kernel'")


def decode_kernel() -> str:
    """The configured kernel: :func:`set_decode_kernel`, else ``$LONGKIT_DECODE_ATTENTION``, else ``sdpa``."""
    if _override is not None:
        return _override
    return _check_kernel(os.environ.get(ENV, "sdpa") or "sdpa", f"environment variable {ENV}")


def cpu_capability() -> str:
    """torch's CPU capability (``AVX512``, ``AVX2``, ``DEFAULT``...), which decides its kernels' speed."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older or non-CPU builds: record that it is unknown
        return "unknown"


def pack_query(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """(B, H, 1, D) -> (B, H_kv, G, D): each kv head's query heads as the rows of one matrix."""
    B, H, T, D = q.shape
    if T != 1 or H % h_kv:
        raise MethodError(f"decode attention: needs one query token and H ({H}) a multiple of H_kv ({h_kv}); got T={T}")
    return q.reshape(B, h_kv, H // h_kv, D)


def pack_mask(mask: torch.Tensor | None, h: int, h_kv: int) -> torch.Tensor | None:
    """A (B|1, H|1, 1, S) mask in the packed layout (B|1, H_kv|1, G|1, S); bool True or additive 0 = visible."""
    if mask is None or mask.shape[1] == 1:
        return mask
    return mask.reshape(mask.shape[0], h_kv, h // h_kv, mask.shape[-1])


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    kernel: str = "packed",
) -> torch.Tensor:
    """Attention of one query token per sequence: q (B, H, 1, D), k/v (B, H_kv, S, D), mask (B|1, H|1, 1, S) bool
    (True = visible) or additive, or None. Returns (B, H, 1, D_v) in q's dtype. ``kernel``: ``packed`` or
    ``matmul`` (see the module docstring); K and V are read once per kv head."""
    B, H, _, D = q.shape
    h_kv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qp, m = pack_query(q, h_kv), _bool_mask(pack_mask(mask, H, h_kv))
    if kernel == "packed":
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=m, scale=scale)
    elif kernel == "matmul":
        # (B, H_kv, G, S) scores accumulated in float32 by the matmul, softmax in float32 as eager attention does
        s = torch.matmul(qp, k.transpose(-1, -2)).float().mul_(scale)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)
    else:
        raise MethodError(f"decode_attention: parameter 'kernel' must be packed or matmul (got {kernel!r})")
    return out.reshape(B, H, 1, v.shape[-1])


def measure_kernels(
    dtype: torch.dtype, length: int = 4096, heads: tuple[int, int] = (9, 3), head_dim: int = 64, repeats: int = 20
) -> dict[str, float]:
    """Milliseconds per call of each kernel at one decode step of ``length`` keys (median of ``repeats``).

    ``sdpa`` is timed as transformers calls it without a mask (GQA inside sdpa). The default shape is SmolLM2-135M's
    (9 query heads on 3 kv heads of 64 channels).
    """
    h, h_kv = heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, 1, head_dim, generator=g).to(dtype)
    k = torch.randn(1, h_kv, length, head_dim, generator=g).to(dtype)
    v = torch.randn(1, h_kv, length, head_dim, generator=g).to(dtype)
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "packed": lambda: decode_attention(q, k, v, kernel="packed"),
        "matmul": lambda: decode_attention(q, k, v, kernel="matmul"),
    }
    times: dict[str, list[float]] = {n: [] for n in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()  # warm-up (allocations, kernel selection)
        # interleaved, so that a change of the machine's load hits every kernel alike
        for _ in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()}


def auto_kernel(dtype: torch.dtype) -> str:
    """The fastest kernel for ``dtype`` on this CPU and thread count, measured on first use and remembered; the model's
    own ``sdpa`` unless another is at least 10% faster (a smaller gain is within the noise)."""
    key = (cpu_capability(), dtype, torch.get_num_threads())
    if key not in _measured:
        ms = measure_kernels(dtype)
        best = min(ms, key=ms.get)
        _measured[key] = best if ms[best] < 0.9 * ms["sdpa"] else "sdpa"
    return _measured[key]


def resolved_kernel(dtype: torch.dtype) -> str:
    """The kernel decode attention runs for ``dtype`` now (``auto`` resolved)."""
    kernel = decode_kernel()
    return auto_kernel(dtype) if kernel == "auto" else kernel
