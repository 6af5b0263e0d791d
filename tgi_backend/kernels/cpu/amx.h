/* A linear for a decode step's rows on AMX (Sapphire Rapids and later): y = x @ w.T (+ bias), bf16 in, float32
 * sums, y rounded to bf16 once. The weight is packed for the tiles ("VNNI": per block of 16 outputs x 32
 * inputs, 16 rows of 16 output pairs of inputs, 1 KB; `vnni_pack` in decoder.py), x is [rows, in] bf16 with its
 * rows padded to a multiple of 16 (zeros). Included by decoder.c; compiled to nothing without AMX-BF16.
 */
#ifndef TGI_AMX_H
#define TGI_AMX_H
#include <stdint.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
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

/* Outputs [n0, n0 + 32) (or the last 16) of y [rows, out] for every row: x [padded, in] with padded a multiple
 * of 16 and in of 32, w packed by vnni_pack ([out / 16][in / 32][16][16][2]). Rows in pairs of 16-row tiles,
 * each pair against the chunk's one or two 16-output weight blocks. y: bf16, or (y_f32) float32 holding the
 * same bf16 values (the LM head's logits). */
static inline void amx_chunk(const uint16_t *x, int64_t rows, int64_t padded, int64_t in, const uint16_t *w,
                             int64_t out, int64_t n0, const uint16_t *bias, void *y, int y_f32) {
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
            for (int64_t m = 0; m < 16 && r0 + m < rows; m++)
                for (int n = 0; n < 16; n++) {
                    const float b = bias ? bf16_to_f32(bias[o0 + n]) : 0.0f;
                    const uint16_t h = f32_to_bf16(c[t][m][n] + b);
                    if (y_f32) ((float *)y)[(r0 + m) * out + o0 + n] = bf16_to_f32(h);
                    else ((uint16_t *)y)[(r0 + m) * out + o0 + n] = h;
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
                             int64_t out, int64_t n0, const uint16_t *bias, void *y, int y_f32) {
    (void)x, (void)rows, (void)padded, (void)in, (void)w, (void)out, (void)n0, (void)bias, (void)y, (void)y_f32;
}
#endif
#endif
