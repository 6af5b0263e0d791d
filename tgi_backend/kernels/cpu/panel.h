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
#include "bf16.h"

#define PANEL 16   /* outputs per panel */
#define PANEL_MR 6 /* rows per micro-kernel call, at most (panel_call_rows) */

/* Rows' running first maxima, [rows][16] lanes: panel_linear's argmax (the LM head's greedy tokens). */
typedef struct {
    float *best;
    int32_t *at; /* output index of best; INT32_MAX while the lane is empty */
} PanelBest;

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
/* 8 more outputs (v: their bf16 values as float32, at indices idx; ok: the lanes that are outputs) into a row's
 * running first maximum per lane (best/at; at INT32_MAX while empty): amx_argmax_update's rule on AVX2. */
static inline void panel_argmax8(__m256 v, __m256i idx, __m256i ok, float *best, int32_t *at) {
    const __m256 b = _mm256_loadu_ps(best);
    const __m256i i = _mm256_loadu_si256((const __m256i *)at);
    const __m256 earlier = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, idx));
    const __m256 vnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q), bnum = _mm256_cmp_ps(b, b, _CMP_ORD_Q);
    __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, b, _CMP_GT_OQ),
                               _mm256_and_ps(_mm256_cmp_ps(v, b, _CMP_EQ_OQ), earlier));
    take = _mm256_and_ps(_mm256_or_ps(take, _mm256_and_ps(vnan, _mm256_or_ps(bnum, earlier))), _mm256_castsi256_ps(ok));
    _mm256_storeu_ps(best, _mm256_blendv_ps(b, v, take));
    _mm256_storeu_si256((__m256i *)at, _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i),
                                                                            _mm256_castsi256_ps(idx), take)));
}

/* A row's 16 sums of the panel from output o (`valid` of them outputs), biased and rounded to bf16 as the logits
 * are, into its running first maxima (best/at [16]): the greedy token without the logits. */
static inline void panel_argmax16(__m256 low, __m256 high, const uint16_t *bias, int64_t o, int64_t valid,
                                  float *best, int32_t *at) {
    uint16_t part[PANEL] = {0};
    if (bias && valid < PANEL)
        for (int64_t j = 0; j < valid; j++) part[j] = bias[j];
    const uint16_t *b = valid < PANEL ? part : bias;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), end = _mm256_set1_epi32((int32_t)(o + valid));
    for (int h = 0; h < 2; h++) {
        const __m256 s = _mm256_add_ps(h ? high : low, bias ? bf16x8(b + 8 * h) : _mm256_setzero_ps());
        const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(round_bf16x8(s)), 16));
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(o + 8 * h)), lane);
        panel_argmax8(v, idx, _mm256_cmpgt_epi32(end, idx), best + 8 * h, at + 8 * h);
    }
}

/* The matrix's last `valid` (< 16) outputs of a row, biased and rounded one by one. */
static __attribute__((noinline)) void panel_store_part(__m256 low, __m256 high, const uint16_t *bias, uint16_t *yb,
                                                        int64_t valid) {
    float f[PANEL];
    _mm256_storeu_ps(f, low);
    _mm256_storeu_ps(f + 8, high);
    for (int64_t j = 0; j < valid; j++) yb[j] = f32_to_bf16(f[j] + (bias ? bf16_to_f32(bias[j]) : 0.0f));
}

/* The panel's 16 outputs (o .. o + 16, `valid` of them) for MR rows (x [MR, in] float32, row stride in): with pb,
 * x . w + bias rounded to bf16 into the rows' running first maxima (pb's rows from the first); with yb, into
 * yb[r * ldy + 0 .. valid) (bias bf16 or NULL); else the float32 sums into y[r * ldy + 0 .. 16). */
static inline __attribute__((always_inline)) void panel_micro(const float *x, int64_t in, const uint32_t *panel,
                                                               const int MR, const int ahead, float *y, uint16_t *yb,
                                                               const uint16_t *bias, int64_t ldy, int64_t valid,
                                                               const PanelBest *pb, int64_t o) {
    __m256 acc[PANEL_MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = 0; k < in; k++) {
        if (ahead && (k & 1) == 0) __builtin_prefetch(panel + (k + 128) * (PANEL / 2), 0, 3);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(panel + k * (PANEL / 2)));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        for (int r = 0; r < MR; r++) {
            const __m256 b = _mm256_broadcast_ss(x + r * in + k);
            acc[r][0] = _mm256_fmadd_ps(w0, b, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, b, acc[r][1]);
        }
    }
    if (pb) {
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++)
            panel_argmax16(acc[r][0], acc[r][1], bias, o, valid, pb->best + r * 16, pb->at + r * 16);
        return;
    }
    if (y) {
#pragma GCC unroll 8 /* as below: rolled, GCC kept the sums in memory at every input (4 of 6 row counts) */
        for (int r = 0; r < MR; r++) {
            _mm256_storeu_ps(y + r * ldy, acc[r][0]);
            _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
        }
        return;
    }
    if (!yb) return; /* no destination (never asked): each branch tests its own, so no clone stores to NULL */
    const __m256 b0 = bias && valid == PANEL ? bf16x8(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias && valid == PANEL ? bf16x8(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8 /* whole: an acc[r] indexed at run time put every sum in memory at every input (2x slower) */
    for (int r = 0; r < MR; r++) {
        if (valid == PANEL) {
            _mm_storeu_si128((__m128i *)(yb + r * ldy), round_bf16x8(_mm256_add_ps(acc[r][0], b0)));
            _mm_storeu_si128((__m128i *)(yb + r * ldy + 8), round_bf16x8(_mm256_add_ps(acc[r][1], b1)));
        } else {
            panel_store_part(acc[r][0], acc[r][1], bias, yb + r * ldy, valid);
        }
    }
}

/* panel_outputs for one or two rows, which read the panels from DRAM: each line asked for 4 KB ahead. Small
 * model's fused step, alternated in one process: 1 / 2 rows 1.12x / 1.17x, medium 1.09x / 1.15x (64 or 256
 * inputs ahead: the same). Its own function: inlined with the wider rows' code, it cost those 4-6%; asked for
 * at every row count, 8 and 32 rows lost 5-8%. */
static __attribute__((noinline)) void panel_outputs_ahead(const float *x, int64_t rows, int64_t in,
                                                          const uint32_t *panel, int64_t first, int64_t last, float *y,
                                                          uint16_t *yb, const uint16_t *bias, int64_t ldy,
                                                          const PanelBest *pb) {
    for (int64_t o = first; o < last; o += PANEL) {
        const uint32_t *p = panel + (o / PANEL) * in * (PANEL / 2);
        const int64_t valid = last - o < PANEL ? last - o : PANEL, at = o - first;
        float *yo = y ? y + at : NULL;
        uint16_t *ybo = yb ? yb + at : NULL;
        if (rows == 1) panel_micro(x, in, p, 1, 1, yo, ybo, bias ? bias + o : NULL, ldy, valid, pb, o);
        else panel_micro(x, in, p, 2, 1, yo, ybo, bias ? bias + o : NULL, ldy, valid, pb, o);
    }
}

/* Rows computed together through every panel: all of a decode step's (in blocks, 128 rows ran 0.976x), past 128
 * blocks of ~256 KB of x, so that a prefill's x stays in L2. */
static inline int64_t panel_row_block(int64_t rows, int64_t in) {
    const int64_t block = rows <= 128 ? rows : (256 << 10) / (in * (int64_t)sizeof(float)) / PANEL_MR * PANEL_MR;
    return block < PANEL_MR ? PANEL_MR : block;
}

/* Rows a micro-kernel call takes when `left` rows remain: 6 while more than 9 remain (bar 13: 5 + 4 + 4), then
 * 4s and 5s. A call of 1-3 rows waits on the FMAs' latency (~3.7 cycles an input whatever its rows, against
 * ~0.94 a row at 4-6; EPYC Milan, one core): 32 rows as 6 x 4 + 4 + 4 take 30.2 cycles an input, 6 x 5 + 2 32. */
static inline int panel_call_rows(int64_t left) {
    if (left <= 6) return (int)left;
    if (left == 7 || left == 8) return 4;
    if (left == 9 || left == 13) return 5;
    return PANEL_MR;
}

/* Rows [0, rows) of x (row stride in) through one panel p, outputs o .. o + 16 (`valid` of them), panel_call_rows
 * rows a call (a constant count each: the sums stay in registers): panel_micro's destinations, row 0's. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t rows, int64_t in, const uint32_t *p,
                                                              float *y, uint16_t *yb, const uint16_t *bias, int64_t ldy,
                                                              int64_t valid, const PanelBest *pb, int64_t o) {
#define PANEL_CALL(MR)                                                                                          \
    panel_micro(x + r * in, in, p, MR, 0, y ? y + r * ldy : NULL, yb ? yb + r * ldy : NULL, bias, ldy, valid,     \
                pb ? &(PanelBest){pb->best + r * 16, pb->at + r * 16} : NULL, o)
    for (int64_t r = 0; r < rows;) {
        const int n = panel_call_rows(rows - r);
        switch (n) {
        case 6: PANEL_CALL(6); break;
        case 5: PANEL_CALL(5); break;
        case 4: PANEL_CALL(4); break;
        case 3: PANEL_CALL(3); break;
        case 2: PANEL_CALL(2); break;
        default: PANEL_CALL(1); break;
        }
        r += n;
    }
#undef PANEL_CALL
}

/* Outputs [first, last) of x [rows, in] float32 @ w.T, w in panels (first a multiple of 16): with pb (y and yb
 * NULL), biased and rounded to bf16 into the rows' running first maxima (pb [rows][16]); with yb, into
 * yb[r * ldy + o - first]; else the float32 sums into y[r * ldy + o - first], the last panel writing all its 16
 * columns (y has room up to a multiple of 16). Rows in blocks of panel_row_block. */
static inline void panel_outputs(const float *x, int64_t rows, int64_t in, const uint32_t *panel, int64_t first,
                                 int64_t last, float *y, uint16_t *yb, const uint16_t *bias, int64_t ldy,
                                 const PanelBest *pb) {
    if (rows <= 2) {
        panel_outputs_ahead(x, rows, in, panel, first, last, y, yb, bias, ldy, pb);
        return;
    }
    const int64_t block = panel_row_block(rows, in);
    for (int64_t b = 0; b < rows; b += block) {
        const int64_t n = b + block < rows ? block : rows - b;
        for (int64_t o = first; o < last; o += PANEL) {
            const int64_t valid = last - o < PANEL ? last - o : PANEL, at = b * ldy + o - first;
            const PanelBest *rows_pb = pb ? &(PanelBest){pb->best + b * 16, pb->at + b * 16} : NULL;
            panel_rows(x + b * in, n, in, panel + (o / PANEL) * in * (PANEL / 2), y ? y + at : NULL,
                       yb ? yb + at : NULL, bias ? bias + o : NULL, ldy, valid, rows_pb, o);
        }
    }
}
#endif
#endif
