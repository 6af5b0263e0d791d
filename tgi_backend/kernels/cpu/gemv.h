/* A linear layer for a few rows, for the CPU: y = x @ w.T (+ bias), w bf16 [out, in] row-major as loaded.
 * Included by gemv.c (the exported linear_bf16) and decoder.c (a whole decode step in one call).
 * A decode step with a few rows is bound by reading the weights: each weight cache line is read once and used
 * by every row at once. With AVX512-BF16 (Cooper Lake, Sapphire Rapids and later) one vdpbf16ps multiplies 32
 * bf16 pairs into float32 sums; elsewhere each bf16 line is widened to float32 in registers, x converted once
 * to a float32 buffer. The sums are float32, y rounded to bf16 once (stored as bf16, or as float32 for the LM
 * head's logits). Output tiles are spread over OpenMP threads.
 */
#ifndef TGI_GEMV_H
#define TGI_GEMV_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "avx2.h"
#include "bf16.h"
#include "vec16.h"

#define MAX_ROWS 8
#define MAX_TILE 8 /* outputs a tile computes at once */
#define MIN_PARALLEL_WEIGHTS 32768 /* below this a fork-join costs more than the outputs */

#ifdef __AVX512BF16__
typedef uint16_t xelem; /* x as given: bf16 pairs feed vdpbf16ps directly */
#define XLANES 32       /* inputs per step: one 64-byte line of bf16 */

/* T outputs from o for R rows: R * T independent float32 sums (the dot-product latency hidden), each weight
 * line loaded once for the R rows; inputs past the last whole line are loaded masked (zeros). */
static inline __attribute__((always_inline)) void tile(const xelem *x, int64_t in, const uint16_t *w, int64_t o,
                                                        const int R, const int T, float *sums) {
    __m512 acc[MAX_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const int64_t whole = in - in % XLANES;
    for (int64_t i = 0; i <= whole; i += XLANES) {
        const __mmask32 m = i < whole ? (__mmask32)~0u : (__mmask32)((1ull << (in - whole)) - 1);
        if (i == whole && m == 0) break;
        __m512bh wv[4];
        for (int t = 0; t < T; t++) { /* the next tile's line at this offset: one core alone keeps too few DRAM reads in flight */
            __builtin_prefetch(w + (o + T + t) * in + i, 0, 3);
            wv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + (o + t) * in + i);
        }
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * in + i);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[t], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) sums[r * T + t] = _mm512_reduce_add_ps(acc[r][t]);
}
#elif HAVE_AVX2_ONLY
typedef float xelem; /* x converted once to float32 */
#define XLANES 8

/* T outputs from o for R rows; each weight vector loaded once for the R rows. */
static inline __attribute__((always_inline)) void tile(const xelem *xf, int64_t in, const uint16_t *w, int64_t o,
                                                        const int R, const int T, float *sums) {
    __m256 acc[MAX_ROWS][MAX_TILE];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    const int64_t whole = in - in % 8;
    for (int64_t i = 0; i < whole; i += 8) {
        __m256 wv[MAX_TILE];
        if ((i & 31) == 0) /* the next tile's line at this offset: alone, one core keeps too few DRAM reads in flight */
            for (int t = 0; t < T; t++) __builtin_prefetch(w + (o + T + t) * in + i, 0, 3);
        for (int t = 0; t < T; t++) wv[t] = bf16x8(w + (o + t) * in + i);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_loadu_ps(xf + r * in + i);
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(wv[t], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = hsum8(acc[r][t]);
            for (int64_t i = whole; i < in; i++) s += bf16_to_f32(w[(o + t) * in + i]) * xf[r * in + i];
            sums[r * T + t] = s;
        }
}
#else
typedef float xelem; /* x converted once to float32 */
#define XLANES 16

static inline v16f load(const float *p) {
    v16f out;
    memcpy(&out, p, sizeof out);
    return out;
}

/* T outputs from o for R rows: R * T independent sums, so the FMA latency is hidden and each x vector loaded
 * serves T weight rows. */
static inline __attribute__((always_inline)) void tile(const xelem *xf, int64_t in, const uint16_t *w, int64_t o,
                                                        const int R, const int T, float *sums) {
    v16f acc[MAX_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = (v16f){0};
    const int64_t whole = in - in % 16;
    for (int64_t i = 0; i < whole; i += 16) {
        v16f wv[4];
        if ((i & 31) == 0) /* the next tile's line at this offset: alone, one core keeps too few DRAM reads in flight */
            for (int t = 0; t < T; t++) __builtin_prefetch(w + (o + T + t) * in + i, 0, 3);
        for (int t = 0; t < T; t++) wv[t] = widen16(w + (o + t) * in + i);
        for (int r = 0; r < R; r++) {
            const v16f xv = load(xf + r * in + i);
            for (int t = 0; t < T; t++) acc[r][t] += wv[t] * xv;
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = hsum(acc[r][t]);
            for (int64_t i = whole; i < in; i++) s += bf16_to_f32(w[(o + t) * in + i]) * xf[r * in + i];
            sums[r * T + t] = s;
        }
}
#endif

/* Outputs [first, last) (whole tiles of T, then one at a time) for R rows. */
static inline __attribute__((always_inline)) void outputs(const xelem *x, int64_t in, const uint16_t *w,
                                                           int64_t out, int64_t first, int64_t last,
                                                           const uint16_t *bias, void *y, int y_f32, const int R,
                                                           const int T) {
    for (int64_t o = first; o < last;) {
        float sums[MAX_ROWS * MAX_TILE];
        const int width = o + T <= last ? T : 1;
        if (width == T) tile(x, in, w, o, R, T, sums);
        else tile(x, in, w, o, R, 1, sums);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < width; t++) {
                const float b = bias ? bf16_to_f32(bias[o + t]) : 0.0f;
                const uint16_t h = f32_to_bf16(sums[r * width + t] + b);
                if (y_f32) ((float *)y)[r * out + o + t] = bf16_to_f32(h);
                else ((uint16_t *)y)[r * out + o + t] = h;
            }
        o += width;
    }
}

/* Outputs per tile for R rows, GEMV_T<R>. */
#if HAVE_AVX2_ONLY /* R x T fit AVX2's 16 registers: R * T sums, T weight vectors, one x vector. One row takes 8
                   * outputs (8 chains of FMAs, 8 weight streams): against 4, per matrix from DRAM 0.98-1.07x,
                   * small's LM head 1.05x (EPYC Milan, alternated in one process) */
enum { GEMV_T1 = 8, GEMV_T2 = 4, GEMV_T3 = 2, GEMV_T4 = 2, GEMV_T5 = 2, GEMV_T6 = 2, GEMV_T7 = 1, GEMV_T8 = 1 };
#else
enum { GEMV_T1 = 4, GEMV_T2 = 4, GEMV_T3 = 4, GEMV_T4 = 4, GEMV_T5 = 2, GEMV_T6 = 2, GEMV_T7 = 2, GEMV_T8 = 2 };
#endif

/* Outputs [first, last) of a linear for `rows` rows (1..MAX_ROWS): the switch gives every case constant R and T,
 * so the tile's loops unroll into registers. */
static inline void gemv_rows(const xelem *x, int64_t rows, int64_t in, const uint16_t *w, int64_t out, int64_t first,
                             int64_t last, const uint16_t *bias, void *y, int y_f32) {
    switch (rows) {
    case 1: outputs(x, in, w, out, first, last, bias, y, y_f32, 1, GEMV_T1); break;
    case 2: outputs(x, in, w, out, first, last, bias, y, y_f32, 2, GEMV_T2); break;
    case 3: outputs(x, in, w, out, first, last, bias, y, y_f32, 3, GEMV_T3); break;
    case 4: outputs(x, in, w, out, first, last, bias, y, y_f32, 4, GEMV_T4); break;
    case 5: outputs(x, in, w, out, first, last, bias, y, y_f32, 5, GEMV_T5); break;
    case 6: outputs(x, in, w, out, first, last, bias, y, y_f32, 6, GEMV_T6); break;
    case 7: outputs(x, in, w, out, first, last, bias, y, y_f32, 7, GEMV_T7); break;
    default: outputs(x, in, w, out, first, last, bias, y, y_f32, 8, GEMV_T8); break;
    }
}

/* This thread's share of `out` outputs: contiguous whole 4-output tiles, the remainder to the last thread. */
static inline void gemv_share(int64_t out, int64_t id, int64_t n, int64_t *first, int64_t *last) {
    const int64_t quads = out / 4;
    *first = quads * id / n * 4;
    *last = id == n - 1 ? out : quads * (id + 1) / n * 4;
}
#endif
