/* Rotary embedding on the q and k heads of a packed qkv projection, in place, and k and v written to their
 * cache slots (per token: rope.h): one pass per token where PyTorch runs ~10 ops (slices, muls, roll, add,
 * split, two index_copy).
 */
#pragma GCC optimize("fp-contract=off") /* float32: the products round as PyTorch's separate ops do */
#include <stdint.h>

#include "rope.h"

#define MIN_PARALLEL_ELEMENTS 65536 /* below this a fork-join costs more than the tokens */

static inline __attribute__((always_inline)) void rope_tokens(void *qkv, int64_t tokens, int64_t row_stride,
                                                               const void *cos, const void *sin, void *k_cache,
                                                               void *v_cache, const int64_t *slots, int heads,
                                                               int kv_heads, int dim, int threads, const int bf16) {
    const int size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) if (tokens * row_stride >= MIN_PARALLEL_ELEMENTS) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        rope_token((char *)qkv + t * row_stride * size, (const char *)cos + t * dim * size,
                   (const char *)sin + t * dim * size, k_cache, v_cache, slots[t], heads, kv_heads, dim, bf16);
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
