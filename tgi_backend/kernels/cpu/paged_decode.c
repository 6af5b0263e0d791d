/* Decode attention straight from the paged KV cache, for the CPU (the work items are paged_decode.h's). */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "paged_decode.h"

static int run(const Problem *p, int threads, int max_len, int bf16) {
    const size_t per_thread = (size_t)(p->heads / p->kv_heads) * (size_t)(max_len > 0 ? max_len : 1); /* one row's scores */
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)(threads > 0 ? threads : 1));
    if (!scratch) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *s = scratch + per_thread * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic, items_per_task(p->rows, p->kv_heads))
        for (int64_t w = 0; w < (int64_t)p->rows * p->kv_heads; w++)
            attend_item(p, (int)(w / p->kv_heads), (int)(w % p->kv_heads), s, bf16);
    }
    free(scratch);
    return 0;
}

/* Returns 0; -1 for a shape this kernel does not take (the caller checks first), -2 when out of memory. */
int paged_decode(const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache, const int64_t *table,
                 int64_t table_row_stride, const int64_t *positions, void *out, int rows, int heads, int kv_heads,
                 int dim, int block_size, int window, float scale, int threads, int max_len, int bf16) {
    if (attention_shape_ok(heads, kv_heads, dim)) return -1;
    const Problem p = {q, k_cache, v_cache, table, positions, out, q_row_stride, table_row_stride,
                       rows, heads, kv_heads, dim, block_size, window, scale};
    return run(&p, threads, max_len, bf16);
}
