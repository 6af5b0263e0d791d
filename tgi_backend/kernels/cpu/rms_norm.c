/* RMSNorm with the residual add fused in, for the CPU: s = x + residual (rounded to the tensors' dtype, as
 * torch's add), y = weight * s / rms(s) computed in float32 and rounded once. bf16 or float32, rows contiguous.
 * One pass over each row where PyTorch's rms_norm runs ~8 ops (casts, pow, mean, rsqrt, muls) over the batch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MIN_PARALLEL_ELEMENTS 65536 /* below this a fork-join costs more than the rows */

static inline __attribute__((always_inline)) void norm_rows(const void *x, const void *residual, void *sum_out,
                                                             void *y, const void *weight, int64_t rows, int hidden,
                                                             float eps, int threads, const int bf16) {
#pragma omp parallel for num_threads(threads) if (rows * hidden >= MIN_PARALLEL_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float buf[hidden];
        const int64_t o = r * hidden;
        float ss = 0.0f;
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + o;
            if (residual) {
                const uint16_t *rr = (const uint16_t *)residual + o;
                uint16_t *sr = (uint16_t *)sum_out + o;
#pragma omp simd
                for (int i = 0; i < hidden; i++) {
                    const uint16_t s = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(rr[i]));
                    sr[i] = s;
                    buf[i] = bf16_to_f32(s);
                }
            } else {
#pragma omp simd
                for (int i = 0; i < hidden; i++) buf[i] = bf16_to_f32(xr[i]);
            }
        } else {
            const float *xr = (const float *)x + o;
            if (residual) {
                const float *rr = (const float *)residual + o;
                float *sr = (float *)sum_out + o;
#pragma omp simd
                for (int i = 0; i < hidden; i++) buf[i] = sr[i] = xr[i] + rr[i];
            } else {
                memcpy(buf, xr, sizeof(float) * (size_t)hidden);
            }
        }
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < hidden; i++) ss += buf[i] * buf[i];
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
        if (bf16) {
            const uint16_t *w = (const uint16_t *)weight;
            uint16_t *yr = (uint16_t *)y + o;
#pragma omp simd
            for (int i = 0; i < hidden; i++) yr[i] = f32_to_bf16(buf[i] * inv * bf16_to_f32(w[i]));
        } else {
            const float *w = (const float *)weight;
            float *yr = (float *)y + o;
#pragma omp simd
            for (int i = 0; i < hidden; i++) yr[i] = buf[i] * inv * w[i];
        }
    }
}

/* residual may be NULL (then sum_out is not written). Returns 0. */
int rms_norm_residual(const void *x, const void *residual, void *sum_out, void *y, const void *weight, int64_t rows,
                      int hidden, float eps, int threads, int bf16) {
    if (bf16) norm_rows(x, residual, sum_out, y, weight, rows, hidden, eps, threads, 1);
    else norm_rows(x, residual, sum_out, y, weight, rows, hidden, eps, threads, 0);
    return 0;
}
