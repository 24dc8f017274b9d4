"""KIVI read quantised, natively: the decode step's attention over packed 2-/4-bit codes in one pass of C loops.

Eager PyTorch cannot unpack a 2-bit code without writing it out as a full-size tensor first, so the tiled path of
:func:`longkit.kvcache.kivi_attention.kivi_decode` spends its time unpacking and converting codes (SmolLM2-135M bf16 at
8K: KIVI 2-bit 1.8x *slower* than the full cache, issue 24). Here a small C kernel reads the packed bytes and does the
arithmetic in registers, so the only full-size work left is reading the codes (about a quarter of the full cache's
bytes at 2 bits, plus scales):

- scores, per key group ``g`` (``G`` tokens sharing a per-channel scale ``s_g`` and zero ``z_g``):
  ``q . k_t = sum_d (q_d s_g[d]) c[t, d] + sum_d q_d z_g[d]``: the scale is folded into the query once per group,
  the zero term is one number per group and query row, and each token costs one multiply-add per channel on its
  codes, unpacked in vector registers (the ``8 / bits`` codes of a byte are ``8 / bits`` vector planes);
- softmax over the quantised scores and the exact residual's, float32, in PyTorch (the mask applied there);
- values: ``sum_t p_t (c_t * s_t + z_t)`` accumulated per query row in registers over a chunk of tokens (chunks run
  on OpenMP threads, their partial sums added afterwards), the per-token scales broadcast over their channel groups.

Kernel ``blocked`` (the default; ``v1`` keeps the loops above for A/B measurements), on CPUs with AVX-512 and group
sizes that are multiples of 16 (SmolLM2-135M's shape, 30 layers' packed K/V from memory, shared CPU, by CPU time:
2 bits 0.64-0.71x the dense bf16 kernel's ``blocked`` at 8K-32K where ``v1`` took 1.02-1.20x; 4 bits 0.83-0.84x
where ``v1`` took 1.42-1.72x; still compute-bound, 2.4-2.7x a plain read of the packed bytes on one thread; see
benchmarks/decode/results/kivi_kernel.notes.md):

- 16 tokens a block, the blocks two ahead prefetched (codes, scales, zeros);
- a code is never shifted down: ``dword & (mask << bits m)`` converted to float is the code times ``2^(bits m)``,
  exact, the power of two folded into the query (keys) or applied to the sums at the end (values);
- key scores with the 16 tokens of a block in a register's lanes (no lane sums per token); values with the weights
  times the tokens' value scales formed per block and the codes centred (``(c - c0) s + (z + c0 s)``, as accurate as
  summing dequantised values), the sums in registers;
- for 2-bit codes where the CPU has the tile unit (AMX-BF16; ``blocked-vec`` leaves it out) the multiply-adds of the
  key scores (head dims that are multiples of 32 up to 128, up to 5 query heads per kv head; and of the values for
  head dims up to 64, group size 32 or 64) are tile products: the float32 factors (query times key scale; weight
  times value scale) are split exactly into three bfloat16 terms, the codes are exact in bfloat16, so the products
  are exact and the sums float32, as on the vector units (4-bit codes measured faster on the vector units);
- the exact residual with the query and the sums in registers.

Ragged storage (KIVI under an eviction method, :class:`~longkit.kvcache.kivi.KIVIRaggedLayer`: every head's own
number of rows, all heads' rows packed one after another) is read by a second entry, ``kivi_attend_rows``, the same
per-head work from per-head row offsets and counts: nothing is gathered or padded per step.

The kernel is C with GCC's vector extensions (one source for AVX-512, AVX2, NEON...), compiled on first use with
``-O3 -march=native -fopenmp`` for the shape at hand (head dim, bits, group size, query heads per kv head, scale
dtype) into ``$LONGKIT_CACHE/kernels/`` (default ``~/.cache/longkit``) and loaded through ctypes; its OpenMP calls use
the OpenMP runtime torch already loaded (same soname), with torch's thread count. If there is no C compiler (``$CC``,
else ``cc``/``gcc``), the compile fails, the tensors are not on the CPU, or the shape is outside what the kernel takes
(``group_size`` a multiple of the codes per byte, ``head_dim * bits / 8`` a multiple of 4 bytes), :func:`available`
says why and KIVI keeps the tiled PyTorch path. ``LONGKIT_KIVI_NATIVE=0`` turns the kernel off.

Outputs equal :func:`longkit.kvcache.naive.kivi_decode_reference` up to float rounding (the summation order differs;
the reference also rounds dequantised keys and values to the model's dtype, which this path, like the tiled one, does
not): fp32 within 1e-5.

Based on KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al. 2024),
https://arxiv.org/abs/2402.02750 (its CUDA kernels fuse dequantisation into the matrix products the same way).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from longkit.errors import MethodError
from longkit.kvcache.decode import cpu_capability, pack_mask, pack_query
from longkit.kvcache.naive import bool_mask

if TYPE_CHECKING:
    from longkit.kvcache.kivi import KIVILayer

#: the environment variable that turns the native kernel off (``0``)
ENV = "LONGKIT_KIVI_NATIVE"

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* compiled per shape: HD head dim, BITS code width, GS group size, GQ query heads per kv head, SCALE_T the scales'
   and zeros' storage type (SCALE_IS_HALF: _Float16), KV_KIND the residual's dtype (0 float32, 1 bfloat16, 2 float16) */
#define PER (8 / BITS)
#define MB (HD * BITS / 8)
#define NGV (HD / GS)
#define CMASK ((1 << BITS) - 1)
/* float lanes per vector: one register of the target, or fewer when a row of codes is shorter */
#if defined(__AVX512F__) && MB % 16 == 0
#define VL 16
#elif (defined(__AVX2__) || defined(__AVX512F__)) && MB % 8 == 0
#define VL 8
#else
#define VL 4
#endif
#define NV (MB / VL)

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

/* kv_t, kv_float, float_kv: c_prelude(), compiled before this source */

/* VL bytes -> VL int32 lanes; dword j of VL rows MB bytes apart; the sum of a vector's lanes (intrinsics where
   GCC's generic code for them is scalar) */
#if VL == 16
static inline vi load_bytes(const uint8_t *p) { return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi gather_rows(const uint8_t *p) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(MB));
    return (vi)_mm512_i32gather_epi32(idx, (const void *)p, 1);
}
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif VL == 8 && defined(__AVX2__)
static inline vi load_bytes(const uint8_t *p) { return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi gather_rows(const uint8_t *p) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(MB));
    return (vi)_mm256_i32gather_epi32((const int *)p, idx, 1);
}
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
static inline vi load_bytes(const uint8_t *p) {
    vi x;
    for (int l = 0; l < VL; l++) x[l] = p[l];
    return x;
}
static inline vi gather_rows(const uint8_t *p) {
    vi x;
    for (int l = 0; l < VL; l++) memcpy(&x[l], p + l * MB, 4);
    return x;
}
static inline float hsum(vf v) {
    float s = 0.f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}
#endif

static inline vf plane(vi x, int k) { return __builtin_convertvector((x >> (BITS * k)) & CMASK, vf); }

/* exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp), 0 below -87 */
static inline vf vexp(vf x) {
    const vi tiny = x < -87.0f;
    x = (vf)((vi)x & ~tiny) + (vf)((vi)((vf){0} - 87.0f) & tiny);
    const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);
    const vf fn = __builtin_convertvector(n, vf);
    vf r = x - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    vf y = (vf){0} + 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    return (vf)(((vi)y + (n << 23)) & ~tiny);
}

/* The query in the codes' plane layout: qp[i][k][v][l] is channel (v*VL + l)*PER + k (byte v*VL + l, code k) */
static inline void query_planes(const float *qh, vf qp[GQ][PER][NV]) {
    for (int i = 0; i < GQ; i++)
        for (int k = 0; k < PER; k++)
            for (int v = 0; v < NV; v++)
                for (int l = 0; l < VL; l++) qp[i][k][v][l] = qh[i * HD + (v * VL + l) * PER + k];
}

/* The group's key scale folded into the query planes (qs), and the zero's term of each query row (qz) */
static inline void fold_group(const float *qh, vf qp[GQ][PER][NV], const SCALE_T *sc, const SCALE_T *ze,
                              vf qs[GQ][PER][NV], float *qz) {
    float scf[HD], zef[HD], planes[HD];
#if VL == 16
    /* 16 scales at a time converted, then de-interleaved into the code planes by lane permutations */
    __m512 src[HD / 16];
    for (int u = 0; u < HD / 16; u++) {
#if SCALE_IS_HALF
        src[u] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16 * u)));
        _mm512_storeu_ps(zef + 16 * u, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ze + 16 * u))));
#else
        src[u] = _mm512_loadu_ps(sc + 16 * u);
        _mm512_storeu_ps(zef + 16 * u, _mm512_loadu_ps(ze + 16 * u));
#endif
    }
    for (int k = 0; k < PER; k++)
        for (int v = 0; v < NV; v++) {
            /* lane l of plane k, vector v: channel (16 v + l) PER + k */
            __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                                13, 14, 15), _mm512_set1_epi32(PER)),
                                           _mm512_set1_epi32(k));
            __m512 r;
#if PER == 2
            r = _mm512_permutex2var_ps(src[2 * v], idx, src[2 * v + 1]);
#else
            r = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(src[4 * v], idx, src[4 * v + 1]),
                                     _mm512_permutex2var_ps(src[4 * v + 2], idx, src[4 * v + 3]), 0x44);
#endif
            _mm512_storeu_ps(planes + k * MB + 16 * v, r);
        }
    (void)scf;
#else
    for (int d = 0; d < HD; d++) {
        scf[d] = (float)sc[d];
        zef[d] = (float)ze[d];
    }
    for (int k = 0; k < PER; k++)
        for (int j = 0; j < MB; j++) planes[k * MB + j] = scf[j * PER + k];
#endif
    for (int i = 0; i < GQ; i++) {
        vf z = (vf){0};
        for (int d = 0; d < HD; d += VL) {
            vf a, b;
            memcpy(&a, qh + i * HD + d, sizeof(vf));
            memcpy(&b, zef + d, sizeof(vf));
            z += a * b;
        }
        qz[i] = hsum(z);
        for (int k = 0; k < PER; k++)
            for (int v = 0; v < NV; v++) {
                vf sp;
                memcpy(&sp, planes + k * MB + v * VL, sizeof(vf));
                qs[i][k][v] = qp[i][k][v] * sp;
            }
    }
}

/* acc[i] = the per-lane partial products of query row i and token t's key codes (their lanes sum to the score) */
static inline void token_partials(const uint8_t *row, vf qs[GQ][PER][NV], vf *acc) {
    for (int i = 0; i < GQ; i++) acc[i] = (vf){0};
    for (int v = 0; v < NV; v++) {
        const vi x = load_bytes(row + v * VL);
        for (int k = 0; k < PER; k++) {
            const vf c = plane(x, k);
            for (int i = 0; i < GQ; i++) acc[i] += qs[i][k][v] * c;
        }
    }
}

#if VL == 16
/* Lane sums of 16 tokens' partials at once, by halving: two tokens' 16 lanes -> 8 each in one vector, two of those
   -> 4 each, then 2, then 1 (3 operations per halving instead of a full reduction per token) */
static inline __m512 comb1(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
static inline __m512 comb2(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
static inline __m512 comb3(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
}
static inline __m512 comb4(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}
#endif

/* Scores of the quantised tokens [t0, t1) (whole key groups) of one kv head: s[i * s_row + t]. */
static void key_scores(const float *qh, const uint8_t *codes, const SCALE_T *scale, const SCALE_T *zero, int64_t t0,
                       int64_t t1, float *s, int64_t s_row) {
    vf qp[GQ][PER][NV], qs[GQ][PER][NV];
    float qz[GQ];
    query_planes(qh, qp);
    int64_t t = t0;
#if VL == 16 && GS % 16 == 0
    /* 16 tokens of one group at a time; after comb4 lane 4k + x holds token 4x + k */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; t + 16 <= t1; t += 16) {
        if (t % GS == 0) fold_group(qh, qp, scale + (t / GS) * HD, zero + (t / GS) * HD, qs, qz);
        __m512 l3[2][GQ];
        for (int a = 0; a < 2; a++) {
            __m512 l2[2][GQ];
            for (int b = 0; b < 2; b++) {
                __m512 l1[2][GQ];
                for (int c = 0; c < 2; c++) {
                    vf x[GQ], y[GQ];
                    const int64_t u = t + 8 * a + 4 * b + 2 * c;
                    token_partials(codes + u * MB, qs, x);
                    token_partials(codes + (u + 1) * MB, qs, y);
                    for (int i = 0; i < GQ; i++) l1[c][i] = comb1((__m512)x[i], (__m512)y[i]);
                }
                for (int i = 0; i < GQ; i++) l2[b][i] = comb2(l1[0][i], l1[1][i]);
            }
            for (int i = 0; i < GQ; i++) l3[a][i] = comb3(l2[0][i], l2[1][i]);
        }
        for (int i = 0; i < GQ; i++) {
            const __m512 r = _mm512_permutexvar_ps(order, comb4(l3[0][i], l3[1][i]));
            _mm512_storeu_ps(s + i * s_row + t, _mm512_add_ps(r, _mm512_set1_ps(qz[i])));
        }
    }
#endif
    for (; t < t1; t++) {
        if (t % GS == 0 || t == t0) fold_group(qh, qp, scale + (t / GS) * HD, zero + (t / GS) * HD, qs, qz);
        vf acc[GQ];
        token_partials(codes + t * MB, qs, acc);
        for (int i = 0; i < GQ; i++) s[i * s_row + t] = qz[i] + hsum(acc[i]);
    }
}

/* sum_t p[i, t] v_t over the quantised tokens [t0, t1) of one kv head, into o (GQ, HD) */
static void weighted_values(const float *p, int64_t p_row, const uint8_t *codes, const SCALE_T *scale,
                            const SCALE_T *zero, int64_t t0, int64_t t1, float *o) {
    vf acc[GQ][PER][NV];
    for (int i = 0; i < GQ; i++)
        for (int k = 0; k < PER; k++)
            for (int v = 0; v < NV; v++) acc[i][k][v] = (vf){0};
    for (int64_t t = t0; t < t1; t++) {
        const SCALE_T *sv = scale + t * NGV, *zv = zero + t * NGV;
        float pt[GQ];
        for (int i = 0; i < GQ; i++) pt[i] = p[i * p_row + t];
        for (int v = 0; v < NV; v++) {
            /* byte v*VL + l holds channels of the one value group ((v*VL + l)*PER) / GS (GS % PER == 0) */
            const int first = (v * VL * PER) / GS, last = ((v * VL + VL - 1) * PER) / GS;
            vf s = (vf){0} + (float)sv[first], z = (vf){0} + (float)zv[first];
            for (int gg = first + 1; gg <= last; gg++) {
                vi in;
                for (int l = 0; l < VL; l++) in[l] = -(((v * VL + l) * PER) / GS >= gg);
                const vi sn = (vi)((vf){0} + (float)sv[gg]), zn = (vi)((vf){0} + (float)zv[gg]);
                s = (vf)(((vi)s & ~in) | (sn & in));
                z = (vf)(((vi)z & ~in) | (zn & in));
            }
            const vi x = load_bytes(codes + t * MB + v * VL);
            for (int k = 0; k < PER; k++) {
                const vf val = plane(x, k) * s + z;
                for (int i = 0; i < GQ; i++) acc[i][k][v] += pt[i] * val;
            }
        }
    }
    for (int i = 0; i < GQ; i++)
        for (int k = 0; k < PER; k++)
            for (int v = 0; v < NV; v++)
                for (int l = 0; l < VL; l++) o[i * HD + (v * VL + l) * PER + k] = acc[i][k][v][l];
}

/* ---- kernel "blocked": AVX-512 registers (VL 16) and key groups of whole 16-token blocks ----------------------- */
#if VL == 16 && GS % 16 == 0
#define BLK 1
#define CPD (32 / BITS) /* codes per dword */
#define ND (MB / 4)     /* dwords per row of codes */
#define NVV (HD / 16)   /* 16-channel vectors per row of values */
#define DPV (16 / CPD)  /* dwords per 16-channel vector */
/* independent accumulators per query row for the scores: enough FMA chains in flight for few query rows */
#define NA (GQ >= 3 ? 2 : 4)
/* prefetch distance in 16-token blocks (two ahead, as the dense kernel's) */
#define PFB 2

/* A code is read without shifting: (dword & (CMASK << BITS m)) converted to float is the code times 2^(BITS m), exact
   (two or four significant bits), so the factor 2^-(BITS m) is folded into the query (keys) or applied to the sums at
   the end (values), both exact powers of two. */
static inline float slot_scale(int m) { return 1.0f / (float)(1u << (BITS * m)); }

/* 16 scales or zeros from p as float32 lanes */
static inline __m512 load_scale16(const SCALE_T *p) {
#if SCALE_IS_HALF
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return _mm512_loadu_ps(p);
#endif
}

static inline void prefetch_lines(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 0);
}

/* Scores of the quantised tokens [t0, t1) (whole key groups) of one kv head, 16 tokens in the lanes of a register:
   dword j of 16 rows gathered once, each of its CPD codes masked and converted, then one multiply-add per query row
   with the (scale-folded) query channel broadcast: no lane sums per token. s[i * s_row + t]. */
static void key_scores_blk(const float *qh, const uint8_t *codes, const SCALE_T *scale, const SCALE_T *zero,
                           int64_t t0, int64_t t1, float *s, int64_t s_row) {
    /* qi: the query times 2^-(BITS (d % CPD)); qs: qi times the group's scale (the same float as (q s) 2^-k) */
    float qi[GQ][HD] __attribute__((aligned(64))), qs[GQ][HD] __attribute__((aligned(64)));
    float qz[GQ];
    for (int i = 0; i < GQ; i++)
        for (int d = 0; d < HD; d++) qi[i][d] = qh[i * HD + d] * slot_scale(d % CPD);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(MB));
    for (int64_t g0 = t0; g0 < t1; g0 += GS) {
        const SCALE_T *sc = scale + (g0 / GS) * HD, *ze = zero + (g0 / GS) * HD;
        __m512 z[GQ];
        for (int i = 0; i < GQ; i++) z[i] = _mm512_setzero_ps();
        for (int d = 0; d < HD; d += 16) {
            const __m512 sv = load_scale16(sc + d), zv = load_scale16(ze + d);
            for (int i = 0; i < GQ; i++) {
                _mm512_store_ps(&qs[i][d], _mm512_mul_ps(_mm512_load_ps(&qi[i][d]), sv));
                z[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i * HD + d), zv, z[i]);
            }
        }
        for (int i = 0; i < GQ; i++) qz[i] = _mm512_reduce_add_ps(z[i]);
        for (int64_t t = g0; t < g0 + GS; t += 16) {
            const uint8_t *blk = codes + t * MB;
            if (t + PFB * 16 < t1) prefetch_lines(blk + PFB * 16 * MB, 16 * MB);
            __m512 acc[GQ][NA];
            for (int i = 0; i < GQ; i++)
                for (int a = 0; a < NA; a++) acc[i][a] = _mm512_setzero_ps();
            /* unrolled: the accumulators and the masks are registers, not stack slots indexed at run time */
#pragma GCC unroll 16
            for (int j = 0; j < ND; j++) {
                /* (16,) dword j of each of the 16 rows */
                const __m512i x = _mm512_i32gather_epi32(idx, (const void *)(blk + 4 * j), 1);
#pragma GCC unroll 16
                for (int m = 0; m < CPD; m++) {
                    const __m512 c = _mm512_cvtepu32_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)((uint32_t)CMASK << (BITS * m)))));
#pragma GCC unroll 16
                    for (int i = 0; i < GQ; i++)
                        acc[i][m % NA] = _mm512_fmadd_ps(_mm512_set1_ps(qs[i][j * CPD + m]), c, acc[i][m % NA]);
                }
            }
            for (int i = 0; i < GQ; i++) {
                __m512 r = acc[i][0];
                for (int a = 1; a < NA; a++) r = _mm512_add_ps(r, acc[i][a]);
                _mm512_storeu_ps(s + i * s_row + t, _mm512_add_ps(r, _mm512_set1_ps(qz[i])));
            }
        }
    }
}

/* sum_t p[i, t] v_t over the quantised tokens [t0, t1) (a multiple of 16) of one kv head, into o (GQ, HD): channels
   in lanes; per 16 tokens the weights times the tokens' value scales p s (GQ, NGV) are formed in token lanes and the
   zero's term accumulated there; per token and 16 channels one masked broadcast of the codes' dword(s), one
   conversion and centring, one multiply-add per query row with p s broadcast from memory. The codes are centred,
   v = (c - c0) s + (z + c0 s) with c0 = CMASK / 2: split as sum p s c + sum p z the two sums are of the same size and
   opposite signs (z is about -CMASK s / 2), and their difference lost about ten times fp32's precision; centred, each
   part is a sum of terms of both signs, as accurate as summing whole dequantised values. */
static void weighted_values_blk(const float *p, int64_t p_row, const uint8_t *codes, const SCALE_T *scale,
                                const SCALE_T *zero, int64_t t0, int64_t t1, float *o) {
    /* lane l of a 16-channel vector: dword l % DPV of the vector's DPV dwords, code slot m = l / DPV */
    uint32_t maskv[16];
    float fix[16], mid[16];
    int chan[16];
    for (int l = 0; l < 16; l++) {
        const int m = l / DPV;
        maskv[l] = (uint32_t)CMASK << (BITS * m);
        fix[l] = slot_scale(m);
        /* c0 2^(BITS m): the centre of the codes as they are read (exact: a half-integer times a power of two) */
        mid[l] = 0.5f * (float)CMASK / slot_scale(m);
        chan[l] = (l % DPV) * CPD + m;
    }
    const __m512i lmask = _mm512_loadu_si512(maskv);
    const __m512 cmid = _mm512_loadu_ps(mid);
    __m512 acc[GQ][NVV], zacc[GQ][NGV];
    for (int i = 0; i < GQ; i++) {
        for (int u = 0; u < NVV; u++) acc[i][u] = _mm512_setzero_ps();
        for (int g = 0; g < NGV; g++) zacc[i][g] = _mm512_setzero_ps();
    }
    float ps[NGV][GQ][16] __attribute__((aligned(64)));
    float sf[16 * NGV] __attribute__((aligned(64))), zf[16 * NGV] __attribute__((aligned(64)));
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(NGV));
    for (int64_t t = t0; t < t1; t += 16) {
        const uint8_t *blk = codes + t * MB;
        if (t + PFB * 16 < t1) {
            prefetch_lines(blk + PFB * 16 * MB, 16 * MB);
            prefetch_lines(scale + (t + PFB * 16) * NGV, 16 * NGV * sizeof(SCALE_T));
            prefetch_lines(zero + (t + PFB * 16) * NGV, 16 * NGV * sizeof(SCALE_T));
        }
        /* (16, NGV) scales and zeros of the block as float32, then per group a vector over the 16 tokens */
        for (int e = 0; e < 16 * NGV; e += 16) {
            _mm512_store_ps(sf + e, load_scale16(scale + t * NGV + e));
            _mm512_store_ps(zf + e, load_scale16(zero + t * NGV + e));
        }
        for (int g = 0; g < NGV; g++) {
            const __m512 sv = NGV == 1 ? _mm512_load_ps(sf) : _mm512_i32gather_ps(gidx, sf + g, 4);
            __m512 zv = NGV == 1 ? _mm512_load_ps(zf) : _mm512_i32gather_ps(gidx, zf + g, 4);
            /* z + c0 s: the value of the centre code */
            zv = _mm512_fmadd_ps(_mm512_set1_ps(0.5f * (float)CMASK), sv, zv);
            for (int i = 0; i < GQ; i++) {
                const __m512 pv = _mm512_loadu_ps(p + i * p_row + t);
                _mm512_store_ps(ps[g][i], _mm512_mul_ps(pv, sv));
                zacc[i][g] = _mm512_fmadd_ps(pv, zv, zacc[i][g]);
            }
        }
#pragma GCC unroll 2
        for (int k = 0; k < 16; k++) {
            const uint8_t *row = blk + k * MB;
#pragma GCC unroll 16
            for (int u = 0; u < NVV; u++) {
                const int g = (16 * u) / GS;
#if DPV == 1
                uint32_t w;
                memcpy(&w, row + 4 * u, 4);
                const __m512i x = _mm512_set1_epi32((int)w);
#else
                uint64_t w;
                memcpy(&w, row + 8 * u, 8);
                const __m512i x = _mm512_set1_epi64((long long)w);
#endif
                const __m512 c = _mm512_sub_ps(_mm512_cvtepu32_ps(_mm512_and_si512(x, lmask)), cmid);
#pragma GCC unroll 16
                for (int i = 0; i < GQ; i++) acc[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(ps[g][i][k]), c, acc[i][u]);
            }
        }
    }
    const __m512 fv = _mm512_loadu_ps(fix);
    for (int i = 0; i < GQ; i++) {
        float zs[NGV];
        for (int g = 0; g < NGV; g++) zs[g] = _mm512_reduce_add_ps(zacc[i][g]);
        for (int u = 0; u < NVV; u++) {
            float r[16];
            _mm512_storeu_ps(r, _mm512_mul_ps(acc[i][u], fv));
            for (int l = 0; l < 16; l++) {
                const int d = 16 * u + chan[l];
                o[i * HD + d] = r[l] + zs[d / GS];
            }
        }
    }
}
#else
#define BLK 0
#endif

#if BLK && BITS == 2 && defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__) && HD % 32 == 0 && \
    HD <= 128 && 3 * GQ <= 16
#define KAMX 1
#include <sys/syscall.h>
#include <unistd.h>
/* Key scores by the CPU's tile unit (AMX-BF16), where it has one and Linux lends it: the multiply-adds of a block of
   16 tokens are one tile product per 32 channels, and what is left on the vector units is widening the codes to
   bfloat16 (exact numbers) and storing them in the tile's pair layout: one table lookup (vpermd) per 16 tokens and
   channel pair, whose two 2-bit codes are a nibble. 2-bit codes only: for 4-bit codes a pair is a byte, two lookups,
   and the vector path measured faster (benchmarks/decode/kivi_kernel.py).
   The query times the group's key scale is a float32 (24-bit significand); the tile unit multiplies bfloat16 (8
   bits), so each is split exactly into three bfloat16 terms by truncation (hi = the top 8 bits, mid = the next 8 of
   the rest, lo = what is left, at most 8 bits): three rows of the query tile per query row, their three sums added
   in float32 afterwards. The products are exact and the sums float32, as on the vector path, in another order.
   Tiles: 0 .. HD/32 - 1 the split query rows (3 GQ rows, channels 32u .. 32u + 31), 4 a block's codes (16 rows of
   channel pairs, 16 tokens' pairs each), 5 the (3 GQ, 16 tokens) sums. */
struct kivi_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64)));

/* whether this process may use the tile registers (asked once): 1 yes, -1 no, 0 not asked yet */
static int kamx_state = 0;
static int kamx_ok(void) {
    /* arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
    if (kamx_state == 0) kamx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return kamx_state == 1;
}

static void kamx_config(void) {
    struct kivi_tilecfg c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int u = 0; u < HD / 32; u++) {
        c.rows[u] = 3 * GQ;
        c.colsb[u] = 64;
    }
    c.rows[4] = 16;
    c.colsb[4] = 64;
    c.rows[5] = 3 * GQ;
    c.colsb[5] = 64;
    /* GCC's tile intrinsics name no memory they read or write: the barriers order the stores around them */
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&c);
}

/* (tile numbers are literals: GCC's intrinsics paste them into the instruction) */
#define KAMX_FOR_CHUNKS(X) X(0) if (HD >= 64) { X(1) } if (HD >= 96) { X(2) } if (HD >= 128) { X(3) }

/* the top 16 bits of each float32 lane of a (lanes 0-15) then b (16-31): 32 bfloat16 */
static inline __m512i bf16_tops(__m512 a, __m512 b) {
    static const uint16_t odd_words[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                           33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i odd = _mm512_loadu_si512(odd_words);
    return _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd, _mm512_castps_si512(b));
}

/* a block's scores from its three partial sums per query row, plus the zero's term */
static inline void kamx_finish(float c[3 * GQ][16], const float *qz, float *s, int64_t s_row, int64_t t) {
    for (int i = 0; i < GQ; i++) {
        const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(c[3 * i]), _mm512_load_ps(c[3 * i + 1])),
                                       _mm512_load_ps(c[3 * i + 2]));
        _mm512_storeu_ps(s + i * s_row + t, _mm512_add_ps(r, _mm512_set1_ps(qz[i])));
    }
}

static void key_scores_amx(const float *qh, const uint8_t *codes, const SCALE_T *scale, const SCALE_T *zero,
                           int64_t t0, int64_t t1, float *s, int64_t s_row) {
    /* (HD / 32, 3 GQ, 32) the split query rows; (16, 16) a chunk's code pairs; (3 GQ, 16) the sums */
    uint16_t a[HD / 32][3 * GQ][32] __attribute__((aligned(64)));
    uint32_t bt[HD / 32][16][16] __attribute__((aligned(64)));
    /* the sums of two blocks: a block's are read back one block later, when its tile store has landed */
    float c[2][3 * GQ][16] __attribute__((aligned(64)));
    int64_t pending = -1;
    float qz[GQ], qz_prev[GQ];
    /* the bfloat16 pair of a nibble's two codes (low code in the low half) */
    uint32_t lut[16];
    for (int n = 0; n < 16; n++) {
        float lo = (float)(n & 3), hi = (float)(n >> 2);
        uint32_t ul, uh;
        memcpy(&ul, &lo, 4);
        memcpy(&uh, &hi, 4);
        lut[n] = (ul >> 16) | (uh & 0xffff0000u);
    }
    const __m512i lv = _mm512_loadu_si512(lut), top = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(MB));
    kamx_config();
    for (int64_t g0 = t0; g0 < t1; g0 += GS) {
        const SCALE_T *sc = scale + (g0 / GS) * HD, *ze = zero + (g0 / GS) * HD;
        for (int i = 0; i < GQ; i++) {
            __m512 z = _mm512_setzero_ps();
            for (int u = 0; u < HD / 32; u++) {
                __m512 x[2], h[2], m[2], l[2];
                for (int e = 0; e < 2; e++) {
                    const int d = 32 * u + 16 * e;
                    const __m512 qv = _mm512_loadu_ps(qh + i * HD + d);
                    x[e] = _mm512_mul_ps(qv, load_scale16(sc + d));
                    z = _mm512_fmadd_ps(qv, load_scale16(ze + d), z);
                    h[e] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x[e]), top));
                    const __m512 r = _mm512_sub_ps(x[e], h[e]);
                    m[e] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
                    l[e] = _mm512_sub_ps(r, m[e]);
                }
                _mm512_store_si512(a[u][3 * i], bf16_tops(h[0], h[1]));
                _mm512_store_si512(a[u][3 * i + 1], bf16_tops(m[0], m[1]));
                _mm512_store_si512(a[u][3 * i + 2], bf16_tops(l[0], l[1]));
            }
            qz[i] = _mm512_reduce_add_ps(z);
        }
        __asm__ volatile("" ::: "memory");
#define KAMX_LOAD_A(u) _tile_loadd(u, a[u], 64);
        KAMX_FOR_CHUNKS(KAMX_LOAD_A)
        for (int64_t t = g0; t < g0 + GS; t += 16) {
            const uint8_t *blk = codes + t * MB;
            if (t + PFB * 16 < t1) prefetch_lines(blk + PFB * 16 * MB, 16 * MB);
            __m512i x[ND];
            for (int j = 0; j < ND; j++) x[j] = _mm512_i32gather_epi32(idx, (const void *)(blk + 4 * j), 1);
            _tile_zero(5);
#define KAMX_CHUNK(u)                                                                                               \
    {                                                                                                               \
        /* row k: channels 32u + 2k, 32u + 2k + 1 of the 16 tokens */                                               \
        for (int k = 0; k < 16; k++) {                                                                              \
            const int p = 16 * (u) + k; /* the channel pair: nibble p % 8 of dword p / 8 */                         \
            const __m512i w = _mm512_permutexvar_epi32(_mm512_srli_epi32(x[p / 8], 4 * (p % 8)), lv);               \
            _mm512_store_si512(bt[u][k], w);                                                                        \
        }                                                                                                           \
    }
#define KAMX_DOT(u)                                                                                                 \
    _tile_loadd(4, bt[u], 64);                                                                                      \
    _tile_dpbf16ps(5, u, 4);
            /* all chunks' code pairs stored before the first tile load reads them */
            KAMX_FOR_CHUNKS(KAMX_CHUNK)
            __asm__ volatile("" ::: "memory");
            KAMX_FOR_CHUNKS(KAMX_DOT)
            _tile_stored(5, c[(t / 16) & 1], 64);
            __asm__ volatile("" ::: "memory");
            if (pending >= 0) kamx_finish(c[(pending / 16) & 1], qz_prev, s, s_row, pending);
            pending = t;
            memcpy(qz_prev, qz, sizeof(qz));
        }
    }
    __asm__ volatile("" ::: "memory");
    if (pending >= 0) kamx_finish(c[(pending / 16) & 1], qz_prev, s, s_row, pending);
}
#else
#define KAMX 0
#endif

#if KAMX && HD <= 64 && (GS == 32 || GS == 64)
#define VAMX 1
/* Weighted values by the tile unit (AMX-BF16): per 32 tokens and 16 channels one tile product of the weights times
   the tokens' value scales (query rows x tokens) with the centred codes (tokens x channels), the (GQ x HD) sums
   staying in tile registers for the whole piece. As for the keys, each float32 weight p s is split exactly into three
   bfloat16 terms (three tile rows per query row); the centred codes c - c0 (half-integers) are exact in bfloat16, so
   the products are exact and the sums float32. The centre's term sum_t p (z + c0 s) is summed on the vector units.
   A code row is built per token pair and 16 channels: both tokens' codes of a channel made a nibble (shift, rotate,
   bit select) and mapped to the bfloat16 pair by one table lookup.
   Tiles: 0 .. NVV - 1 the sums of channels 16u .. 16u + 15 (3 GQ rows), 4 .. 4 + NGV - 1 the split weights of value
   group g (3 GQ rows, 32 tokens), 7 a chunk's codes (16 token pairs, 16 channels' pairs). */
static void vamx_config(void) {
    struct kivi_tilecfg c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int u = 0; u < NVV; u++) {
        c.rows[u] = 3 * GQ;
        c.colsb[u] = 64;
    }
    for (int g = 0; g < NGV; g++) {
        c.rows[4 + g] = 3 * GQ;
        c.colsb[4 + g] = 64;
    }
    c.rows[7] = 16;
    c.colsb[7] = 64;
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&c);
}

/* (tile numbers are literals) X(u, the tile of u's value group) for each 16-channel chunk u; X(g, tile) per group */
#if GS == 32
#define VAMX_FOR_U(X) X(0, 4) if (NVV >= 2) { X(1, 4) } if (NVV >= 3) { X(2, 5) } if (NVV >= 4) { X(3, 5) }
#else
#define VAMX_FOR_U(X) X(0, 4) if (NVV >= 2) { X(1, 4) } if (NVV >= 3) { X(2, 4) } if (NVV >= 4) { X(3, 4) }
#endif
#define VAMX_FOR_G(X) X(0, 4) if (NGV >= 2) { X(1, 5) }

static void weighted_values_amx(const float *p, int64_t p_row, const uint8_t *codes, const SCALE_T *scale,
                                const SCALE_T *zero, int64_t t0, int64_t t1, float *o) {
    /* 2-bit codes: a 16-channel chunk is one dword of a row, lane l channel l at bits 2l */
    uint32_t shv[16], lut[16];
    const float c0 = 0.5f * (float)CMASK;
    for (int l = 0; l < 16; l++) shv[l] = BITS * l;
    /* the bfloat16 pair (c_a - c0, c_b - c0) of a nibble holding token a's code in bits 0-1 and token b's in 2-3 */
    for (int n = 0; n < 16; n++) {
        const float a = (float)(n & 3) - c0, b = (float)(n >> 2) - c0;
        uint32_t ua, ub;
        memcpy(&ua, &a, 4);
        memcpy(&ub, &b, 4);
        lut[n] = (ua >> 16) | (ub & 0xffff0000u);
    }
    const __m512i sh = _mm512_loadu_si512(shv), llo = _mm512_loadu_si512(lut);
    /* the second token's code rotated to bits 2-3 */
    const __m512i rot = _mm512_and_si512(_mm512_sub_epi32(sh, _mm512_set1_epi32(2)), _mm512_set1_epi32(31));
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(NGV));
    uint16_t a[NGV][3 * GQ][32] __attribute__((aligned(64)));
    uint32_t bt[NVV][16][16] __attribute__((aligned(64)));
    float cs[NVV][3 * GQ][16] __attribute__((aligned(64)));
    float sf[32 * NGV] __attribute__((aligned(64))), zf[32 * NGV] __attribute__((aligned(64)));
    __m512 zacc[GQ][NGV];
    for (int i = 0; i < GQ; i++)
        for (int g = 0; g < NGV; g++) zacc[i][g] = _mm512_setzero_ps();
    vamx_config();
#define VAMX_ZERO(u, g) _tile_zero(u);
    VAMX_FOR_U(VAMX_ZERO)
    for (int64_t t = t0; t < t1; t += 32) {
        const uint8_t *blk = codes + t * MB;
        if (t + 64 < t1) {
            prefetch_lines(blk + 64 * MB, 32 * MB);
            prefetch_lines(scale + (t + 64) * NGV, 32 * NGV * sizeof(SCALE_T));
            prefetch_lines(zero + (t + 64) * NGV, 32 * NGV * sizeof(SCALE_T));
        }
        /* (32, NGV) scales and zeros as float32 */
        for (int e = 0; e < 32 * NGV; e += 16) {
            _mm512_store_ps(sf + e, load_scale16(scale + t * NGV + e));
            _mm512_store_ps(zf + e, load_scale16(zero + t * NGV + e));
        }
        for (int g = 0; g < NGV; g++)
            for (int i = 0; i < GQ; i++) {
                __m512 h[2], m[2], l[2];
                for (int e = 0; e < 2; e++) {
                    const __m512 sv = _mm512_i32gather_ps(gidx, sf + 16 * NGV * e + g, 4);
                    const __m512 zv = _mm512_fmadd_ps(_mm512_set1_ps(c0), sv,
                                                      _mm512_i32gather_ps(gidx, zf + 16 * NGV * e + g, 4));
                    const __m512 pv = _mm512_loadu_ps(p + i * p_row + t + 16 * e);
                    zacc[i][g] = _mm512_fmadd_ps(pv, zv, zacc[i][g]);
                    const __m512 x = _mm512_mul_ps(pv, sv);
                    h[e] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
                    const __m512 r = _mm512_sub_ps(x, h[e]);
                    m[e] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
                    l[e] = _mm512_sub_ps(r, m[e]);
                }
                _mm512_store_si512(a[g][3 * i], bf16_tops(h[0], h[1]));
                _mm512_store_si512(a[g][3 * i + 1], bf16_tops(m[0], m[1]));
                _mm512_store_si512(a[g][3 * i + 2], bf16_tops(l[0], l[1]));
            }
        /* B rows: token pair (2r, 2r + 1), lane l: channel 16u + l */
        for (int u = 0; u < NVV; u++)
            for (int r = 0; r < 16; r++) {
                const uint8_t *ra = blk + (2 * r) * MB, *rb = ra + MB;
                uint32_t wa, wb;
                memcpy(&wa, ra + 4 * u, 4);
                memcpy(&wb, rb + 4 * u, 4);
                const __m512i xa = _mm512_srlv_epi32(_mm512_set1_epi32((int)wa), sh);
                const __m512i xb = _mm512_rorv_epi32(_mm512_set1_epi32((int)wb), rot);
                /* bits 0-1 from xa, 2-3 from xb: the nibble the table maps to the pair */
                const __m512i w =
                    _mm512_permutexvar_epi32(_mm512_ternarylogic_epi32(_mm512_set1_epi32(3), xa, xb, 0xCA), llo);
                _mm512_store_si512(bt[u][r], w);
            }
        __asm__ volatile("" ::: "memory");
#define VAMX_LOAD_A(g, tile) _tile_loadd(tile, a[g], 64);
        VAMX_FOR_G(VAMX_LOAD_A)
#define VAMX_DOT(u, tile)                                                                                           \
    _tile_loadd(7, bt[u], 64);                                                                                      \
    _tile_dpbf16ps(u, tile, 7);
        VAMX_FOR_U(VAMX_DOT)
    }
#define VAMX_STORE(u, g) _tile_stored(u, cs[u], 64);
    VAMX_FOR_U(VAMX_STORE)
    __asm__ volatile("" ::: "memory");
    for (int i = 0; i < GQ; i++) {
        float zs[NGV];
        for (int g = 0; g < NGV; g++) zs[g] = _mm512_reduce_add_ps(zacc[i][g]);
        for (int u = 0; u < NVV; u++) {
            const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(cs[u][3 * i]), _mm512_load_ps(cs[u][3 * i + 1])),
                                           _mm512_load_ps(cs[u][3 * i + 2]));
            _mm512_storeu_ps(o + i * HD + 16 * u, _mm512_add_ps(r, _mm512_set1_ps(zs[(16 * u) / GS])));
        }
    }
}
#else
#define VAMX 0
#endif

/* Masked softmax numerators of s[i * s_row + t], t in [t0, t1), in place: exp(s - m_i) with m_i the piece's max
   (masked: p = 0); stats[2 i] = m_i, stats[2 i + 1] = sum of the numerators */
static void piece_softmax(float *s, int64_t s_row, const uint8_t *mask, int64_t t0, int64_t t1, float *stats) {
    for (int i = 0; i < GQ; i++) {
        float *r = s + i * s_row;
        if (mask)
            for (int64_t t = t0; t < t1; t++) r[t] = mask[i * s_row + t] ? r[t] : -INFINITY;
        vf mv = (vf){0} - INFINITY;
        int64_t t = t0;
        for (; t + VL <= t1; t += VL) {
            vf x;
            memcpy(&x, r + t, sizeof(vf));
            const vi gt = x > mv;
            mv = (vf)(((vi)x & gt) | ((vi)mv & ~gt));
        }
        float m = -INFINITY;
        for (int l = 0; l < VL; l++) m = mv[l] > m ? mv[l] : m;
        for (; t < t1; t++) m = r[t] > m ? r[t] : m;
        float l = 0.f;
        if (m == -INFINITY) {
            for (t = t0; t < t1; t++) r[t] = 0.f;
        } else {
            /* a masked score (-inf) gives exactly 0 */
            vf lv = (vf){0};
            for (t = t0; t + VL <= t1; t += VL) {
                vf x;
                memcpy(&x, r + t, sizeof(vf));
                x = vexp(x - m);
                memcpy(r + t, &x, sizeof(vf));
                lv += x;
            }
            l = hsum(lv);
            for (; t < t1; t++) {
                r[t] = expf(r[t] - m);
                l += r[t];
            }
        }
        stats[2 * i] = m;
        stats[2 * i + 1] = l;
    }
}

#if BLK
/* 16 elements of a residual row as float32 lanes */
static inline __m512 load_kv16(const kv_t *p) {
#if KV_KIND == 0
    return _mm512_loadu_ps(p);
#elif KV_KIND == 1
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
#else
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#endif
}

/* The exact residual's piece (R tokens, scores at s[i * s_row + t], mask mk alike from the residual's first column)
   with the query rows and the value sums in registers: one conversion per element, the scores of 16 tokens summed
   across lanes at once (the v1 loops went through a float row buffer and one lane sum per token and query row). */
static void residual_blk(const float *qh, int64_t R, const kv_t *kh, const kv_t *vh, float *s, int64_t s_row,
                         const uint8_t *mk, float *o, float *st) {
    __m512 qv[GQ][HD / 16], acc[GQ][HD / 16];
    for (int i = 0; i < GQ; i++)
        for (int u = 0; u < HD / 16; u++) {
            qv[i][u] = _mm512_loadu_ps(qh + i * HD + 16 * u);
            acc[i][u] = _mm512_setzero_ps();
        }
    int64_t t = 0;
    for (; t + 16 <= R; t += 16) {
        __m512 part[GQ][16];
        for (int j = 0; j < 16; j++) {
            __m512 row[HD / 16];
            for (int u = 0; u < HD / 16; u++) row[u] = load_kv16(kh + (t + j) * HD + 16 * u);
            for (int i = 0; i < GQ; i++) {
                __m512 a = _mm512_mul_ps(qv[i][0], row[0]);
                for (int u = 1; u < HD / 16; u++) a = _mm512_fmadd_ps(qv[i][u], row[u], a);
                part[i][j] = a;
            }
        }
        /* lane sums of 16 tokens' partials by halving (comb1..4), then lane 4k + x holds token 4x + k */
        const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (int i = 0; i < GQ; i++) {
            __m512 l1[8], l2[4], l3[2];
            for (int c = 0; c < 8; c++) l1[c] = comb1(part[i][2 * c], part[i][2 * c + 1]);
            for (int c = 0; c < 4; c++) l2[c] = comb2(l1[2 * c], l1[2 * c + 1]);
            for (int c = 0; c < 2; c++) l3[c] = comb3(l2[2 * c], l2[2 * c + 1]);
            _mm512_storeu_ps(s + i * s_row + t, _mm512_permutexvar_ps(order, comb4(l3[0], l3[1])));
        }
    }
    for (; t < R; t++) {
        __m512 row[HD / 16];
        for (int u = 0; u < HD / 16; u++) row[u] = load_kv16(kh + t * HD + 16 * u);
        for (int i = 0; i < GQ; i++) {
            __m512 a = _mm512_mul_ps(qv[i][0], row[0]);
            for (int u = 1; u < HD / 16; u++) a = _mm512_fmadd_ps(qv[i][u], row[u], a);
            s[i * s_row + t] = _mm512_reduce_add_ps(a);
        }
    }
    piece_softmax(s, s_row, mk, 0, R, st);
    for (t = 0; t < R; t++) {
        for (int u = 0; u < HD / 16; u++) {
            const __m512 v = load_kv16(vh + t * HD + 16 * u);
            for (int i = 0; i < GQ; i++) acc[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(s[i * s_row + t]), v, acc[i][u]);
        }
    }
    for (int i = 0; i < GQ; i++)
        for (int u = 0; u < HD / 16; u++) _mm512_storeu_ps(o + i * HD + 16 * u, acc[i][u]);
}
#endif

/* The query rows of kv head h of sequence b, as float32 multiplied by qscale: qh (GQ, HD) */
static inline void load_query(const kv_t *q, int64_t q_b, int64_t q_h, int64_t b, int64_t h, float qscale, float *qh) {
    for (int i = 0; i < GQ; i++)
        for (int d = 0; d < HD; d++) qh[i * HD + d] = kv_float(q[b * q_b + (h * GQ + i) * q_h + d]) * qscale;
}

/* Piece c of one kv head's attention: c < NC covers the c-th share (whole key groups) of its Sq quantised tokens,
   c == NC its R exact residual tokens (scores at Sq + t). The pointers are the head's own rows: codes (Sq, MB), key
   scale/zero (Sq / GS, HD), value scale/zero (Sq, NGV), residual keys/values (R, HD). Scores and the softmax's
   numerators go to s[i * s_row + t] (mask mk alike, or NULL); the piece's unnormalised output to o (GQ, HD), its
   max and sum per query row to st (GQ, 2). */
static void attend_piece(const float *qh, int64_t c, int64_t NC, int64_t Sq, int64_t R, const uint8_t *kc,
                         const SCALE_T *ks, const SCALE_T *kz, const uint8_t *vc, const SCALE_T *vs, const SCALE_T *vz,
                         const kv_t *kh, const kv_t *vh, float *s, int64_t s_row, const uint8_t *mk, float *o,
                         float *st, int kernel) {
    if (c < NC) {
        const int64_t chunk = (Sq / GS + NC - 1) / NC * GS;
        const int64_t t0 = c * chunk < Sq ? c * chunk : Sq, t1 = t0 + chunk < Sq ? t0 + chunk : Sq;
#if BLK
        /* kernel 1 (blocked) where the piece is whole 16-token blocks (it always is: whole key groups, GS % 16 == 0) */
        if (kernel >= 1 && (t1 - t0) % 16 == 0) {
#if KAMX
            if (kernel == 1 && kamx_ok())
                key_scores_amx(qh, kc, ks, kz, t0, t1, s, s_row);
            else
#endif
                key_scores_blk(qh, kc, ks, kz, t0, t1, s, s_row);
            piece_softmax(s, s_row, mk, t0, t1, st);
#if VAMX
            if (kernel == 1 && (t1 - t0) % 32 == 0 && kamx_ok())
                weighted_values_amx(s, s_row, vc, vs, vz, t0, t1, o);
            else
#endif
                weighted_values_blk(s, s_row, vc, vs, vz, t0, t1, o);
            return;
        }
#else
        (void)kernel;
#endif
        key_scores(qh, kc, ks, kz, t0, t1, s, s_row);
        piece_softmax(s, s_row, mk, t0, t1, st);
        weighted_values(s, s_row, vc, vs, vz, t0, t1, o);
        return;
    }
#if BLK
    if (kernel >= 1) {
        residual_blk(qh, R, kh, vh, s + Sq, s_row, mk ? mk + Sq : 0, o, st);
        return;
    }
#endif
    float row[HD];
    for (int64_t t = 0; t < R; t++) {
        for (int d = 0; d < HD; d++) row[d] = kv_float(kh[t * HD + d]);
        for (int i = 0; i < GQ; i++) {
            vf acc = (vf){0};
            for (int d = 0; d < HD; d += VL) {
                vf a, k;
                memcpy(&a, qh + i * HD + d, sizeof(vf));
                memcpy(&k, row + d, sizeof(vf));
                acc += a * k;
            }
            s[i * s_row + Sq + t] = hsum(acc);
        }
    }
    piece_softmax(s, s_row, mk, Sq, Sq + R, st);
    for (int i = 0; i < GQ * HD; i++) o[i] = 0.f;
    for (int64_t t = 0; t < R; t++) {
        for (int d = 0; d < HD; d++) row[d] = kv_float(vh[t * HD + d]);
        for (int i = 0; i < GQ; i++) {
            const float w = s[i * s_row + Sq + t];
            for (int d = 0; d < HD; d++) o[i * HD + d] += w * row[d];
        }
    }
}

/* One kv head's np pieces merged: out = sum_c e^(m_c - M) part_c / sum_c e^(m_c - M) l_c; part (np, GQ, HD),
   stats (np, GQ, 2), out (GQ, HD) */
static void merge_pieces(const float *part, const float *stats, int64_t np, kv_t *out) {
    for (int i = 0; i < GQ; i++) {
        float M = -INFINITY, L = 0.f, w[np];
        for (int64_t c = 0; c < np; c++) M = fmaxf(M, stats[(c * GQ + i) * 2]);
        for (int64_t c = 0; c < np; c++) {
            const float m = stats[(c * GQ + i) * 2];
            w[c] = m == -INFINITY ? 0.f : expf(m - M);
            L += w[c] * stats[(c * GQ + i) * 2 + 1];
        }
        kv_t *oi = out + i * HD;
        for (int d = 0; d < HD; d++) {
            float acc = 0.f;
            for (int64_t c = 0; c < np; c++) acc += w[c] * part[(c * GQ + i) * HD + d];
            oi[d] = float_kv(acc / L);
        }
    }
}

/* Single-query attention of each kv head's GQ query rows over its KIVI layer (dense: every head the same tokens): NC
   pieces of whole key groups of the Sq quantised tokens, then the R residual tokens as a last piece, one OpenMP task
   each; each piece's softmax is local (its max, its sum), merged at the end (the log-sum-exp merge of split softmax).
   q (b, h * GQ + i, d) at + b*q_b + (h*GQ + i)*q_h + d in the residual's dtype, multiplied by qscale here; quantised
   codes (b, h, t, MB) at + b*c_b + h*c_h + t*MB, key scale/zero (b, h, t / GS, HD) at + b*ks_b + h*ks_h, value
   scale/zero (b, h, t, NGV) at + b*vs_b + h*vs_h; residual keys and values (b, h, t, HD) at + b*r_b + h*r_h; mask
   (B*HK, GQ, Sq + R) bytes (0 = hidden) or NULL; scratch (B*HK, GQ, Sq + R) float32; part (B*HK, NC + 1, GQ, HD),
   stats (B*HK, NC + 1, GQ, 2); out (B*HK, GQ, HD) in the residual's dtype. */
void kivi_attend(int64_t B, int64_t HK, int64_t Sq, int64_t R, int64_t NC, const kv_t *q, int64_t q_b, int64_t q_h,
                 float qscale, const uint8_t *kc,
                 int64_t c_b, int64_t c_h, const SCALE_T *ks, const SCALE_T *kz, int64_t ks_b, int64_t ks_h,
                 const uint8_t *vc, const SCALE_T *vs, const SCALE_T *vz, int64_t vs_b, int64_t vs_h,
                 const kv_t *rk, const kv_t *rv, int64_t r_b, int64_t r_h, const uint8_t *mask, float *scratch,
                 float *part, float *stats, kv_t *out, int nthreads, int kernel) {
    const int64_t S = Sq + R, np = NC + 1, tasks = B * HK * np;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t bh = task / np, c = task % np, b = bh / HK, h = bh % HK;
        float qh[GQ * HD];
        load_query(q, q_b, q_h, b, h, qscale, qh);
        attend_piece(qh, c, NC, Sq, R, kc + b * c_b + h * c_h, ks + b * ks_b + h * ks_h, kz + b * ks_b + h * ks_h,
                     vc + b * c_b + h * c_h, vs + b * vs_b + h * vs_h, vz + b * vs_b + h * vs_h,
                     rk + b * r_b + h * r_h, rv + b * r_b + h * r_h, scratch + bh * GQ * S, S,
                     mask ? mask + bh * GQ * S : 0, part + (bh * np + c) * GQ * HD, stats + (bh * np + c) * GQ * 2,
                     kernel);
    }
    for (int64_t bh = 0; bh < B * HK; bh++)
        merge_pieces(part + bh * np * GQ * HD, stats + bh * np * GQ * 2, np, out + bh * GQ * HD);
}

/* The same over ragged per-head rows (KIVI under an eviction method): every stored tensor is rows in (sequence,
   head, slot) order, kv head bh = b * HK + h holding qlen[bh] quantised rows from row qoff[bh] (a multiple of GS, so
   its key groups start at row qoff[bh] / GS of the key scales) and rlen[bh] residual rows from row roff[bh]; codes
   (N_q, MB), key scale/zero (N_q / GS, HD), value scale/zero (N_q, NGV), residual keys/values (N_r, HD). Each head's
   NC pieces share its own quantised rows. mask (B*HK, GQ, s_row) bytes over each head's rows (quantised then
   residual) or NULL; scratch (B*HK, GQ, s_row) with s_row >= every qlen + rlen; part, stats, out as above. */
void kivi_attend_rows(int64_t B, int64_t HK, int64_t NC, const kv_t *q, int64_t q_b, int64_t q_h, float qscale,
                      const uint8_t *kc, const SCALE_T *ks, const SCALE_T *kz, const uint8_t *vc, const SCALE_T *vs,
                      const SCALE_T *vz, const kv_t *rk, const kv_t *rv, const int64_t *qoff, const int64_t *qlen,
                      const int64_t *roff, const int64_t *rlen, const uint8_t *mask, int64_t s_row, float *scratch,
                      float *part, float *stats, kv_t *out, int nthreads, int kernel) {
    const int64_t np = NC + 1, tasks = B * HK * np;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t bh = task / np, c = task % np, b = bh / HK, h = bh % HK, o = qoff[bh];
        float qh[GQ * HD];
        load_query(q, q_b, q_h, b, h, qscale, qh);
        attend_piece(qh, c, NC, qlen[bh], rlen[bh], kc + o * MB, ks + (o / GS) * HD, kz + (o / GS) * HD,
                     vc + o * MB, vs + o * NGV, vz + o * NGV, rk + roff[bh] * HD, rv + roff[bh] * HD,
                     scratch + bh * GQ * s_row, s_row, mask ? mask + bh * GQ * s_row : 0,
                     part + (bh * np + c) * GQ * HD, stats + (bh * np + c) * GQ * 2, kernel);
    }
    for (int64_t bh = 0; bh < B * HK; bh++)
        merge_pieces(part + bh * np * GQ * HD, stats + bh * np * GQ * 2, np, out + bh * GQ * HD);
}
"""

_SCALE_TYPES = {torch.float16: "_Float16", torch.float32: "float"}
_KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_I64] * 5 + [_PTR, _I64, _I64, ctypes.c_float, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR]
_ARGS += [_I64, _I64]
_ARGS += [_PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int]
#: kivi_attend_rows: B, HK, NC, q, q_b, q_h, qscale, 8 storage pointers, 4 offset/length arrays, mask, s_row,
#: scratch, part, stats, out, nthreads, kernel (0 v1, 1 blocked)
_ROW_ARGS = [_I64] * 3 + [_PTR, _I64, _I64, ctypes.c_float] + [_PTR] * 13 + [_I64] + [_PTR] * 4 + [ctypes.c_int] * 2

#: the loop layouts of the packed kernel (see :func:`kivi_decode_native`'s ``kernel`` and the module): ``blocked``
#: (the default), ``blocked-vec`` (the same without the tile unit) and ``v1``, the first loops, kept for A/B
#: measurements (benchmarks/decode/kivi_kernel.py)
KERNELS = ("blocked", "blocked-vec", "v1")
#: the C entries' ``kernel`` argument per name
_KERNEL_IDS = {"v1": 0, "blocked": 1, "blocked-vec": 2}

#: (head_dim, bits, group_size, gq, scale dtype, residual dtype) -> the loaded library, or why there is none
_LIBS: dict[tuple, ctypes.CDLL | str] = {}
#: what :func:`available` found per query/layer shape and dtype
_AVAILABLE: dict[tuple, bool | str] = {}


def shape_problem(head_dim: int, bits: int, group_size: int, heads: int, kv_heads: int) -> str | None:
    """Why the kernel cannot take this shape (None: it can)."""
    per = 8 // bits
    if heads % kv_heads:
        return f"query heads {heads} not a multiple of kv heads {kv_heads}"
    if group_size % per:
        return f"group_size {group_size} is not a multiple of the {per} codes per byte"
    if (head_dim * bits // 8) % 4:
        return f"a row of {head_dim} {bits}-bit codes is {head_dim * bits // 8} bytes, not a multiple of 4"
    return None


def _cache_dir() -> Path:
    from longkit.models.smollm2 import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


_C_KV = r"""
#include <stdint.h>
#include <string.h>

/* kv_t: the element dtype of KV_KIND (0 float32, 1 bfloat16, 2 float16); kv_float / float_kv convert one element */
#if KV_KIND == 0
typedef float kv_t;
static inline float kv_float(kv_t x) { return x; }
static inline kv_t float_kv(float x) { return x; }
#elif KV_KIND == 1
/* bfloat16 is the top half of a float32 */
typedef uint16_t kv_t;
static inline float kv_float(kv_t x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* round to nearest even, as torch's float -> bfloat16 (a NaN stays a NaN) */
static inline kv_t float_kv(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (kv_t)((u >> 16) | 0x40);
    return (kv_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
#else
typedef _Float16 kv_t;
static inline float kv_float(kv_t x) { return (float)x; }
static inline kv_t float_kv(float x) { return (kv_t)x; }
#endif
"""

_C_VEC16 = r"""
/* 16-lane vectors (AVX-512 registers, two AVX2 ones, ...); load16: 16 elements from p widened to float32 lanes */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#if KV_KIND == 0
static inline vf load16(const kv_t *p) {
    vf x;
    memcpy(&x, p, sizeof(vf));
    return x;
}
#elif KV_KIND == 1
static inline vf load16(const kv_t *p) {
    vh x;
    memcpy(&x, p, sizeof(vh));
    return (vf)(__builtin_convertvector(x, vu) << 16);
}
#else
typedef _Float16 vhf __attribute__((vector_size(32)));
static inline vf load16(const kv_t *p) {
    vhf x;
    memcpy(&x, p, sizeof(vhf));
    return __builtin_convertvector(x, vf);
}
#endif
"""


def c_prelude(vec16: bool = False) -> str:
    """The C text the native kernels (this module's, :mod:`longkit.kvcache.decode_native`'s,
    :mod:`longkit.runtime.gemv_native`'s) put before their own source, kept in one place: ``kv_t``, the element type
    of the ``KV_KIND`` define (0 float32, 1 bfloat16, 2 float16), and ``kv_float`` / ``float_kv`` (float32 ->
    bfloat16 rounds to nearest even as torch does, a NaN stays a NaN); with ``vec16``, the 16-lane GCC vector types
    ``vf``/``vi``/``vu``/``vh`` and ``load16`` (16 elements widened to a ``vf``). Part of the source
    :func:`compile_library` hashes, so a change to it rebuilds every kernel."""
    return _C_KV + (_C_VEC16 if vec16 else "")


def compile_library(source: str, defines: dict[str, str | int], stem: str) -> ctypes.CDLL:
    """Compile ``source`` with ``defines`` prepended (once per source, defines, compiler and CPU: the file name is
    their hash) with ``-O3 -march=native -fopenmp`` into the kernel cache, and load it. Raises OSError (no compiler,
    load failure) or CalledProcessError (compile error). Shared by the native kernels of this room."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (set CC, or install cc/gcc)")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    key = "\0".join([source, head, cc, *flags, platform.machine(), cpu_capability(), _cpu_model()])
    path = _cache_dir() / f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / f"{stem}.c"
            src.write_text(head + source)
            out = Path(tmp) / path.name
            subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True, text=True)
            # atomic: a concurrent process either sees no file or a whole one
            os.replace(out, path)
    return ctypes.CDLL(str(path))


def load_kernel(
    source: str, defines: dict[str, str | int], stem: str, entries: dict[str, tuple[list, object]], vec16: bool = False
) -> ctypes.CDLL | str:
    """:func:`compile_library` of :func:`c_prelude` (``vec16``) followed by ``source``, with the ctypes signature of
    each entry point set (``entries``: name -> (argtypes, restype)); or, if there is no compiler, the compile fails
    or the library does not load, a string saying why (the callers keep their PyTorch path). Shared by the native
    kernels of this room and :mod:`longkit.runtime.gemv_native`."""
    try:
        lib = compile_library(c_prelude(vec16) + source, defines, stem)
    except subprocess.CalledProcessError as e:
        return f"the kernel did not compile: {(e.stderr or '').strip()[-400:]}"
    except OSError as e:
        return f"the kernel could not be built or loaded: {e}"
    for name, (argtypes, restype) in entries.items():
        entry = getattr(lib, name)
        entry.argtypes, entry.restype = argtypes, restype
    return lib


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def library(
    head_dim: int, bits: int, group_size: int, gq: int, scale_dtype: torch.dtype, kv_dtype: torch.dtype
) -> ctypes.CDLL | str:
    """The compiled kernel for this shape, or a string saying why there is none (remembered for the process)."""
    key = (head_dim, bits, group_size, gq, scale_dtype, kv_dtype)
    if key not in _LIBS:
        defines = dict(HD=head_dim, BITS=bits, GS=group_size, GQ=gq, SCALE_T=_SCALE_TYPES[scale_dtype],
                       SCALE_IS_HALF=int(scale_dtype == torch.float16), KV_KIND=_KV_KINDS[kv_dtype])  # fmt: skip
        entries = {"kivi_attend": (_ARGS, None), "kivi_attend_rows": (_ROW_ARGS, None)}
        _LIBS[key] = load_kernel(SOURCE, defines, "kivi_read", entries)
    return _LIBS[key]


def _switched_off() -> bool:
    """Whether ``LONGKIT_KIVI_NATIVE=0`` (read at each call: tests and the benchmarks switch it while running; about a
    microsecond per layer and step, under 0.1% of a decode step)."""
    return os.environ.get(ENV, "1") == "0"


def available(layer: KIVILayer, q: torch.Tensor) -> bool | str:
    """True if :func:`kivi_decode_native` can read ``layer`` for the query ``q``; otherwise why not (remembered per
    shape and dtype: this runs at every layer of every decode step)."""
    if _switched_off():
        return f"{ENV}=0"
    if layer.qkeys is None:
        return "no quantised tokens"
    key = (q.shape[1], q.shape[-1], q.device.type, layer.qkeys.device.type, kv_heads(layer), layer.bits,
           layer.group_size, layer.scale_dtype, layer.keys.dtype)  # fmt: skip
    found = _AVAILABLE.get(key)
    if found is None:
        found = _AVAILABLE[key] = _available(*key)
    return found


def kv_heads(layer: KIVILayer) -> int:
    """The layer's kv heads: dense storage is (B, H_kv, n, ...), ragged rows have per-head counts (B, H_kv)."""
    return layer.q_lengths.shape[1] if layer.packed else layer.keys.shape[1]


def _available(heads, head_dim, q_device, kv_device, kv_heads, bits, group_size, scale_dtype, kv_dtype) -> bool | str:
    if q_device != "cpu" or kv_device != "cpu":
        return "tensors not on the CPU"
    if scale_dtype not in _SCALE_TYPES or kv_dtype not in _KV_KINDS:
        return f"scale dtype {scale_dtype}, residual dtype {kv_dtype}"
    problem = shape_problem(head_dim, bits, group_size, heads, kv_heads)
    if problem:
        return problem
    lib = library(head_dim, bits, group_size, heads // kv_heads, scale_dtype, kv_dtype)
    return True if isinstance(lib, ctypes.CDLL) else lib


def _alike(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (B, H_kv, n, m), each (n, m) block's rows contiguous, with the same strides (the kernel takes one
    batch and one head stride for both); the growing buffers' views already are."""
    rows = [t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (a, b)]
    if not all(rows) or a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _prepare(
    layer: KIVILayer, q: torch.Tensor, scale: float | None
) -> tuple[ctypes.CDLL, torch.Tensor, int, int, float, int]:
    """What both entries start with: the kernel for the layer's shape (RuntimeError saying why if there is none), q
    (B, H, 1, D) in the residual's dtype with unit stride, the kv heads, query heads per kv head, the scale
    (``D ** -0.5`` if None) and torch's thread count."""
    D = q.shape[-1]
    h_kv = kv_heads(layer)
    gq = q.shape[1] // h_kv
    pack_query(q, h_kv)  # checks the shape
    lib = library(D, layer.bits, layer.group_size, gq, layer.scale_dtype, layer.keys.dtype)
    if not isinstance(lib, ctypes.CDLL):
        raise RuntimeError(lib)
    if q.dtype != layer.keys.dtype or q.stride(-1) != 1:
        q = q.to(layer.keys.dtype).contiguous()
    return lib, q, h_kv, gq, D**-0.5 if scale is None else scale, torch.get_num_threads()


def kivi_decode_native(
    layer: KIVILayer,
    q: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    kernel: str = "blocked",
) -> torch.Tensor:
    """Attention of one query token over a :class:`~longkit.kvcache.kivi.KIVILayer`, read quantised by the native
    kernel (check :func:`available` first).

    q (B, H, 1, D); mask (B|1, H|1, 1, S) bool (True = visible) or additive, or None, over the layer's stored tokens
    (quantised first): dense, ``S = S_q + S_r``; ragged rows (under eviction), each head's own rows padded to the
    longest head's (columns past a head's rows are ignored). ``kernel``: the loop layout, one of :data:`KERNELS`
    (``blocked``, the default, and ``blocked-vec``, the same without the tile unit: see the module; where the CPU
    has no AVX-512 or the group size is not a multiple of 16 both run the ``v1`` loops; ``v1``: the first loops, kept
    for the A/B measurement). The same result up to float rounding. Returns (B, H, 1, D) in q's dtype.
    """
    if kernel not in _KERNEL_IDS:
        raise MethodError(
            f"kivi_decode_native: parameter 'kernel' must be one of {', '.join(KERNELS)} (got {kernel!r})"
        )
    if layer.packed:
        return _decode_rows(layer, q, mask, scale, kernel)
    if mask is None:
        return _decode_dense(layer, q, scale, kernel)
    B, H, _, D = q.shape
    dtype = q.dtype
    lib, q, h_kv, gq, scale, threads = _prepare(layer, q, scale)
    qkeys, qvals = _alike(layer.qkeys, layer.qvalues)
    ks, kz = _alike(layer.k_scale, layer.k_zero)
    vs, vz = _alike(layer.v_scale, layer.v_zero)
    rk, rv = _alike(layer.keys, layer.values)
    n_q, n_r = qkeys.shape[2], rk.shape[2]
    m = bool_mask(pack_mask(mask, H, h_kv))
    if m is not None:
        # (B, H_kv, G_q, S) one byte per score, 0 = hidden
        m = m.expand(B, h_kv, gq, n_q + n_r).contiguous()
    # pieces of whole key groups per kv head (plus the residual): enough for every thread to have work
    pieces = max(1, min(-(-2 * threads // (B * h_kv)), n_q // layer.group_size))
    scratch = torch.empty(B, h_kv, gq, n_q + n_r, dtype=torch.float32)
    part = torch.empty(B, h_kv, pieces + 1, gq, D, dtype=torch.float32)
    stats = torch.empty(B, h_kv, pieces + 1, gq, 2, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, dtype=q.dtype)
    lib.kivi_attend(
        B, h_kv, n_q, n_r, pieces, q.data_ptr(), q.stride(0), q.stride(1), scale,
        qkeys.data_ptr(), qkeys.stride(0), qkeys.stride(1), ks.data_ptr(), kz.data_ptr(), ks.stride(0), ks.stride(1),
        qvals.data_ptr(), vs.data_ptr(), vz.data_ptr(), vs.stride(0), vs.stride(1),
        rk.data_ptr(), rv.data_ptr(), rk.stride(0), rk.stride(1), None if m is None else m.data_ptr(),
        scratch.data_ptr(), part.data_ptr(), stats.data_ptr(), out.data_ptr(), threads, _KERNEL_IDS[kernel],
    )  # fmt: skip
    return out if out.dtype == dtype else out.to(dtype)


class _Plan:
    """What a layer's decode steps share while their shapes stay the same (:func:`_decode_dense`): the kernel, kv
    heads and query heads per kv head for ``key`` (query shape and dtype, the layer's residual dtype, kv heads, bits,
    group size and scale dtype), and the strides of the stored tensors last found fit for the kernel (None: a layout
    the kernel does not take as it is, copied at each step)."""

    __slots__ = ("key", "lib", "h_kv", "gq", "strides")

    def __init__(self, key: tuple, lib: ctypes.CDLL, h_kv: int, gq: int):
        self.key, self.lib, self.h_kv, self.gq, self.strides = key, lib, h_kv, gq, None

    def __reduce__(self):
        # a copied or pickled layer starts without a plan (the loaded library is neither copied nor pickled)
        return type(None), ()


#: per thread, a float32 buffer the kernel's scratch, partial sums and statistics are carved from (it only reads them
#: within a call): grown when a step needs more, never per step
_SCRATCH = threading.local()


def _scratch(n: int) -> int:
    """The address of at least ``n`` float32 slots of this thread's scratch buffer."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        # room to grow (1/8 more, as the cache's own buffers) so a longer cache does not reallocate every step
        buf = _SCRATCH.buf = torch.empty(n + n // 8 + 4096, dtype=torch.float32)
    return buf.data_ptr()


def _align(n: int) -> int:
    """``n`` float32 slots rounded up to 64 bytes: each block carved from the scratch starts aligned, as torch.empty's."""
    return -(-n // 16) * 16


def _decode_dense(layer: KIVILayer, q: torch.Tensor, scale: float | None, kernel: str = "blocked") -> torch.Tensor:
    """:func:`kivi_decode_native` over dense storage without a mask (every decode step of plain KIVI without padding):
    the checks of :func:`_prepare` and :func:`_alike` run when the shapes or strides change, not at every step, and
    the kernel's work space is one reused buffer. Same arguments to the kernel, so the same output."""
    B, H, _, D = q.shape
    dtype = q.dtype
    threads = torch.get_num_threads()
    keys = layer.keys
    key = (q.shape, dtype, keys.dtype, keys.shape[1], layer.bits, layer.group_size, layer.scale_dtype)
    plan = layer.__dict__.get("_native_plan")
    if plan is None or plan.key != key:
        lib, _, h_kv, gq, _, _ = _prepare(layer, q, scale)  # raises for shapes the kernel cannot take
        plan = layer._native_plan = _Plan(key, lib, h_kv, gq)
    h_kv, gq = plan.h_kv, plan.gq
    if dtype != keys.dtype or q.stride()[-1] != 1:
        q = q.to(keys.dtype).contiguous()
    qkeys, qvals, ks, kz, vs, vz, rk, rv = (layer.qkeys, layer.qvalues, layer.k_scale, layer.k_zero, layer.v_scale,
                                            layer.v_zero, keys, layer.values)  # fmt: skip
    strides = (qkeys.stride(), qvals.stride(), ks.stride(), kz.stride(), vs.stride(), vz.stride(), rk.stride(),
               rv.stride())  # fmt: skip
    fit = strides
    if strides != plan.strides:
        # the layout the kernel takes is a function of the strides alone (each tensor's last size is fixed by D, bits
        # and G): checked once per layout, which changes only when a buffer is reallocated
        qkeys, qvals = _alike(qkeys, qvals)
        ks, kz = _alike(ks, kz)
        vs, vz = _alike(vs, vz)
        rk, rv = _alike(rk, rv)
        fit = (qkeys.stride(), qvals.stride(), ks.stride(), kz.stride(), vs.stride(), vz.stride(), rk.stride(),
               rv.stride())  # fmt: skip
        plan.strides = fit if fit == strides else None
    n_q, n_r = qkeys.shape[2], rk.shape[2]
    # pieces of whole key groups per kv head (plus the residual): enough for every thread to have work
    pieces = max(1, min(-(-2 * threads // (B * h_kv)), n_q // layer.group_size))
    # (B, H_kv, G_q, S) scores, (B, H_kv, pieces + 1, G_q, D) partial sums, (..., 2) their statistics, float32
    n_s, n_p, n_t = (_align(B * h_kv * gq * n) for n in (n_q + n_r, (pieces + 1) * D, (pieces + 1) * 2))
    base = _scratch(n_s + n_p + n_t)
    out = torch.empty(B, H, 1, D, dtype=q.dtype)
    # the (batch, head) strides from the tuples above (a tensor's stride() once costs less than stride(i) twice)
    sq, (sqk, _, sks, _, svs, _, srk, _) = q.stride(), fit
    plan.lib.kivi_attend(
        B, h_kv, n_q, n_r, pieces, q.data_ptr(), sq[0], sq[1], D**-0.5 if scale is None else scale,
        qkeys.data_ptr(), sqk[0], sqk[1], ks.data_ptr(), kz.data_ptr(), sks[0], sks[1],
        qvals.data_ptr(), vs.data_ptr(), vz.data_ptr(), svs[0], svs[1],
        rk.data_ptr(), rv.data_ptr(), srk[0], srk[1], None,
        base, base + 4 * n_s, base + 4 * (n_s + n_p), out.data_ptr(), threads, _KERNEL_IDS[kernel],
    )  # fmt: skip
    return out if out.dtype == dtype else out.to(dtype)


def _decode_rows(
    layer: KIVILayer, q: torch.Tensor, mask: torch.Tensor | None, scale: float | None, kernel: str = "blocked"
) -> torch.Tensor:
    """:func:`kivi_decode_native` over ragged per-head rows (:class:`~longkit.kvcache.kivi.KIVIRaggedLayer`): the
    kernel reads each head's rows where they are stored, from per-head offsets; nothing is gathered or padded."""
    B, H, _, D = q.shape
    dtype = q.dtype
    lib, q, h_kv, gq, scale, threads = _prepare(layer, q, scale)
    # (N, ...) rows, each contiguous: what the kernel indexes from the offsets (already so, as stored)
    stored = [t.contiguous() for t in (layer.qkeys, layer.k_scale, layer.k_zero, layer.qvalues, layer.v_scale,
                                       layer.v_zero, layer.keys, layer.values)]  # fmt: skip
    # (B * H_kv,) each head's first row and row count, quantised and residual
    qlen, rlen = layer.q_lengths.flatten().contiguous(), layer.r_lengths.flatten().contiguous()
    qoff, roff = torch.cumsum(qlen, 0) - qlen, torch.cumsum(rlen, 0) - rlen
    s_row = int((qlen + rlen).max())
    m = bool_mask(pack_mask(mask, H, h_kv))
    if m is not None:
        # (B, H_kv, G_q, s_row) one byte per score over each head's rows, 0 = hidden
        m = m[..., :s_row].expand(B, h_kv, gq, s_row).contiguous()
    # pieces of whole key groups per kv head (plus the residual): enough for every thread to have work
    pieces = max(1, min(-(-2 * threads // (B * h_kv)), int(qlen.max()) // layer.group_size))
    scratch = torch.empty(B, h_kv, gq, s_row, dtype=torch.float32)
    part = torch.empty(B, h_kv, pieces + 1, gq, D, dtype=torch.float32)
    stats = torch.empty(B, h_kv, pieces + 1, gq, 2, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, dtype=q.dtype)
    lib.kivi_attend_rows(
        B, h_kv, pieces, q.data_ptr(), q.stride(0), q.stride(1), scale, *(t.data_ptr() for t in stored),
        qoff.data_ptr(), qlen.data_ptr(), roff.data_ptr(), rlen.data_ptr(), None if m is None else m.data_ptr(),
        s_row, scratch.data_ptr(), part.data_ptr(), stats.data_ptr(), out.data_ptr(), threads, _KERNEL_IDS[kernel],
    )  # fmt: skip
    return out if out.dtype == dtype else out.to(dtype)
