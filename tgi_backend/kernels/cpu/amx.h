/* A linear for a decode step's rows on AMX (Sapphire Rapids and later): y = x @ w.T (+ bias), bf16 in, float32
 * sums, y rounded to bf16 once. The weight is packed for the tiles ("VNNI": per block of 16 outputs x 32
 * inputs, 16 rows of 16 output pairs of inputs, 1 KB; `vnni_pack` in decoder.py), x is [rows, in] bf16 with its
 * rows padded to a multiple of 16 (zeros). Included by decoder.c; compiled to nothing without AMX-BF16.
 */
#ifndef TGI_AMX_H
#define TGI_AMX_H
#include <stdint.h>

#include "bf16.h"

#define AMX_OUTPUTS 32 /* outputs per amx_chunk call: two 16-output weight blocks */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HAVE_AMX 1
#define AMX_PREFETCH 2 /* K steps ahead */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Linux hands AMX's tile state to a process that asks (oneDNN asks too; asking twice is harmless). */
static inline int amx_permitted(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Tiles 0-3: sums (16 rows x 16 floats); 4-5: x (16 rows x 32 bf16); 6-7: weights (16 pairs x 16 outputs).
 * The configuration is per thread: each thread that runs amx_chunk loads it first, and releases it after. */
static inline void amx_configure(void) {
    TileConfig c = {0};
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    /* gcc 12 may drop these stores as dead (seen in a test program at -O2: ldtilecfg then faulted on zeros) */
    __asm__ volatile("" : : "m"(c) : "memory");
    _tile_loadconfig(&c);
}

static inline void amx_release(void) { _tile_release(); }

/* 16 bf16 -> 16 floats. */
static inline __m512 amx_widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 floats rounded to bf16 as f32_to_bf16 does (nearest even, NaN stays NaN), each in its lane's low half:
 * the epilogue of every tile stored, 16 at a time rather than one (vcvtneps2bf16 would flush denormals). */
static inline __m512i amx_round(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                   _mm512_set1_epi32(0x7f800000));
    const __m512i r = _mm512_srli_epi32(up, 16);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* A row's running first maximum per lane (best[16], at[16]: value and output index; at INT32_MAX while empty)
 * given 16 more outputs from o0: argmax's rule, a NaN counts as the maximum and the first one wins; the lower
 * index wins a tie whatever order the chunks come in. */
static inline void amx_argmax_update(__m512 v, int64_t o0, float *best, int32_t *at) {
    const __m512 b = _mm512_loadu_ps(best);
    const __m512i i = _mm512_loadu_si512(at);
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int32_t)o0),
                                         _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const __mmask16 earlier = _mm512_cmplt_epi32_mask(idx, i);
    const __mmask16 vnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), bnan = _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    const __mmask16 take = _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) | (_mm512_cmp_ps_mask(v, b, _CMP_EQ_OQ) & earlier) |
                           (vnan & (~bnan | earlier));
    _mm512_storeu_ps(best, _mm512_mask_mov_ps(b, take, v));
    _mm512_storeu_si512(at, _mm512_mask_mov_epi32(i, take, idx));
}

/* Outputs [n0, n0 + 32) (or the last 16) of y [rows, out] for every row: x [padded, in] with padded a multiple
 * of 16 and in of 32, w packed by vnni_pack ([out / 16][in / 32][16][16][2]). Rows in pairs of 16-row tiles,
 * each pair against the chunk's one or two 16-output weight blocks. y: bf16, or (y_f32) float32 holding the
 * same bf16 values (the LM head's logits), or NULL (only the argmax). best/at (or NULL): each row's lanes for
 * amx_argmax_update, [rows][16], fed from the registers: a greedy step writes no logits nor reads them back. */
static inline void amx_chunk(const uint16_t *x, int64_t rows, int64_t padded, int64_t in, const uint16_t *w,
                             int64_t out, int64_t n0, const uint16_t *bias, void *y, int y_f32, float *best,
                             int32_t *at) {
    const int64_t kb = in / 32, stride = in * 2;
    const int two = n0 + 32 <= out;
    const uint16_t *b0 = w + (n0 / 16) * kb * 512, *b1 = b0 + kb * 512;
    float c[4][16][16];
    for (int64_t m0 = 0; m0 < padded; m0 += 32) {
        const int lower = m0 + 16 < padded; /* a second 16-row tile */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < kb; k++) {
            if (m0 == 0 && k + AMX_PREFETCH < kb) /* the weights of a later step: a tile load waits on DRAM */
                for (int line = 0; line < 16; line++) {
                    __builtin_prefetch(b0 + (k + AMX_PREFETCH) * 512 + line * 32, 0, 3);
                    if (two) __builtin_prefetch(b1 + (k + AMX_PREFETCH) * 512 + line * 32, 0, 3);
                }
            _tile_loadd(4, x + m0 * in + k * 32, stride);
            _tile_loadd(6, b0 + k * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (two) {
                _tile_loadd(7, b1 + k * 512, 64);
                _tile_dpbf16ps(1, 4, 7);
            }
            if (lower) {
                _tile_loadd(5, x + (m0 + 16) * in + k * 32, stride);
                _tile_dpbf16ps(2, 5, 6);
                if (two) _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, c[0], 64);
        if (two) _tile_stored(1, c[1], 64);
        if (lower) {
            _tile_stored(2, c[2], 64);
            if (two) _tile_stored(3, c[3], 64);
        }
        for (int t = 0; t < 4; t++) {
            const int64_t r0 = m0 + (t >> 1) * 16, o0 = n0 + (t & 1) * 16;
            if ((t & 1 && !two) || (t >> 1 && !lower)) continue;
            const __m512 b = bias ? amx_widen(_mm256_loadu_si256((const __m256i *)(bias + o0))) : _mm512_setzero_ps();
            for (int64_t m = 0; m < 16 && r0 + m < rows; m++) {
                const __m512i u = amx_round(_mm512_add_ps(_mm512_loadu_ps(c[t][m]), b));
                if (!y) {
                } else if (y_f32) {
                    _mm512_storeu_si512((float *)y + (r0 + m) * out + o0, _mm512_slli_epi32(u, 16));
                } else {
                    _mm256_storeu_si256((__m256i *)((uint16_t *)y + (r0 + m) * out + o0), _mm512_cvtepi32_epi16(u));
                }
                if (best) amx_argmax_update(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), o0, best + (r0 + m) * 16,
                                            at + (r0 + m) * 16);
            }
        }
    }
}
#else
#define HAVE_AMX 0
static inline int amx_permitted(void) { return 0; }
static inline void amx_configure(void) {}
static inline void amx_release(void) {}
static inline void amx_chunk(const uint16_t *x, int64_t rows, int64_t padded, int64_t in, const uint16_t *w,
                             int64_t out, int64_t n0, const uint16_t *bias, void *y, int y_f32, float *best,
                             int32_t *at) {
    (void)x, (void)rows, (void)padded, (void)in, (void)w, (void)out, (void)n0, (void)bias, (void)y, (void)y_f32;
    (void)best, (void)at;
}
#endif
#endif
