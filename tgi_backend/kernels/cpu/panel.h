/* A linear for many rows where bf16 has no native matmul (AVX2 and FMA, no AVX-512): y = x @ w.T with w bf16
 * packed in panels of 16 outputs, x widened to float32 once, float32 sums. Included by panel.c (packing, the
 * exported linear) and decoder.c (decode steps past the few-row kernel's rows).
 *
 * A panel holds its 16 outputs' weights input by input: 16 bf16 in one 32-byte line, the 32-bit lane j holding
 * output j in its high half and output j + 8 in its low half, so a mask and a shift make two float32 vectors of
 * 8 outputs. The micro-kernel keeps 6 rows x 16 outputs of sums in 12 registers: per input one load, two
 * integer ops, 6 broadcasts and 12 FMAs. A panel (16 x in bf16) stays in L1/L2 while the row blocks pass.
 * Against MKL's sgemm on float32 copies, per 128-output task (EPYC Milan, 2 threads): 16 / 32 / 128 rows
 * 1.7-1.9x / 1.4-1.5x / 1.16-1.22x, at 169-193 GFLOP/s, and half the bytes.
 */
#ifndef TGI_PANEL_H
#define TGI_PANEL_H
#include <stdint.h>

#include "avx2.h"

#define PANEL 16   /* outputs per panel */
#define PANEL_MR 6 /* rows per micro-kernel call */

/* w [out, in] bf16 row-major into panels [ceil(out / 16)][in][8] (uint32 lanes); outputs past `out` are zeros. */
static inline void panel_pack(const uint16_t *w, int64_t out, int64_t in, uint32_t *panel) {
    for (int64_t p = 0; p < (out + PANEL - 1) / PANEL; p++)
        for (int64_t k = 0; k < in; k++)
            for (int j = 0; j < PANEL / 2; j++) {
                const int64_t high = p * PANEL + j, low = high + PANEL / 2;
                const uint32_t h = high < out ? w[high * in + k] : 0, l = low < out ? w[low * in + k] : 0;
                panel[(p * in + k) * (PANEL / 2) + j] = (h << 16) | l;
            }
}

#if HAVE_AVX2_ONLY
/* y[r][0..16) = x[r] . the panel's 16 outputs, for MR rows (x [MR, in] float32, row stride in). */
static inline __attribute__((always_inline)) void panel_micro(const float *x, int64_t in, const uint32_t *panel,
                                                               const int MR, float *y, int64_t ldy) {
    __m256 acc[PANEL_MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = 0; k < in; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(panel + k * (PANEL / 2)));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_and_si256(v, high)), w1 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        for (int r = 0; r < MR; r++) {
            const __m256 b = _mm256_broadcast_ss(x + r * in + k);
            acc[r][0] = _mm256_fmadd_ps(w0, b, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, b, acc[r][1]);
        }
    }
    for (int r = 0; r < MR; r++) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}

/* Outputs [first, last) of x [rows, in] float32 @ w.T, w in panels (first a multiple of 16), as float32 sums
 * into y[r * ldy + o - first]; the last panel writes all its 16 columns (y has room up to a multiple of 16).
 * Past 128 rows they go in blocks of ~256 KB of x, each block through every panel: a prefill's x stays in L2
 * (a decode step's 128 rows in blocks: 0.976x). */
static inline void panel_outputs(const float *x, int64_t rows, int64_t in, const uint32_t *panel, int64_t first,
                                 int64_t last, float *y, int64_t ldy) {
    int64_t block = rows <= 128 ? rows : (256 << 10) / (in * (int64_t)sizeof(float)) / PANEL_MR * PANEL_MR;
    if (block < PANEL_MR) block = PANEL_MR;
    for (int64_t b = 0; b < rows; b += block) {
        const int64_t end = b + block < rows ? b + block : rows;
        for (int64_t o = first; o < last; o += PANEL) {
            const uint32_t *p = panel + (o / PANEL) * in * (PANEL / 2);
            float *dst = y + (o - first);
            int64_t r = b;
            for (; r + PANEL_MR <= end; r += PANEL_MR) panel_micro(x + r * in, in, p, PANEL_MR, dst + r * ldy, ldy);
            switch (end - r) { /* constant row counts: the sums stay in registers */
            case 5: panel_micro(x + r * in, in, p, 5, dst + r * ldy, ldy); break;
            case 4: panel_micro(x + r * in, in, p, 4, dst + r * ldy, ldy); break;
            case 3: panel_micro(x + r * in, in, p, 3, dst + r * ldy, ldy); break;
            case 2: panel_micro(x + r * in, in, p, 2, dst + r * ldy, ldy); break;
            case 1: panel_micro(x + r * in, in, p, 1, dst + r * ldy, ldy); break;
            default: break;
            }
        }
    }
}
#endif
#endif
