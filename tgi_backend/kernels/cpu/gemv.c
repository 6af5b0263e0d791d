/* The linear for a few rows, for the CPU: the shared code is in gemv.h. */
#include <omp.h>

#include "gemv.h"

/* x: [rows, in] bf16, w: [out, in] bf16, bias: [out] bf16 or NULL, y: [rows, out] bf16 (y_f32 = 0) or float32.
 * Returns 0; -1 for rows outside 1..MAX_ROWS; -2 when the float32 copy of x cannot be allocated. */
int linear_bf16(const uint16_t *x, int64_t rows, int64_t in, const uint16_t *w, int64_t out, const uint16_t *bias,
                void *y, int y_f32, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
#ifdef __AVX512BF16__
    const xelem *xs = x;
#else
    float *xf = malloc(sizeof(float) * (size_t)(rows * in));
    if (!xf) return -2;
    for (int64_t i = 0; i < rows * in; i++) xf[i] = bf16_to_f32(x[i]);
    const xelem *xs = xf;
#endif
    if (out * in < MIN_PARALLEL_WEIGHTS) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int64_t first, last;
        gemv_share(out, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        gemv_rows(xs, rows, in, w, out, first, last, bias, y, y_f32);
    }
#ifndef __AVX512BF16__
    free(xf);
#endif
    return 0;
}

/* 1 where this build has gemv.h's AVX2 tiles (an AVX2 CPU without AVX-512). */
int avx2_tiles(void) {
#if HAVE_AVX2_ONLY
    return 1;
#else
    return 0;
#endif
}
