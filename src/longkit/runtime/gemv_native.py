"""Single-token linear layers natively: y = x W^T (+ b) for 1 to 4 activation rows, the weights streamed once.

A decode step multiplies one activation row per sequence by every weight matrix of the model: a matrix-vector
product whose time is the time to read the weights (SmolLM2-135M bf16: 269 MB per token). torch's kernels are built
for matrices: eagerly, ``F.linear`` on one bf16 row took 1.5-3.7x the time of ``w.sum()`` over SmolLM2's 576x576
and 1536x576 weights; inside a compiled decode step (inductor's ``freezing``, weights prepacked for oneDNN) the large
matrices stream at about the read's speed but the small ones pay a fixed cost per call (192x576: 1.9-2.2x the read;
measurements on a shared, capped CPU: ``benchmarks/decode/results/compile.notes.md``). This kernel does the
memory-bound part directly:

- each weight row is loaded once and multiplied into all ``M`` (1-4) activation rows, four weight rows at a time
  (4 x M float32 accumulators in registers), products summed in float32;
- bfloat16 weights on a CPU with AVX512-BF16: the CPU's ``vdpbf16ps`` (pairs of exact bf16 products summed into
  float32 lanes), no conversion of the weights; otherwise GCC's vector extensions (16 float lanes, bf16 widened by a
  shift); any ``d_in`` (a masked or scalar tail);
- OpenMP over blocks of output rows (a matrix smaller than about 64K weights per thread runs on one thread: waking
  a thread costs more than it saves).

Weights and activations are float32 or bfloat16 (the same), the output in their dtype (bf16 rounded to nearest
even from the float32 sum, as torch). Compiled on first use per dtype (``-O3 -march=native -fopenmp``, cached by
:func:`longkit.kvcache.kivi_native.compile_library`). Without a C compiler, off the CPU, or for other dtypes
:func:`available` says why and callers keep ``F.linear``; ``LONGKIT_GEMV_NATIVE=0`` turns the kernel off.

Outputs equal :func:`longkit.runtime.naive.linear_reference` (float32 products and sums) up to the summation order:
float32 within 1e-5 relative, bfloat16 within one bf16 rounding of the output.

Based on the roofline view of memory-bound kernels: Roofline: an insightful visual performance model (Williams,
Waterman, Patterson 2009), https://doi.org/10.1145/1498765.1498785; a single-token decode step as a memory-bound
GEMV: Efficient LLM Inference on CPUs (Shen et al. 2023), https://arxiv.org/abs/2311.00502.
"""

from __future__ import annotations

import ctypes
import os

import torch

from longkit.errors import MethodError

#: the environment variable that turns the native kernel off (``0``)
ENV = "LONGKIT_GEMV_NATIVE"
#: the most activation rows one call takes (each weight row is multiplied into all of them)
MAX_ROWS = 4

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

/* compiled per dtype: KV_KIND 0 float32, 1 bfloat16 (x, w, bias and y all of it); PORTABLE 1: the vector-extension
   path even where the CPU has the bf16 dot instruction (tests) */
#if KV_KIND == 1 && defined(__AVX512BF16__) && !PORTABLE
#define DOT_BF16 1
#else
#define DOT_BF16 0
#endif
/* weight rows per block: 4 x M accumulators stay in registers */
#define RB 4

/* kv_t (the element type of x, w, bias and y), kv_float, float_kv, the 16-lane vectors vf, vu, vh and load16:
   c_prelude(vec16=True), compiled before this source */

static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += v[l];
    return s;
#endif
}

#if DOT_BF16
/* NR weight rows from w (row stride K) times the M activation rows xs (bf16, K padded with zeros to KP, a multiple
   of 32): out[m][r] = sum_k x[m][k] w[r][k]. The weights' last partial 32 are loaded masked (zeros past K). */
static inline void block(const int M, const int NR, const kv_t *w, int64_t K, const kv_t *xs, int64_t KP,
                         float out[4][RB]) {
    __m512 acc[4][RB];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
    const int64_t KF = K / 32 * 32;
    for (int64_t k = 0; k < KF; k += 32) {
        __m512bh xv[4];
        for (int m = 0; m < M; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xs + m * KP + k);
        for (int r = 0; r < NR; r++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
            for (int m = 0; m < M; m++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv[m], wv);
        }
    }
    if (KF < K) {
        const __mmask32 tail = (__mmask32)((1ull << (K - KF)) - 1);
        __m512bh xv[4];
        for (int m = 0; m < M; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xs + m * KP + KF);
        for (int r = 0; r < NR; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * K + KF);
            for (int m = 0; m < M; m++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv[m], wv);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < NR; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}
#else
/* the same with the activations as float32 (xs, K padded with zeros to KP, a multiple of 16), the weights widened in
   registers; the last partial 16 of each weight row summed one by one */
static inline void block(const int M, const int NR, const kv_t *w, int64_t K, const float *xs, int64_t KP,
                         float out[4][RB]) {
    vf acc[4][RB];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < NR; r++) acc[m][r] = (vf){0};
    const int64_t KF = K / 16 * 16;
    for (int64_t k = 0; k < KF; k += 16) {
        vf xv[4];
        for (int m = 0; m < M; m++) memcpy(&xv[m], xs + m * KP + k, sizeof(vf));
        for (int r = 0; r < NR; r++) {
            const vf wv = load16(w + r * K + k);
            for (int m = 0; m < M; m++) acc[m][r] += xv[m] * wv;
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < NR; r++) {
            float s = hsum(acc[m][r]);
            for (int64_t k = KF; k < K; k++) s += xs[m * KP + k] * kv_float(w[r * K + k]);
            out[m][r] = s;
        }
}
#endif

#if DOT_BF16
typedef kv_t xs_t;
#define XPAD 32
#else
typedef float xs_t;
#define XPAD 16
#endif

/* rows [b0, b1) of blocks of RB output rows (the last block of N % RB rows one row at a time) */
static inline void rows(const int M, const kv_t *w, const kv_t *bias, int64_t N, int64_t K, const xs_t *xs,
                        int64_t KP, kv_t *y, int64_t b0, int64_t b1) {
    float out[4][RB];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t n0 = b * RB;
        if (n0 + RB <= N) {
            block(M, RB, w + n0 * K, K, xs, KP, out);
            for (int m = 0; m < M; m++)
                for (int r = 0; r < RB; r++)
                    y[m * N + n0 + r] = float_kv(out[m][r] + (bias ? kv_float(bias[n0 + r]) : 0.f));
        } else {
            for (int64_t n = n0; n < N; n++) {
                block(M, 1, w + n * K, K, xs, KP, out);
                for (int m = 0; m < M; m++) y[m * N + n] = float_kv(out[m][0] + (bias ? kv_float(bias[n]) : 0.f));
            }
        }
    }
}

/* y (M, N) = x (M, K) w (N, K)^T + bias (N) or no bias (NULL); x rows at + m * x_m, w and y contiguous;
   1 <= M <= 4. Returns 0, or 1 when the scratch could not be allocated. */
int gemv(int64_t M, int64_t N, int64_t K, const kv_t *x, int64_t x_m, const kv_t *w, const kv_t *bias, kv_t *y,
         int nthreads) {
    /* the activation rows converted once, padded with zeros to KP (whole vectors) */
    const int64_t KP = (K + XPAD - 1) / XPAD * XPAD;
    xs_t *xs = malloc(sizeof(xs_t) * M * KP);
    if (!xs) return 1;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) {
#if DOT_BF16
            xs[m * KP + k] = x[m * x_m + k];
#else
            xs[m * KP + k] = kv_float(x[m * x_m + k]);
#endif
        }
        for (int64_t k = K; k < KP; k++) xs[m * KP + k] = 0;
    }
    const int64_t blocks = (N + RB - 1) / RB;
    /* a thread per 64K weights at least */
    int64_t nt = N * K / 65536;
    nt = nt < 1 ? 1 : (nt > nthreads ? nthreads : nt);
    if (nt > blocks) nt = blocks;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = 0, T = 1;
#if defined(_OPENMP)
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        const int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
        /* M a constant in each call, so that the accumulators unroll into registers */
        switch (M) {
            case 1: rows(1, w, bias, N, K, xs, KP, y, b0, b1); break;
            case 2: rows(2, w, bias, N, K, xs, KP, y, b0, b1); break;
            case 3: rows(3, w, bias, N, K, xs, KP, y, b0, b1); break;
            default: rows(4, w, bias, N, K, xs, KP, y, b0, b1); break;
        }
    }
    free(xs);
    return 0;
}
"""

_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_int]

#: (dtype, portable) -> the loaded library, or why there is none
_LIBS: dict[tuple, ctypes.CDLL | str] = {}


def library(dtype: torch.dtype, portable: bool = False) -> ctypes.CDLL | str:
    """The compiled kernel for ``dtype`` (``portable``: without the bf16 dot instruction), or a string saying why
    there is none (remembered)."""
    key = (dtype, bool(portable))
    if key not in _LIBS:
        from longkit.kvcache.kivi_native import load_kernel

        defines = {"KV_KIND": _KINDS[dtype], "PORTABLE": int(portable)}
        _LIBS[key] = load_kernel(SOURCE, defines, "gemv", {"gemv": (_ARGS, ctypes.c_int)}, vec16=True)
    return _LIBS[key]


def available(x: torch.Tensor, weight: torch.Tensor) -> bool | str:
    """True if :func:`gemv` can run ``x`` (..., d_in) through ``weight`` (d_out, d_in); otherwise why not."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return "tensors not on the CPU"
    if x.dtype not in _KINDS or weight.dtype != x.dtype:
        return f"activation dtype {x.dtype}, weight dtype {weight.dtype} (float32 or bfloat16, the same)"
    lib = library(x.dtype)
    return True if isinstance(lib, ctypes.CDLL) else lib


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, portable: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 1 to :data:`MAX_ROWS` activation rows, natively.

    x (..., d_in) with at most 4 rows in all (the leading dimensions' product, >= 1), weight (d_out, d_in), bias
    (d_out,) or None, all float32 or all bfloat16 on the CPU; returns (..., d_out) in x's dtype. Check
    :func:`available` first (this raises a MethodError otherwise). ``portable`` runs the vector-extension path even
    where the CPU has AVX512-BF16 (what a CPU without it computes; for tests).
    """
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise MethodError(
            f"gemv: parameter 'weight' must be (d_out, d_in) with d_in = x's last dimension (got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)})"
        )
    N, K = weight.shape
    M = x.numel() // K if K else 0
    if not 1 <= M <= MAX_ROWS or K < 1 or N < 1:
        raise MethodError(
            f"gemv: parameter 'x' must hold 1 to {MAX_ROWS} rows of d_in >= 1 (got {M} rows of {K}, d_out {N})"
        )
    if bias is not None and (bias.shape != (N,) or bias.dtype != weight.dtype):
        raise MethodError(
            f"gemv: parameter 'bias' must be ({N},) of {weight.dtype} (got {bias.dtype} {tuple(bias.shape)})"
        )
    ok = available(x, weight)
    if ok is not True:
        raise MethodError(f"gemv: the native kernel is not available: {ok}")
    lib = library(x.dtype, portable)
    if not isinstance(lib, ctypes.CDLL):
        raise MethodError(f"gemv: the portable kernel is not available: {lib}")
    # (M, K) rows with unit stride along K
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    failed = lib.gemv(
        M, N, K, x2.data_ptr(), x2.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"gemv: no memory for {M} x {K} activations")
    return y
