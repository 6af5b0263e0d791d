/* A linear for a decode step's rows on AVX2 without AVX-512 (EPYC Milan, Haswell to Alder Lake): y = x @ w.T
 * (+ bias), x float32 (widened once per phase), w bf16 packed per block of 16 outputs as [out / 16][in][16]
 * (`panel_pack` in decoder.py: within a block the outputs in PANEL_ORDER, so that one unpack per half widens
 * them to float32 in order), float32 sums, y rounded to bf16 once. A block is widened to float32 once, then
 * read from L1/L2 by PANEL_ROWS rows at a time (a 6 x 16 tile of sums in 12 registers, as BLIS's Haswell
 * kernel). Included by decoder.c; compiled to nothing elsewhere. */
#ifndef TGI_PANEL_H
#define TGI_PANEL_H
#include <stdint.h>

#include "avx2.h"
#include "bf16.h"

#define PANEL_OUTPUTS 32 /* outputs per panel_chunk call, as AMX_OUTPUTS */

#if HAVE_AVX2_ONLY
#define HAVE_PANEL 1
#define PANEL_ROWS 6

/* Sums of rows [0, R) of xf against one block widened to float32 (wf: [in][16]) into sums[r][16]; 12 sums,
 * 2 weight vectors and x's broadcast fill 15 of the 16 registers (local: through a pointer they went to memory). */
static inline __attribute__((always_inline)) void panel_rows(const float *xf, int64_t in, const float *wf,
                                                              const int R, float sums[PANEL_ROWS][16]) {
    __m256 acc[PANEL_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        const __m256 w0 = _mm256_loadu_ps(wf + k * 16), w1 = _mm256_loadu_ps(wf + k * 16 + 8);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_broadcast_ss(xf + r * in + k);
            acc[r][0] = _mm256_fmadd_ps(w0, xv, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, xv, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(sums[r], acc[r][0]);
        _mm256_storeu_ps(sums[r] + 8, acc[r][1]);
    }
}

/* One block (16 outputs) of the packed weight to float32, in output order: once per block and call, the rows
 * then reading it from L1/L2 (widening it per row group took 2 of every 14 vector ops). */
static inline void panel_widen(const uint16_t *wb, int64_t in, float *wf) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k = 0; k < in; k++) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(wb + k * 16));
        _mm256_storeu_ps(wf + k * 16, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h))); /* a float's top half */
        _mm256_storeu_ps(wf + k * 16 + 8, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h)));
    }
}

/* Outputs [n0, n0 + PANEL_OUTPUTS) of every row: y bf16, or (y_f32) float32 holding bf16 values; wf: scratch
 * of in * 16 floats. */
static inline void panel_chunk(const float *xf, int64_t rows, int64_t in, const uint16_t *w, int64_t out, int64_t n0,
                               const uint16_t *bias, void *y, int y_f32, float *wf) {
    for (int64_t b = n0; b < n0 + PANEL_OUTPUTS && b < out; b += 16) {
        panel_widen(w + b * in, in, wf);
        for (int64_t r0 = 0; r0 < rows; r0 += PANEL_ROWS) {
            float sums[PANEL_ROWS][16];
            const float *x = xf + r0 * in;
            const int R = rows - r0 < PANEL_ROWS ? (int)(rows - r0) : PANEL_ROWS;
            switch (R) { /* constant R: the sums stay in registers */
            case 1: panel_rows(x, in, wf, 1, sums); break;
            case 2: panel_rows(x, in, wf, 2, sums); break;
            case 3: panel_rows(x, in, wf, 3, sums); break;
            case 4: panel_rows(x, in, wf, 4, sums); break;
            case 5: panel_rows(x, in, wf, 5, sums); break;
            default: panel_rows(x, in, wf, 6, sums); break;
            }
            for (int r = 0; r < R; r++) {
                for (int t = 0; t < 16; t++) {
                    const uint16_t v = f32_to_bf16(sums[r][t] + (bias ? bf16_to_f32(bias[b + t]) : 0.0f));
                    if (y_f32) ((float *)y)[(r0 + r) * out + b + t] = bf16_to_f32(v);
                    else ((uint16_t *)y)[(r0 + r) * out + b + t] = v;
                }
            }
        }
    }
}
#else
#define HAVE_PANEL 0
static inline void panel_chunk(const float *xf, int64_t rows, int64_t in, const uint16_t *w, int64_t out, int64_t n0,
                               const uint16_t *bias, void *y, int y_f32, float *wf) {
    (void)xf, (void)rows, (void)in, (void)w, (void)out, (void)n0, (void)bias, (void)y, (void)y_f32, (void)wf;
}
#endif
#endif
