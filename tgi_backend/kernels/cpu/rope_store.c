/* Rotary embedding (rotate-half layout) on the q and k heads of a packed qkv projection, in place, and the
 * rotated k and the v of each token written to its cache slot: one pass per token where PyTorch runs ~10 ops
 * (slices, muls, roll, add, split, two index_copy).
 * Rounded as PyTorch rounds x * cos + roll(x, dim / 2) * signed_sin in the tensors' dtype: each product and
 * the sum once each (bf16: float32 products of bf16 values are exact, then rounded; float32: no fused
 * multiply-add, so the products round as separate ops do).
 */
#pragma GCC optimize("fp-contract=off")
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_DIM 512
#define MIN_PARALLEL_ELEMENTS 65536 /* below this a fork-join costs more than the tokens */

static inline __attribute__((always_inline)) float rotated(float x, float xr, float c, float s, const int bf16) {
    if (!bf16) return x * c + xr * s;
    const float a = bf16_to_f32(f32_to_bf16(x * c)), b = bf16_to_f32(f32_to_bf16(xr * s));
    return a + b;
}

static inline __attribute__((always_inline)) void rope_tokens(void *qkv, int64_t tokens, int64_t row_stride,
                                                               const void *cos, const void *sin, void *k_cache,
                                                               void *v_cache, const int64_t *slots, int heads,
                                                               int kv_heads, int dim, int threads, const int bf16) {
    const int half = dim / 2, size = bf16 ? 2 : 4;
    const int64_t slot_elems = (int64_t)kv_heads * dim;
#pragma omp parallel for num_threads(threads) if (tokens * row_stride >= MIN_PARALLEL_ELEMENTS) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        float x[MAX_DIM], c[MAX_DIM], s[MAX_DIM], out[MAX_DIM];
        char *row = (char *)qkv + t * row_stride * size;
        for (int i = 0; i < dim; i++) {
            c[i] = bf16 ? bf16_to_f32(((const uint16_t *)cos)[t * dim + i]) : ((const float *)cos)[t * dim + i];
            s[i] = bf16 ? bf16_to_f32(((const uint16_t *)sin)[t * dim + i]) : ((const float *)sin)[t * dim + i];
        }
        for (int h = 0; h < heads + kv_heads; h++) {
            char *head = row + (int64_t)h * dim * size;
            for (int i = 0; i < dim; i++)
                x[i] = bf16 ? bf16_to_f32(((const uint16_t *)head)[i]) : ((const float *)head)[i];
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
                memcpy((char *)k_cache + (slots[t] * slot_elems + (int64_t)(h - heads) * dim) * size, head,
                       (size_t)dim * size);
        }
        memcpy((char *)v_cache + slots[t] * slot_elems * size, row + (int64_t)(heads + kv_heads) * dim * size,
               (size_t)slot_elems * size);
    }
}

/* qkv: [tokens, row_stride] with q | k | v heads from column 0; cos, sin (sin's first half negated): [tokens,
 * dim]; caches: [num_slots, kv_heads, dim] contiguous. Returns 0; -1 for an odd or too large dim; -3 for a
 * slot outside [0, num_slots) (nothing written). */
int rope_store(void *qkv, int64_t tokens, int64_t row_stride, const void *cos, const void *sin, void *k_cache,
               void *v_cache, const int64_t *slots, int64_t num_slots, int heads, int kv_heads, int dim,
               int threads, int bf16) {
    if (dim % 2 || dim > MAX_DIM || dim < 2) return -1;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -3;
    if (bf16) rope_tokens(qkv, tokens, row_stride, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim, threads, 1);
    else rope_tokens(qkv, tokens, row_stride, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim, threads, 0);
    return 0;
}
