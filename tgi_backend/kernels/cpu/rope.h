/* Rotary embedding (rotate-half layout) on the q and k heads of one token of a packed qkv projection, in
 * place, and the rotated k and the v written to the token's cache slot. Shared by rope_store.c and decoder.c.
 * Rounded as PyTorch rounds x * cos + roll(x, dim / 2) * signed_sin in the tensors' dtype: each product and
 * the sum once each (bf16: float32 products of bf16 values are exact, then rounded; float32: no fused
 * multiply-add, so the products round as separate ops do, which needs the including file compiled with
 * fp-contract off: rope_store.c is; decoder.c runs bf16 only).
 */
#ifndef TGI_ROPE_H
#define TGI_ROPE_H
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_DIM 512

static inline __attribute__((always_inline)) float rotated(float x, float xr, float c, float s, const int bf16) {
    if (!bf16) return x * c + xr * s;
    const float a = bf16_to_f32(f32_to_bf16(x * c)), b = bf16_to_f32(f32_to_bf16(xr * s));
    return a + b;
}

/* row: the token's q | k | v heads; cos, sin: its [dim] (sin's first half negated); caches [slots, kv_heads,
 * dim]; slot checked by the caller. */
static inline __attribute__((always_inline)) void rope_token(void *row, const void *cos, const void *sin,
                                                              void *k_cache, void *v_cache, int64_t slot, int heads,
                                                              int kv_heads, int dim, const int bf16) {
    const int half = dim / 2, size = bf16 ? 2 : 4;
    const int64_t slot_elems = (int64_t)kv_heads * dim;
    float x[MAX_DIM], c[MAX_DIM], s[MAX_DIM], out[MAX_DIM];
    for (int i = 0; i < dim; i++) {
        c[i] = bf16 ? bf16_to_f32(((const uint16_t *)cos)[i]) : ((const float *)cos)[i];
        s[i] = bf16 ? bf16_to_f32(((const uint16_t *)sin)[i]) : ((const float *)sin)[i];
    }
    for (int h = 0; h < heads + kv_heads; h++) {
        char *head = (char *)row + (int64_t)h * dim * size;
        for (int i = 0; i < dim; i++) x[i] = bf16 ? bf16_to_f32(((const uint16_t *)head)[i]) : ((const float *)head)[i];
#pragma omp simd
        for (int i = 0; i < half; i++) out[i] = rotated(x[i], x[i + half], c[i], s[i], bf16);
#pragma omp simd
        for (int i = half; i < dim; i++) out[i] = rotated(x[i], x[i - half], c[i], s[i], bf16);
        if (bf16) {
            for (int i = 0; i < dim; i++) ((uint16_t *)head)[i] = f32_to_bf16(out[i]);
        } else {
            memcpy(head, out, sizeof(float) * (size_t)dim);
        }
        if (h >= heads) /* a k head: its cache row too */
            memcpy((char *)k_cache + (slot * slot_elems + (int64_t)(h - heads) * dim) * size, head, (size_t)dim * size);
    }
    memcpy((char *)v_cache + slot * slot_elems * size, (char *)row + (int64_t)(heads + kv_heads) * dim * size,
           (size_t)slot_elems * size);
}
#endif
