/* RMSNorm with the residual add fused in, for the CPU (the row is rms_norm.h's): bf16 or float32, rows
 * contiguous. One pass over each row where PyTorch's rms_norm runs ~8 ops (casts, pow, mean, rsqrt, muls) over
 * the batch.
 */
#include <stdint.h>

#include "rms_norm.h"

#define MIN_PARALLEL_ELEMENTS 65536 /* below this a fork-join costs more than the rows */

static inline __attribute__((always_inline)) void norm_rows(const void *x, const void *residual, void *sum_out,
                                                             void *y, const void *weight, int64_t rows, int hidden,
                                                             float eps, int threads, const int bf16) {
    const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) if (rows * hidden >= MIN_PARALLEL_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * hidden * size;
        norm_row((const char *)x + o, residual ? (const char *)residual + o : NULL,
                 residual ? (char *)sum_out + o : NULL, (char *)y + o, weight, hidden, eps, bf16);
    }
}

/* residual may be NULL (then sum_out is not written). Returns 0. */
int rms_norm_residual(const void *x, const void *residual, void *sum_out, void *y, const void *weight, int64_t rows,
                      int hidden, float eps, int threads, int bf16) {
    if (bf16) norm_rows(x, residual, sum_out, y, weight, rows, hidden, eps, threads, 1);
    else norm_rows(x, residual, sum_out, y, weight, rows, hidden, eps, threads, 0);
    return 0;
}
