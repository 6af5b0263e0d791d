/* One decode-attention item (row r, KV head h) for bf16 caches on AVX2 without AVX-512: included by
 * paged_decode.h once per (group, head vectors) ITEM_G, ITEM_NV, as item_avx2_<G>_<NV>. item()'s v16f arrays,
 * sized by its parameters, are variable-length arrays that GCC keeps in memory, and each v16f takes two of
 * AVX2's 16 registers: there small model's attention took 10 of a 47 ms step at 32 rows (EPYC Milan). Here the
 * sizes are constants and the loops keep their sums in registers: a key's G scores from 2 sums per head (even
 * and odd 8-dim vectors), four heads' reduced together; the values, 16 dims at a time over the keys (2 x G
 * sums). Same softmax series as item(), on AVX2's vectors; the sums run in another order, so the last bits
 * differ from item()'s (the op and the fused step both take this copy, so their bits agree).
 * Prefetch: each key of the scores asks for its value and for the key two blocks on (one a key, no bursts).
 * Against one block three ahead asked at every block, with the generic vectors' softmax and a reduction a head
 * (the op alone, small model's shape, 8 layers of caches, alternated processes): 128 rows of 192 keys 10.3-11.4
 * -> 6.8-7.1 ms, 32 rows 2.2-2.4 -> 1.5 ms; the fused 128-row step 42.8-44.6 -> 40.3-40.8 ms.
 */
static void ITEM_COPY(ITEM_G, ITEM_NV)(const Problem *p, int r, int h, float *s) {
    enum { G = ITEM_G, NY = 2 * ITEM_NV }; /* NY vectors of 8 dims a head */
    const uint16_t *K = (const uint16_t *)p->k_cache, *V = (const uint16_t *)p->v_cache;
    const int64_t token_stride = (int64_t)p->kv_heads * p->dim;
    const int bs = p->block_size;
    int64_t start;
    const int64_t *table;
    const int64_t end = item_keys(p, r, &start, &table);
    const int n = (int)(end - start);
    prefetch_block(p->k_cache, table[start / bs], p, h, 1); /* the first two blocks: no key before asked */
    if ((start / bs + 1) * bs < end) prefetch_block(p->k_cache, table[start / bs + 1], p, h, 1);
    float qf[G * NY * 8] __attribute__((aligned(32))); /* the scaled queries: read from L1 by the FMAs */
    for (int g = 0; g < G; g++)
        for (int y = 0; y < NY; y++)
            _mm256_store_ps(qf + (g * NY + y) * 8,
                            _mm256_mul_ps(bf16x8((const uint16_t *)p->q + r * p->q_row_stride +
                                                 (int64_t)(h * G + g) * p->dim + y * 8), _mm256_set1_ps(p->scale)));
    for (int64_t j = start; j < end;) { /* scores, block by block */
        const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
        const uint16_t *base = K + (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        const uint16_t *vbase = V + (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        const int ahead = (blk + 2) * bs < end; /* block blk + 2 (no pointer formed outside the cache without it) */
        const uint16_t *kahead =
            ahead ? K + (table[blk + 2] * bs - (blk + 2) * bs) * token_stride + (int64_t)h * p->dim : base;
        for (; j < stop; j++) {
            for (int c = 0; c < NY / 4; c++) { /* this key's value, for the weighted sum, and a key two blocks on */
                __builtin_prefetch(vbase + j * token_stride + c * 32, 0, 3);
                if (ahead) __builtin_prefetch(kahead + (j + 2 * bs) * token_stride + c * 32, 0, 3);
            }
            __m256 acc[G][2];
            for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
            const uint16_t *key = base + j * token_stride;
            for (int y = 0; y < NY; y++) {
                const __m256 k = bf16x8(key + y * 8);
                for (int g = 0; g < G; g++)
                    acc[g][y & 1] = _mm256_fmadd_ps(_mm256_load_ps(qf + (g * NY + y) * 8), k, acc[g][y & 1]);
            }
            if (G % 4 == 0) { /* four heads' sums at once */
                for (int g = 0; g < G; g += 4)
                    _mm_storeu_ps(s + (j - start) * G + g,
                                  hsum8x4(_mm256_add_ps(acc[g][0], acc[g][1]), _mm256_add_ps(acc[g + 1][0], acc[g + 1][1]),
                                          _mm256_add_ps(acc[g + 2][0], acc[g + 2][1]),
                                          _mm256_add_ps(acc[g + 3][0], acc[g + 3][1])));
            } else {
                for (int g = 0; g < G; g++) s[(j - start) * G + g] = hsum8(_mm256_add_ps(acc[g][0], acc[g][1]));
            }
        }
    }
    _Static_assert(8 % G == 0, "the copies are for groups that divide 8: softmax_avx2's vectors");
    float mx[MAX_GROUP], inv[MAX_GROUP];
    softmax_avx2(s, n * G, G, mx, inv);
    for (int y = 0; y < NY; y += 2) { /* weighted values, dims [8y, 8y + 16) of every head */
        __m256 o[G][2];
        for (int g = 0; g < G; g++) o[g][0] = o[g][1] = _mm256_setzero_ps();
        for (int64_t j = start; j < end;) {
            const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
            const uint16_t *base = V + (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim + y * 8;
            /* the scores asked for every value; past ~128 KB of keys and values a head they may have left L2.
             * In one process against asking always: 32 / 128 rows of 192 keys 1.09x / 1.03x, 16 of 2048 0.99x */
            if (y == 0 && n > 512) prefetch_ahead(p->v_cache, table, blk, end, p, h);
            __m256 a[G][2]; /* the block's sums in registers: GCC stored o's to the stack every key otherwise */
            for (int g = 0; g < G; g++) a[g][0] = o[g][0], a[g][1] = o[g][1];
            for (; j < stop; j++) {
                const __m256 x0 = bf16x8(base + j * token_stride), x1 = bf16x8(base + j * token_stride + 8);
                for (int g = 0; g < G; g++) {
                    const __m256 w = _mm256_broadcast_ss(s + (j - start) * G + g);
                    a[g][0] = _mm256_fmadd_ps(w, x0, a[g][0]);
                    a[g][1] = _mm256_fmadd_ps(w, x1, a[g][1]);
                }
            }
            for (int g = 0; g < G; g++) o[g][0] = a[g][0], o[g][1] = a[g][1];
        }
        for (int g = 0; g < G; g++) {
            uint16_t *dst = (uint16_t *)p->out + ((int64_t)r * p->heads + h * G + g) * p->dim + y * 8;
            const __m256 norm = _mm256_set1_ps(1.0f / inv[g]);
            _mm_storeu_si128((__m128i *)dst, round_bf16x8(_mm256_mul_ps(o[g][0], norm)));
            _mm_storeu_si128((__m128i *)(dst + 8), round_bf16x8(_mm256_mul_ps(o[g][1], norm)));
        }
    }
}
#undef ITEM_G
#undef ITEM_NV
