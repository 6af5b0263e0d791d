/* One decode-attention item (row r, KV head h) of item() for bf16 caches, in AVX-512 intrinsics: included by
 * paged_decode.h once per (group, head vectors) ITEM_G, ITEM_NV, as item_bf16_<G>_<NV>. The same arithmetic in
 * the same order as item(), but its arrays have constant sizes: sized by item()'s `const int` parameters they
 * are variable-length arrays, which GCC keeps in memory even once inlined with constants (the accumulators went
 * to the stack and back at every key). The medium model's shape (group 4, dim 64), bit for bit the same output:
 * one item from L2 29 -> 15.5 ns per key; 16 layers x 32 rows from DRAM 17.2 -> 20.3 GB/s, 8 x 128 rows
 * 15.3 -> 18.7. Inside the fused step (small model, 128 rows) attention went from 1.35 to 1.26 times the
 * linears' time: there it waits on DRAM more than it computes.
 */
static void ITEM_COPY(ITEM_G, ITEM_NV)(const Problem *p, int r, int h, float *s) {
    enum { G = ITEM_G, NV = ITEM_NV, T = 16 / ITEM_G }; /* T keys x G heads: one vector of scores */
    const uint16_t *K = (const uint16_t *)p->k_cache, *V = (const uint16_t *)p->v_cache;
    const int64_t token_stride = (int64_t)p->kv_heads * p->dim;
    const int bs = p->block_size;
    int64_t start;
    const int64_t *table;
    const int64_t end = item_keys(p, r, &start, &table);
    const int n = (int)(end - start);
    __m512 q[G * NV];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++)
            q[g * NV + v] = _mm512_mul_ps(bf16x16((const uint16_t *)p->q + r * p->q_row_stride +
                                                  (int64_t)(h * G + g) * p->dim + v * 16), _mm512_set1_ps(p->scale));
    for (int64_t j = start; j < end;) { /* scores, block by block */
        const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
        const uint16_t *base = K + (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        if (stop < end) prefetch_block(p->k_cache, table[blk + 1], p, h, 1);
        for (; j + T <= stop; j += T) {
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int v = 0; v < NV; v++)
                for (int t = 0; t < T; t++) {
                    const __m512 k = bf16x16(base + (j + t) * token_stride + v * 16);
                    for (int g = 0; g < G; g++)
                        acc[BITREV4[t * G + g]] = _mm512_fmadd_ps(q[g * NV + v], k, acc[BITREV4[t * G + g]]);
                }
            v16f lanes[16], tile;
            memcpy(lanes, acc, sizeof lanes);
            tile = reduce16(lanes);
            memcpy(s + (j - start) * G, &tile, sizeof tile);
        }
        for (; j < stop; j++) /* the keys left over: one at a time */
            for (int g = 0; g < G; g++) {
                __m512 acc = _mm512_setzero_ps();
                for (int v = 0; v < NV; v++)
                    acc = _mm512_fmadd_ps(q[g * NV + v], bf16x16(base + j * token_stride + v * 16), acc);
                s[(j - start) * G + g] = hsum(acc);
            }
    }
    float mx[MAX_GROUP], inv[MAX_GROUP];
    softmax_tiled(s, n * G, G, mx, inv);
    __m512 o[G * NV];
    for (int i = 0; i < G * NV; i++) o[i] = _mm512_setzero_ps();
    for (int64_t j = start; j < end;) { /* weighted values */
        const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
        const uint16_t *base = V + (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        if (stop < end) prefetch_block(p->v_cache, table[blk + 1], p, h, 1);
        for (; j < stop; j++) {
            __m512 w[G];
            for (int g = 0; g < G; g++) w[g] = _mm512_set1_ps(s[(j - start) * G + g]);
            for (int v = 0; v < NV; v++) {
                const __m512 x = bf16x16(base + j * token_stride + v * 16);
                for (int g = 0; g < G; g++) o[g * NV + v] = _mm512_fmadd_ps(w[g], x, o[g * NV + v]);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        uint16_t *dst = (uint16_t *)p->out + ((int64_t)r * p->heads + h * G + g) * p->dim;
        const __m512 norm = _mm512_set1_ps(1.0f / inv[g]);
        for (int v = 0; v < NV; v++) {
            float f[16];
            _mm512_storeu_ps(f, _mm512_mul_ps(o[g * NV + v], norm));
            for (int i = 0; i < 16; i++) dst[v * 16 + i] = f32_to_bf16(f[i]);
        }
    }
}
#undef ITEM_G
#undef ITEM_NV
