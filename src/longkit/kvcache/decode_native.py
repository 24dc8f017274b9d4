"""Single-query attention over a dense cache in one pass of C loops: K and V read once, only the filled prefix.

A decode step's attention reads the whole cache for one query token per sequence. torch's fused CPU kernel is built
for long queries: at one token it parallelises over (batch, query head, query block) only (SmolLM2's 3 kv heads on
2 threads leave one thread idle a third of the time), and a compiled decoder's fixed-capacity buffer makes it read
every spare slot too. This kernel does the memory-bound part directly:

- the ``G`` query heads of a kv head are the rows of one product (as :mod:`longkit.kvcache.decode`'s packed form):
  each key row is loaded once and multiplied by all ``G`` query rows; each value row once, weighted for all ``G``;
- the sequence of each kv head is split into pieces, one OpenMP task each (so 2 threads share 3 heads evenly), each
  piece an online softmax over blocks of 16 tokens (scores float32, its own max and sum), merged at the end by the
  log-sum-exp rule of split softmax (flash-decoding);
- only the first ``limit`` slots are read: a fixed-capacity buffer's spare slots cost nothing;
- a per-kv-head byte mask (0 = hidden) covers caches whose heads kept different tokens (AdaKV) or layers with
  different fills (PyramidKV).

For bfloat16 on CPUs with the bfloat16 dot instruction (and a head dim that is a multiple of 32) the default loop
layout, ``kernel="blocked"``, keeps the loops in registers (query head outermost within a block of keys, a 32-channel
slice outermost over the values, the values widened by a shift and a mask instead of a shuffle, the running sums as
vectors, the per-token hidden test only on partial or masked blocks) and prefetches the keys and values two blocks
ahead; where the CPU has AMX-BF16 (and Linux lends the tile registers) the scores of each full block of 16 keys are
one tile product per 32 channels. On SmolLM2-135M's shape (head dim 64, 3 query heads per kv head, 30 layers' caches
from memory, 2K-32K tokens) the kernel's CPU time went from 1.5-1.6x a plain read of the same bytes (``v1``, the
general loops) to 1.1-1.2x (``blocked-dot``, without the tiles) and 0.96-1.10x (``blocked``)
(benchmarks/decode/results/attend_kernel.md; the other two layouts are kept for that A/B). The arithmetic is the same
(bfloat16 products summed in float32, float32 weights and sums, the same exp), so the layouts agree to float
rounding.

Keys and values are float32, bfloat16 or float16 (converted to float32 in registers), the query the same dtype, the
output in it. The C source uses GCC's vector extensions (16 float lanes: AVX-512 registers, two AVX2 ones, ...) plus
an AVX-512 reduction of 16 tokens' partial sums at once where available; it is compiled on first use per head dim,
query heads per kv head and dtype (``-O3 -march=native -fopenmp``, cached like :mod:`longkit.kvcache.kivi_native`'s
kernel). Without a C compiler, off the CPU, or for a head dim that is not a multiple of 16, :func:`available` says
why and callers keep their PyTorch path. ``LONGKIT_DECODE_NATIVE=0`` turns the kernel off.

Outputs equal :func:`longkit.kvcache.naive.decode_reference` up to float rounding (float32: within 1e-6; the
summation order differs).

Based on Flash-Decoding for long-context inference (Dao, Haziza, Massa, Sizov 2023),
https://crfm.stanford.edu/2023/10/12/flashdecoding.html, and FlashAttention (Dao et al. 2022),
https://arxiv.org/abs/2205.14135 (online softmax).
"""

from __future__ import annotations

import ctypes
import os

import torch

from longkit.errors import MethodError

#: the environment variable that turns the native kernel off (``0``)
ENV = "LONGKIT_DECODE_NATIVE"

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* compiled per shape: HD head dim (a multiple of 16), GQ query heads per kv head, KV_KIND the dtype of q, k, v and
   out (0 float32, 1 bfloat16, 2 float16) */
#define NV (HD / 16)
#if KV_KIND == 1 && defined(__AVX512BF16__) && HD % 32 == 0
#define DOT_BF16 1
#else
#define DOT_BF16 0
#endif

/* kv_t, kv_float, float_kv, the 16-lane vectors vf, vi, vu, vh and load16: c_prelude(vec16=True), compiled
   before this source */

static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += v[l];
    return s;
#endif
}

static inline float hmax(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else
    float m = v[0];
    for (int l = 1; l < 16; l++) m = v[l] > m ? v[l] : m;
    return m;
#endif
}

/* e^x for x <= 0 (scores minus their running max): x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two for exactness),
   e^r by its Taylor series to r^7 (relative error below 1e-8 there), 2^n added to the exponent; 0 below -87 */
static inline vf vexp(vf x) {
    const vi low = x < -87.0f;
    x = vsel(low, (vf){0} - 87.0f, x);
    const vi n = __builtin_convertvector(x * 1.4426950408889634f - 0.5f, vi);
    const vf fn = __builtin_convertvector(n, vf);
    const vf r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
    vf y = (vf){0} + (1.0f / 5040);
    y = y * r + (1.0f / 720);
    y = y * r + (1.0f / 120);
    y = y * r + (1.0f / 24);
    y = y * r + (1.0f / 6);
    y = y * r + 0.5f;
    y = y * r + 1.0f;
    y = y * r + 1.0f;
    return (vf)(((vi)y + (n << 23)) & ~low);
}

/* The 16 sums of 16 vectors' lanes, sum of x[t] in lane t */
static inline vf reduce16(vf x[16]) {
#if defined(__AVX512F__)
    /* pairwise: each step adds halves of two vectors so that every output lane keeps one token's partial sum;
       after the four steps lane 4j + k holds token 4k + j, put back in order by one permutation */
    __m512 a[8], b[4], c[2];
    for (int t = 0; t < 8; t++) {
        const __m512 u = (__m512)x[2 * t], w = (__m512)x[2 * t + 1];
        a[t] = _mm512_add_ps(_mm512_shuffle_f32x4(u, w, 0x44), _mm512_shuffle_f32x4(u, w, 0xEE));
    }
    for (int t = 0; t < 4; t++)
        b[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0xDD));
    for (int t = 0; t < 2; t++)
        c[t] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * t], b[2 * t + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * t], b[2 * t + 1], 0xEE));
    const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return (vf)_mm512_permutexvar_ps(order, d);
#else
    vf s;
    for (int t = 0; t < 16; t++) s[t] = hsum(x[t]);
    return s;
#endif
}

/* Online softmax attention of the GQ query rows qh (scaled) over tokens [t0, t1) of one kv head: acc (GQ, HD)
   unnormalised, m the running max and l the running sum per row. Tokens hidden by mask (0) get weight 0. */
static void piece(const float *qh, const kv_t *qraw, int64_t q_h, float scale, const kv_t *k, const kv_t *v,
                  const uint8_t *mask, int64_t t0, int64_t t1, float *acc_out, float *m_out, float *l_out) {
    vf q[GQ][NV], acc[GQ][NV];
#if DOT_BF16
    /* bfloat16 keys: the products of a key row with the unscaled bfloat16 query rows by the CPU's bfloat16 dot
       instruction (pairs of products summed into float32 lanes, exact products), no conversion of the keys */
    __m512bh qb[GQ][HD / 32];
    for (int i = 0; i < GQ; i++)
        for (int u = 0; u < HD / 32; u++) qb[i][u] = (__m512bh)_mm512_loadu_si512(qraw + i * q_h + 32 * u);
#else
    (void)qraw;
    (void)q_h;
    (void)scale;
#endif
    float m[GQ], l[GQ];
    for (int i = 0; i < GQ; i++) {
        for (int u = 0; u < NV; u++) {
            memcpy(&q[i][u], qh + i * HD + 16 * u, sizeof(vf));
            acc[i][u] = (vf){0};
        }
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
    for (int64_t t = t0; t < t1; t += 16) {
        const int n = t1 - t < 16 ? (int)(t1 - t) : 16;
        /* scores of the block: s[i] lane j = q_i . k_(t + j), -inf where hidden or past the piece */
        vf s[GQ];
        {
            vf part[GQ][16];
            for (int j = 0; j < 16; j++) {
                for (int i = 0; i < GQ; i++) part[i][j] = (vf){0};
                if (j >= n) continue;
                const kv_t *row = k + (t + j) * HD;
#if DOT_BF16
                for (int u = 0; u < HD / 32; u++) {
                    const __m512bh x = (__m512bh)_mm512_loadu_si512(row + 32 * u);
                    for (int i = 0; i < GQ; i++)
                        part[i][j] = (vf)_mm512_dpbf16_ps((__m512)part[i][j], qb[i][u], x);
                }
#else
                for (int u = 0; u < NV; u++) {
                    const vf x = load16(row + 16 * u);
                    for (int i = 0; i < GQ; i++) part[i][j] += q[i][u] * x;
                }
#endif
            }
#if DOT_BF16
            for (int i = 0; i < GQ; i++) s[i] = reduce16(part[i]) * scale;
#else
            for (int i = 0; i < GQ; i++) s[i] = reduce16(part[i]);
#endif
        }
        vi hidden;
        for (int j = 0; j < 16; j++) hidden[j] = -(j >= n || (mask && !mask[t + j]));
        vf p[GQ];
        int any = 0;
        for (int i = 0; i < GQ; i++) {
            s[i] = vsel(hidden, (vf){0} - INFINITY, s[i]);
            const float bm = hmax(s[i]);
            if (bm == -INFINITY) {
                p[i] = (vf){0};
                continue;
            }
            any = 1;
            if (bm > m[i]) {
                /* a new max rescales what was accumulated (exp(-inf) = 0 on the first block) */
                const float a = m[i] == -INFINITY ? 0.f : expf(m[i] - bm);
                for (int u = 0; u < NV; u++) acc[i][u] *= a;
                l[i] *= a;
                m[i] = bm;
            }
            p[i] = vexp(s[i] - m[i]);
            p[i] = vsel(hidden, (vf){0}, p[i]);
            l[i] += hsum(p[i]);
        }
        if (!any) continue;
        for (int j = 0; j < n; j++) {
            const kv_t *row = v + (t + j) * HD;
            for (int u = 0; u < NV; u++) {
                const vf x = load16(row + 16 * u);
                for (int i = 0; i < GQ; i++) acc[i][u] += p[i][j] * x;
            }
        }
    }
    for (int i = 0; i < GQ; i++) {
        for (int u = 0; u < NV; u++) memcpy(acc_out + i * HD + 16 * u, &acc[i][u], sizeof(vf));
        m_out[i] = m[i];
        l_out[i] = l[i];
    }
}

#if DOT_BF16 && BLOCKED
/* blocks of 16 tokens between the one a piece reads and the one it prefetches */
#define PREFETCH 2

#if TILES && defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__) && HD <= 128 && GQ <= 16
#define USE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
/* The scores of a full block of 16 keys by the CPU's tile unit (AMX-BF16), where it has one and Linux lends it: one
   tile product per 32 channels gives the 16 x GQ scores at once, where the dot instruction needs 16 x GQ x HD / 32
   instructions and a cross-lane sum of 16 vectors per query head (on SmolLM2's shape the kernel's CPU time went from
   1.1-1.2x to 0.96-1.10x a plain read of the same bytes). The products and float32 sums are the dot
   instruction's, in another order.
   The tile layout of a block's scores: tile 0 the 16 key rows (32 channels of each), tiles 2 + u the query rows'
   channels 32u .. 32u + 31 as pairs (the bfloat16 pair layout the tile product takes), tile 1 the 16 x GQ scores */
struct tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64)));

static void amx_begin(const kv_t *qraw, int64_t q_h) {
    struct tilecfg c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    c.rows[0] = 16;
    c.colsb[0] = 64;
    c.rows[1] = 16;
    c.colsb[1] = GQ * 4;
    for (int u = 0; u < HD / 32; u++) {
        c.rows[2 + u] = 16;
        c.colsb[2 + u] = GQ * 4;
    }
    /* GCC's tile intrinsics tell the compiler of no memory they read or write: the barriers keep the stores to
       the config and the query pairs before the loads, and the reads of the stored scores after the store */
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&c);
    /* (HD / 32, 16 channel pairs, GQ) the query pairs: row r of tile u, column i = q_i[32u + 2r], q_i[32u + 2r + 1] */
    uint32_t qt[HD / 32][16][GQ];
    for (int u = 0; u < HD / 32; u++)
        for (int r = 0; r < 16; r++)
            for (int i = 0; i < GQ; i++) memcpy(&qt[u][r][i], qraw + i * q_h + 32 * u + 2 * r, 4);
    __asm__ volatile("" ::: "memory");
    /* (tile numbers are literals: GCC's tile intrinsics paste them into the instruction) */
    _tile_loadd(2, qt[0], GQ * 4);
#if HD >= 64
    _tile_loadd(3, qt[1], GQ * 4);
#endif
#if HD >= 96
    _tile_loadd(4, qt[2], GQ * 4);
#endif
#if HD >= 128
    _tile_loadd(5, qt[3], GQ * 4);
#endif
}

/* sc[i] lane j = q_i . k_j for the 16 rows from kb (all inside the piece), unscaled */
static inline void amx_scores(const kv_t *kb, vf sc[GQ]) {
    float c[16][16] __attribute__((aligned(64)));
    _tile_zero(1);
    _tile_loadd(0, kb, HD * 2);
    _tile_dpbf16ps(1, 0, 2);
#if HD >= 64
    _tile_loadd(0, kb + 32, HD * 2);
    _tile_dpbf16ps(1, 0, 3);
#endif
#if HD >= 96
    _tile_loadd(0, kb + 64, HD * 2);
    _tile_dpbf16ps(1, 0, 4);
#endif
#if HD >= 128
    _tile_loadd(0, kb + 96, HD * 2);
    _tile_dpbf16ps(1, 0, 5);
#endif
    _tile_stored(1, c, 64);
    __asm__ volatile("" ::: "memory");
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
    for (int i = 0; i < GQ; i++)
        sc[i] = (vf)_mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(i)), &c[0][0], 4);
}

/* whether this process may use the tile registers (Linux asks for them once per process): 1 yes, -1 no, 0 not
   asked yet */
static int amx_state = 0;
static void amx_ask(void) {
    /* arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
    if (amx_state == 0) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
}
#else
#define USE_AMX 0
#endif

/* The same online softmax for bfloat16 keys and values on CPUs with the bfloat16 dot instruction, laid out so that
   the loops stay in registers (the general piece above keeps GQ x 16 score accumulators, more than the 32 vector
   registers, and reads the weights lane by lane):
   - scores: query head outermost within a block of 16 tokens, 16 accumulators (one per token: the bfloat16 dot
     products of the key row with the unscaled query, HD / 32 instructions), summed across lanes 16 at once;
   - the 16 weights of each query head stored once per block, each broadcast straight from memory into the FMA;
   - values: a 32-channel slice of the head dim outermost, the 16 tokens inside, so the 2 x GQ accumulators of the
     slice stay in registers for the block whatever HD and GQ are, and a row's bfloat16 pairs widened in place;
   - the running sum kept as a vector (one horizontal sum per piece, not per block);
   - the hidden-token select only on a piece's last, partial block or with a mask (full blocks without a mask take
     no per-token test);
   - the scores of full blocks by the tile unit where there is one (amx_scores above; kernel "blocked", not
     "blocked-dot"). The arithmetic is the general piece's: float32 scores, weights and sums (no rounding of the
     weights to bfloat16), the same exp. */
static void piece_bf16(const kv_t *qraw, int64_t q_h, float scale, const kv_t *k, const kv_t *v,
                       const uint8_t *mask, int64_t t0, int64_t t1, float *acc_out, float *m_out, float *l_out,
                       int amx) {
    __m512bh qb[GQ][HD / 32];
    vf acc[GQ][NV], lv[GQ];
    float m[GQ];
    float w[GQ][16] __attribute__((aligned(64)));
    for (int i = 0; i < GQ; i++) {
        for (int u = 0; u < HD / 32; u++) qb[i][u] = (__m512bh)_mm512_loadu_si512(qraw + i * q_h + 32 * u);
        for (int u = 0; u < NV; u++) acc[i][u] = (vf){0};
        lv[i] = (vf){0};
        m[i] = -INFINITY;
    }
#if USE_AMX
    if (amx) amx_begin(qraw, q_h);
#else
    (void)amx;
#endif
    for (int64_t t = t0; t < t1; t += 16) {
        const int n = t1 - t < 16 ? (int)(t1 - t) : 16;
        /* rows past the piece read as its first row of the block (in bounds), their scores hidden below */
        const int masked = n < 16 || mask;
        vi hidden = (vi){0};
        if (masked)
            for (int j = 0; j < 16; j++) hidden[j] = -(j >= n || (mask && !mask[t + j]));
        const kv_t *kb = k + t * HD;
        /* the keys and values PREFETCH blocks ahead asked for now: the hardware prefetcher alone left this loop's
           time about the sum of its arithmetic and the read (1.5x a plain read of the same bytes from DRAM), with
           the requests issued early the two overlap (about 1.2x, scores by the dot instruction) */
        if (t + PREFETCH * 16 < t1)
            for (int j = 0; j < 16 * HD * 2; j += 64) {
                _mm_prefetch((const char *)(kb + PREFETCH * 16 * HD) + j, _MM_HINT_T0);
                _mm_prefetch((const char *)(v + (t + PREFETCH * 16) * HD) + j, _MM_HINT_T0);
            }
        vf sc[GQ];
#if USE_AMX
        if (amx && n == 16)
            amx_scores(kb, sc);
        else
#endif
            for (int i = 0; i < GQ; i++) {
                /* (16 tokens) partial sums of q_i . k_j in 16 lanes each */
                vf part[16];
                for (int j = 0; j < 16; j++) {
                    const kv_t *row = kb + (j < n ? j : 0) * HD;
                    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[i][0], (__m512bh)_mm512_loadu_si512(row));
                    for (int u = 1; u < HD / 32; u++)
                        a = _mm512_dpbf16_ps(a, qb[i][u], (__m512bh)_mm512_loadu_si512(row + 32 * u));
                    part[j] = (vf)a;
                }
                sc[i] = reduce16(part);
            }
        int any = 0;
        for (int i = 0; i < GQ; i++) {
            vf s = sc[i] * scale;
            if (masked) s = vsel(hidden, (vf){0} - INFINITY, s);
            const float bm = hmax(s);
            if (bm == -INFINITY) {
                memset(w[i], 0, sizeof(w[i]));
                continue;
            }
            any = 1;
            if (bm > m[i]) {
                /* a new max rescales what was accumulated (nothing yet on the first block) */
                const float a = m[i] == -INFINITY ? 0.f : expf(m[i] - bm);
                for (int u = 0; u < NV; u++) acc[i][u] *= a;
                lv[i] *= a;
                m[i] = bm;
            }
            vf p = vexp(s - m[i]);
            if (masked) p = vsel(hidden, (vf){0}, p);
            lv[i] += p;
            memcpy(w[i], &p, sizeof(vf));
        }
        if (!any) continue;
        /* 32 bfloat16 values of a row in one load, widened without a shuffle: the even elements by a shift into the
           high half of each 32-bit lane, the odd ones by clearing the low half; acc[i][2w] holds channels 32w + 2l,
           acc[i][2w + 1] channels 32w + 2l + 1 (put back in order once, at the end) */
        const kv_t *vb = v + t * HD;
        const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
        for (int c = 0; c < HD / 32; c++)
            for (int j = 0; j < n; j++) {
                const __m512i x = _mm512_loadu_si512(vb + j * HD + 32 * c);
                const vf even = (vf)_mm512_slli_epi32(x, 16), odd = (vf)_mm512_and_si512(x, high);
                for (int i = 0; i < GQ; i++) {
                    acc[i][2 * c] += w[i][j] * even;
                    acc[i][2 * c + 1] += w[i][j] * odd;
                }
            }
    }
    for (int i = 0; i < GQ; i++) {
        for (int c = 0; c < HD / 32; c++)
            for (int l = 0; l < 16; l++) {
                acc_out[i * HD + 32 * c + 2 * l] = acc[i][2 * c][l];
                acc_out[i * HD + 32 * c + 2 * l + 1] = acc[i][2 * c + 1][l];
            }
        m_out[i] = m[i];
        l_out[i] = hsum(lv[i]);
    }
#if USE_AMX
    if (amx) _tile_release();
#endif
}
#endif

/* Attention of each kv head's GQ query rows over the first S tokens of its keys and values, NC pieces per head (one
   OpenMP task each), merged at the end. q (b, h * GQ + i, d) at + b*q_b + (h*GQ + i)*q_h + d; k, v (b, h, t, d) at
   + b*kv_b + h*kv_h + t*HD + d; mask bytes at + b*m_b + h*m_h + t (0 = hidden) or NULL; part (B*HK, NC, GQ, HD)
   and stats (B*HK, NC, GQ, 2) float32 scratch; out (B, HK * GQ, HD) contiguous. */
void decode_attend(int64_t B, int64_t HK, int64_t S, int64_t NC, const kv_t *q, int64_t q_b, int64_t q_h,
                   float scale, const kv_t *k, const kv_t *v, int64_t kv_b, int64_t kv_h, const uint8_t *mask,
                   int64_t m_b, int64_t m_h, float *part, float *stats, kv_t *out, int nthreads) {
    const int64_t tasks = B * HK * NC;
#if DOT_BF16 && BLOCKED && USE_AMX
    amx_ask();
    const int use_amx = amx_state > 0;
#elif DOT_BF16 && BLOCKED
    const int use_amx = 0;
#endif
    /* pieces of whole 16-token blocks */
    const int64_t chunk = ((S + NC - 1) / NC + 15) / 16 * 16;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t bh = task / NC, c = task % NC, b = bh / HK, h = bh % HK;
#if defined(__SSE__)
        /* denormals flushed to zero while the task runs: a peaked softmax gives weights near e^-87, whose products
           with small values are denormal, and each denormal operation costs a microcode assist (SmolLM2's real 8K
           cache: about 1.3-1.4x the time of reading the cache without this, about 1.0x with it, shared CPU) */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
#endif
        const int64_t t0 = c * chunk < S ? c * chunk : S, t1 = t0 + chunk < S ? t0 + chunk : S;
        float *st = stats + task * GQ * 2, m[GQ], l[GQ];
#if DOT_BF16 && BLOCKED
        piece_bf16(q + b * q_b + h * GQ * q_h, q_h, scale, k + b * kv_b + h * kv_h, v + b * kv_b + h * kv_h,
                   mask ? mask + b * m_b + h * m_h : 0, t0, t1, part + task * GQ * HD, m, l, use_amx);
#else
        float qh[GQ * HD];
        for (int i = 0; i < GQ; i++)
            for (int d = 0; d < HD; d++) qh[i * HD + d] = kv_float(q[b * q_b + (h * GQ + i) * q_h + d]) * scale;
        piece(qh, q + b * q_b + h * GQ * q_h, q_h, scale, k + b * kv_b + h * kv_h, v + b * kv_b + h * kv_h,
              mask ? mask + b * m_b + h * m_h : 0, t0, t1, part + task * GQ * HD, m, l);
#endif
        for (int i = 0; i < GQ; i++) {
            st[2 * i] = m[i];
            st[2 * i + 1] = l[i];
        }
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    /* out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c (a row with nothing visible: 0) */
    for (int64_t bh = 0; bh < B * HK; bh++)
        for (int i = 0; i < GQ; i++) {
            float M = -INFINITY, L = 0.f, w[NC];
            for (int64_t c = 0; c < NC; c++) M = fmaxf(M, stats[((bh * NC + c) * GQ + i) * 2]);
            for (int64_t c = 0; c < NC; c++) {
                const float mc = stats[((bh * NC + c) * GQ + i) * 2];
                w[c] = mc == -INFINITY ? 0.f : expf(mc - M);
                L += w[c] * stats[((bh * NC + c) * GQ + i) * 2 + 1];
            }
            kv_t *o = out + (bh * GQ + i) * HD;
            for (int d = 0; d < HD; d++) {
                float a = 0.f;
                for (int64_t c = 0; c < NC; c++) a += w[c] * part[((bh * NC + c) * GQ + i) * HD + d];
                o[d] = float_kv(L > 0.f ? a / L : 0.f);
            }
        }
}
"""

_KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_I64] * 4 + [_PTR, _I64, _I64, ctypes.c_float, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR]
_ARGS += [ctypes.c_int]
#: tokens per piece at least (a piece's fixed cost, the query load and the merge, is paid once per piece)
MIN_PIECE = 256

#: the loop layouts :func:`decode_attend` can run: ``blocked`` (the default) takes the register-blocked loops for
#: bfloat16 where the CPU has the bfloat16 dot instruction and the head dim is a multiple of 32 (the general loops
#: otherwise), with the scores of full blocks by the tile unit where the CPU has AMX-BF16 and the OS lends it;
#: ``blocked-dot`` the same loops with every score by the bfloat16 dot instruction; ``v1`` always the general loops
#: (both kept for A/B measurements: benchmarks/decode/attend_kernel.py)
KERNELS = ("blocked", "blocked-dot", "v1")

#: (head_dim, gq, dtype, kernel) -> the loaded library, or why there is none
_LIBS: dict[tuple, ctypes.CDLL | str] = {}


def library(head_dim: int, gq: int, dtype: torch.dtype, kernel: str = "blocked") -> ctypes.CDLL | str:
    """The compiled kernel for this shape, dtype and loop layout (one of :data:`KERNELS`), or a string saying why
    there is none (remembered)."""
    key = (head_dim, gq, dtype, kernel)
    if key not in _LIBS:
        from longkit.kvcache.kivi_native import load_kernel

        defines = {"HD": head_dim, "GQ": gq, "KV_KIND": _KV_KINDS[dtype], "BLOCKED": int(kernel != "v1"),
                   "TILES": int(kernel == "blocked")}  # fmt: skip
        _LIBS[key] = load_kernel(SOURCE, defines, "decode_attend", {"decode_attend": (_ARGS, None)}, vec16=True)
    return _LIBS[key]


def available(q: torch.Tensor, k: torch.Tensor) -> bool | str:
    """True if :func:`decode_attend` can run for the query ``q`` (B, H, 1, D) over keys ``k`` (B, H_kv, S, D);
    otherwise why not."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if q.device.type != "cpu" or k.device.type != "cpu":
        return "tensors not on the CPU"
    if q.dtype not in _KV_KINDS or k.dtype != q.dtype:
        return f"query dtype {q.dtype}, key dtype {k.dtype} (float32, bfloat16 or float16, the same)"
    D = q.shape[-1]
    if D % 16 or k.shape[-1] != D:
        return f"head dim {D} (a multiple of 16, the same for keys)"
    if q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"
    lib = library(D, q.shape[1] // k.shape[1], q.dtype)
    return True if isinstance(lib, ctypes.CDLL) else lib


def decode_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    limit: int | None = None,
    kernel: str = "blocked",
) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``limit`` slots of a dense cache, natively.

    q (B, H, 1, D); k, v (B, H_kv, S, D) of q's dtype; mask (B|1, H_kv|1, 1, S) bool per kv head (True = visible) or
    None; ``scale`` (default D^-0.5); ``limit`` in [1, S] (default S): slots from ``limit`` on are not read; ``kernel``
    one of :data:`KERNELS` (the same result up to float rounding). Returns (B, H, 1, D) in q's dtype. Check
    :func:`available` first (this raises a MethodError otherwise).
    """
    B, H, T, D = q.shape
    h_kv, S = k.shape[1], k.shape[2]
    if T != 1:
        raise MethodError(f"decode_attend: parameter 'q' must hold one query token (got {T})")
    if v.shape != k.shape:
        raise MethodError(f"decode_attend: keys {tuple(k.shape)} and values {tuple(v.shape)} must have one shape")
    limit = S if limit is None else int(limit)
    if not 1 <= limit <= S:
        raise MethodError(f"decode_attend: parameter 'limit' must be in [1, {S}] (got {limit})")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] not in (1, h_kv)
                             or mask.shape[2] != 1 or mask.shape[-1] < limit):  # fmt: skip
        raise MethodError(
            f"decode_attend: parameter 'mask' must be bool (B|1, H_kv|1, 1, >= limit) (got {mask.dtype} "
            f"{tuple(mask.shape)})"
        )
    if kernel not in KERNELS:
        raise MethodError(f"decode_attend: parameter 'kernel' must be one of {', '.join(KERNELS)} (got {kernel!r})")
    ok = available(q, k)
    if ok is not True:
        raise MethodError(f"decode_attend: the native kernel is not available: {ok}")
    lib = library(D, H // h_kv, q.dtype, kernel)
    if not isinstance(lib, ctypes.CDLL):
        raise MethodError(f"decode_attend: the native kernel is not available: {lib}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    # the kernel takes one batch and one head stride for both, rows of D contiguous
    if not (k.stride(-1) == 1 and k.stride(-2) == D and k.stride() == v.stride()):
        k, v = k.contiguous(), v.contiguous()
    m_b = m_h = 0
    if mask is not None:
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        m_b = mask.stride(0) if mask.shape[0] > 1 else 0
        m_h = mask.stride(1) if mask.shape[1] > 1 else 0
    threads = torch.get_num_threads()
    # pieces per kv head: about 8 tasks per thread, so that heads and threads need not divide (3 kv heads on 2
    # threads: 18 tasks, 9 each), none shorter than MIN_PIECE tokens
    pieces = max(1, min(-(-8 * threads // (B * h_kv)), limit // MIN_PIECE))
    part = torch.empty(B * h_kv * pieces * (H // h_kv) * D, dtype=torch.float32)
    stats = torch.empty(B * h_kv * pieces * (H // h_kv) * 2, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, dtype=q.dtype)
    scale = D**-0.5 if scale is None else float(scale)
    lib.decode_attend(
        B, h_kv, limit, pieces, q.data_ptr(), q.stride(0), q.stride(1), scale, k.data_ptr(), v.data_ptr(),
        k.stride(0), k.stride(1), None if mask is None else mask.data_ptr(), m_b, m_h, part.data_ptr(),
        stats.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip
    return out
