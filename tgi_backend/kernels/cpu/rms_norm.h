/* RMSNorm of one row with the residual add fused in: s = x + residual (rounded to the tensors' dtype, as
 * torch's add), y = weight * s / rms(s) computed in float32 and rounded once. Shared by rms_norm.c and
 * decoder.c. sum_out may be residual itself (each element is read before it is written). */
#ifndef TGI_RMS_NORM_H
#define TGI_RMS_NORM_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline __attribute__((always_inline)) void norm_row(const void *x, const void *residual, void *sum_out,
                                                            void *y, const void *weight, int hidden, float eps,
                                                            const int bf16) {
    float buf[hidden];
    float ss = 0.0f;
    if (bf16) {
        const uint16_t *xr = (const uint16_t *)x;
        if (residual) {
            const uint16_t *rr = (const uint16_t *)residual;
            uint16_t *sr = (uint16_t *)sum_out;
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
        const float *xr = (const float *)x;
        if (residual) {
            const float *rr = (const float *)residual;
            float *sr = (float *)sum_out;
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
        uint16_t *yr = (uint16_t *)y;
#pragma omp simd
        for (int i = 0; i < hidden; i++) yr[i] = f32_to_bf16(buf[i] * inv * bf16_to_f32(w[i]));
    } else {
        const float *w = (const float *)weight;
        float *yr = (float *)y;
#pragma omp simd
        for (int i = 0; i < hidden; i++) yr[i] = buf[i] * inv * w[i];
    }
}
#endif
