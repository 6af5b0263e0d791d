/* Decode attention straight from the paged KV cache, for the CPU: one query token per row, its keys read
 * block by block through the block table (no gathered copy), float32 arithmetic, bf16 or float32 tensors.
 * Shared by paged_decode.c (the exported op) and decoder.c (a whole decode step in one call).
 *
 * One work item is a (row, KV head): the scores of the head's `group` query heads against every visible key,
 * their softmax, then the weighted sum of the values. Items are spread over OpenMP threads; the libraries are
 * loaded after torch, so their libgomp soname resolves to the OpenMP runtime torch already runs.
 * GCC vector extensions (16 floats, vec16.h) keep it portable; with AVX-512, bf16 caches of the common shapes
 * take paged_decode_bf16.h's copies of item(), which give the same bits faster; with AVX2 only,
 * paged_decode_avx2.h's (sums in another order).
 */
#ifndef TGI_PAGED_DECODE_H
#define TGI_PAGED_DECODE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2.h"
#include "bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include "vec16.h"

#define MAX_GROUP 16
#define MAX_VECS 16 /* head_dim up to 256 */
/* From this many rows a thread takes a row's items together, its KV heads in turn: a head's keys are a slice of
 * each token's row in the cache, and the next head's slices come from cache lines and DRAM pages just read.
 * Toggled in one engine (the fused step): medium 16 / 32 rows 0.988x / 0.956-0.971x step time, small 32 / 128
 * rows 0.967x / 0.911-0.946x; the op alone (paged_decode.c), 8 layers of medium's shape: 0.878x at 32 rows,
 * 0.834x at 128. Below it the items spread one by one, for the threads to share a few rows. */
#define ROW_ITEMS 8

/* Items (one KV head of one row each) a thread takes together: a row's KV heads from ROW_ITEMS rows, else one. */
static inline int items_per_task(int rows, int kv_heads) { return rows >= ROW_ITEMS ? kv_heads : 1; }

static inline v16f load16(const void *base, int64_t offset, int bf16) {
    if (bf16) return widen16((const uint16_t *)base + offset);
    v16f out;
    memcpy(&out, (const float *)base + offset, sizeof out);
    return out;
}

/* In place: s[i] = exp(s[i] - max of its head) for len = n * G scores laid out key-major (head i % G, G
 * dividing 16); mx[g], inv[g] get each head's max and sum. */
static inline void softmax_tiled(float *s, int len, int G, float *mx, float *inv) {
    const int whole = len - len % 16;
    v16f m = (v16f){0} - INFINITY, sum = (v16f){0};
    for (int i = 0; i < whole; i += 16) {
        v16f x;
        memcpy(&x, s + i, sizeof x);
        m = vmax(x, m);
    }
    for (int g = 0; g < G; g++) mx[g] = -INFINITY, inv[g] = 0.0f;
    for (int l = 0; l < 16; l++) mx[l % G] = m[l] > mx[l % G] ? m[l] : mx[l % G];
    for (int i = whole; i < len; i++) mx[i % G] = s[i] > mx[i % G] ? s[i] : mx[i % G];
    for (int l = 0; l < 16; l++) m[l] = mx[l % G];
    for (int i = 0; i < whole; i += 16) {
        v16f x;
        memcpy(&x, s + i, sizeof x);
        x = exp_nonpositive16(x - m);
        memcpy(s + i, &x, sizeof x);
        sum += x;
    }
    for (int l = 0; l < 16; l++) inv[l % G] += sum[l];
    for (int i = whole; i < len; i++) {
        s[i] = exp_nonpositive(s[i] - mx[i % G]);
        inv[i % G] += s[i];
    }
}

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int64_t *table, *positions;
    void *out;
    int64_t q_row_stride, table_row_stride;
    int rows, heads, kv_heads, dim, block_size, window;
    float scale;
} Problem;

/* The next block's rows of head h, while this block computes: blocks are scattered, which defeats the
 * hardware prefetcher at every block boundary. */
static inline void prefetch_block(const void *cache, int64_t block, const Problem *p, int h, int bf16) {
    const int64_t esize = bf16 ? 2 : 4, row = (int64_t)p->dim * esize;
    const char *at = (const char *)cache + (block * p->block_size * p->kv_heads + h) * row;
    for (int t = 0; t < p->block_size; t++)
        for (int64_t b = 0; b < row; b += 64) __builtin_prefetch(at + t * p->kv_heads * row + b, 0, 3);
}

/* Blocks blk + 1 .. blk + 3 (those before end), from the block where they are first asked for: each block is
 * asked for again at every block until it computes, which kept more of them in flight than asking once two ahead
 * (EPYC Milan, 8 layers' caches from DRAM, the AVX2 items at 32 / 128 rows: 1.13-1.18x against one block ahead,
 * 1.02-1.05x against once two ahead; their scores now ask key by key). Written out: as a loop over the three,
 * GCC's code lost the gain. */
static inline __attribute__((always_inline)) void prefetch_ahead(const void *cache, const int64_t *table, int64_t blk,
                                                                 int64_t end, const Problem *p, int h) {
    const int64_t bs = p->block_size;
    if ((blk + 1) * bs < end) prefetch_block(cache, table[blk + 1], p, h, 1);
    if ((blk + 2) * bs < end) prefetch_block(cache, table[blk + 2], p, h, 1);
    if ((blk + 3) * bs < end) prefetch_block(cache, table[blk + 3], p, h, 1);
}

/* Row r's visible keys, [*start, returned end) (a sliding window starts later), and its block table row. */
static inline int64_t item_keys(const Problem *p, int r, int64_t *start, const int64_t **table) {
    const int64_t end = p->positions[r] + 1;
    *start = (p->window > 0 && end - p->window > 0) ? end - p->window : 0;
    *table = p->table + r * p->table_row_stride;
    return end;
}

/* r[i] = sum of the lanes of a[bitrev4(i)]: four rounds, each adding pairs of half-vectors (the lanes come
 * out in bit-reversed order of the inputs, which the caller feeds bit-reversed). */
#define PAIR(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
static inline v16f reduce16(const v16f *a) {
    v16f b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = PAIR(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               PAIR(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = PAIR(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               PAIR(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = PAIR(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               PAIR(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return PAIR(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           PAIR(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
static const int BITREV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

/* One (row, KV head); G query heads of NV vectors each (compile-time constants where specialized).
 * Scores are kept key-major, s[i * G + g] for key start + i: a tile of 16 / G keys x G heads is one vector. */
static inline __attribute__((always_inline)) void item(const Problem *p, int r, int h, float *s, const int G,
                                                        const int NV, const int bf16) {
    const int64_t token_stride = (int64_t)p->kv_heads * p->dim;
    int64_t start;
    const int64_t *table;
    const int64_t end = item_keys(p, r, &start, &table);
    const int n = (int)(end - start);
    const int bs = p->block_size;
    const int T = (16 % G == 0) ? 16 / G : 0; /* keys per tile; 0: no tiles (G does not divide 16) */
    v16f q[G * NV];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++)
            q[g * NV + v] = load16(p->q, r * p->q_row_stride + (int64_t)(h * G + g) * p->dim + v * 16, bf16) * p->scale;
    for (int64_t j = start; j < end;) { /* scores, block by block */
        const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
        const int64_t base = (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        if (stop < end) prefetch_block(p->k_cache, table[blk + 1], p, h, bf16);
        for (; T && j + T <= stop; j += T) {
            v16f acc[16];
            for (int i = 0; i < 16; i++) acc[i] = (v16f){0};
            for (int v = 0; v < NV; v++)
                for (int t = 0; t < T; t++) {
                    const v16f k = load16(p->k_cache, base + (j + t) * token_stride + v * 16, bf16);
                    for (int g = 0; g < G; g++) acc[BITREV4[t * G + g]] += q[g * NV + v] * k;
                }
            const v16f tile = reduce16(acc);
            memcpy(s + (j - start) * G, &tile, sizeof tile);
        }
        for (; j < stop; j++) { /* the keys left over: one at a time */
            v16f acc[G];
            for (int g = 0; g < G; g++) acc[g] = (v16f){0};
            for (int v = 0; v < NV; v++) {
                const v16f k = load16(p->k_cache, base + j * token_stride + v * 16, bf16);
                for (int g = 0; g < G; g++) acc[g] += q[g * NV + v] * k;
            }
            for (int g = 0; g < G; g++) s[(j - start) * G + g] = hsum(acc[g]);
        }
    }
    float mx[MAX_GROUP], inv[MAX_GROUP];
    if (T) { /* 16 / G heads' scores per vector: the softmax runs on whole vectors, lane l being head l % G */
        softmax_tiled(s, n * G, G, mx, inv);
    } else {
        for (int g = 0; g < G; g++) mx[g] = -INFINITY, inv[g] = 0.0f;
        for (int i = 0; i < n; i++)
            for (int g = 0; g < G; g++) mx[g] = s[i * G + g] > mx[g] ? s[i * G + g] : mx[g];
        for (int i = 0; i < n; i++)
            for (int g = 0; g < G; g++) {
                const float e = exp_nonpositive(s[i * G + g] - mx[g]);
                s[i * G + g] = e;
                inv[g] += e;
            }
    }
    for (int g = 0; g < G; g++) inv[g] = 1.0f / inv[g];
    v16f o[G * NV];
    for (int i = 0; i < G * NV; i++) o[i] = (v16f){0};
    for (int64_t j = start; j < end;) { /* weighted values */
        const int64_t blk = j / bs, stop = (blk + 1) * bs < end ? (blk + 1) * bs : end;
        const int64_t base = (table[blk] * bs - blk * bs) * token_stride + (int64_t)h * p->dim;
        if (stop < end) prefetch_block(p->v_cache, table[blk + 1], p, h, bf16);
        for (; j < stop; j++) {
            const float *w = s + (j - start) * G;
            for (int v = 0; v < NV; v++) {
                const v16f x = load16(p->v_cache, base + j * token_stride + v * 16, bf16);
                for (int g = 0; g < G; g++) o[g * NV + v] += w[g] * x;
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const int64_t at = ((int64_t)r * p->heads + h * G + g) * p->dim;
        for (int v = 0; v < NV; v++) {
            const v16f x = o[g * NV + v] * inv[g];
            if (bf16) {
                uint16_t *dst = (uint16_t *)p->out + at + v * 16;
                for (int i = 0; i < 16; i++) dst[i] = f32_to_bf16(x[i]);
            } else {
                memcpy((float *)p->out + at + v * 16, &x, sizeof x);
            }
        }
    }
}

#if HAVE_AVX2_ONLY && !defined(__AVX512F__)
/* softmax_tiled on 8 lanes (G dividing 8: lane l is head l % G): s[i] = exp(s[i] - its head's max), mx[g] and
 * inv[g] the max and the sum. Small model's attention op, 128 rows of 192 keys: ~15% of its time was the
 * generic vectors' scalarized max and exp. */
static inline void softmax_avx2(float *s, int len, int G, float *mx, float *inv) {
    const int whole = len - len % 8;
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int i = 0; i < whole; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(s + i), m);
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int g = 0; g < G; g++) mx[g] = -INFINITY, inv[g] = 0.0f;
    for (int l = 0; l < 8; l++) mx[l % G] = lanes[l] > mx[l % G] ? lanes[l] : mx[l % G];
    for (int i = whole; i < len; i++) mx[i % G] = s[i] > mx[i % G] ? s[i] : mx[i % G];
    for (int l = 0; l < 8; l++) lanes[l] = mx[l % G];
    m = _mm256_loadu_ps(lanes);
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < whole; i += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        _mm256_storeu_ps(s + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(lanes, sum);
    for (int l = 0; l < 8; l++) inv[l % G] += lanes[l];
    for (int i = whole; i < len; i++) {
        float e[8];
        _mm256_storeu_ps(e, exp_nonpositive8(_mm256_set1_ps(s[i] - mx[i % G])));
        s[i] = e[0];
        inv[i % G] += e[0];
    }
}

/* The sums of the lanes of a, b, c and d, in that order (four heads' scores of one key). */
static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#endif

/* bf16 caches: a copy of an item header per common shape (G, NV), ITEM_COPY(G, NV): with AVX-512
 * paged_decode_bf16.h's (item_bf16_<G>_<NV>), with AVX2 only paged_decode_avx2.h's (item_avx2_<G>_<NV>) */
#ifdef __AVX512F__
static inline __m512 bf16x16(const uint16_t *p) { /* 16 bf16 as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define ITEM_PASTE(G, NV) item_bf16_##G##_##NV
#define ITEM_HEADER "paged_decode_bf16.h"
#elif HAVE_AVX2_ONLY
#define ITEM_PASTE(G, NV) item_avx2_##G##_##NV
#define ITEM_HEADER "paged_decode_avx2.h"
#endif
#ifdef ITEM_HEADER
#define ITEM_COPY(G, NV) ITEM_PASTE(G, NV)
#define ITEM_G 1
#define ITEM_NV 4
#include ITEM_HEADER
#define ITEM_G 1
#define ITEM_NV 8
#include ITEM_HEADER
#define ITEM_G 2
#define ITEM_NV 4
#include ITEM_HEADER
#define ITEM_G 2
#define ITEM_NV 8
#include ITEM_HEADER
#define ITEM_G 4
#define ITEM_NV 4
#include ITEM_HEADER
#define ITEM_G 4
#define ITEM_NV 8
#include ITEM_HEADER
#define ITEM_G 8
#define ITEM_NV 4
#include ITEM_HEADER
#define ITEM_G 8
#define ITEM_NV 8
#include ITEM_HEADER
#endif
#ifdef ITEM_COPY
#define CASE_BF16(G, NV)                                                                                        \
    if (bf16 && group == G && nv == NV) {                                                                       \
        ITEM_COPY(G, NV)(p, r, h, s);                                                                           \
        return;                                                                                                 \
    }
#else
#define CASE_BF16(G, NV)
#endif

#define CASE(G, NV)                                                                                             \
    if (group == G && nv == NV) {                                                                               \
        if (bf16) item(p, r, h, s, G, NV, 1);                                                                   \
        else item(p, r, h, s, G, NV, 0);                                                                        \
        return;                                                                                                 \
    }

/* Item (row r, KV head h) with the common shapes specialized; s: scratch for group x max_len scores. */
static inline void attend_item(const Problem *p, int r, int h, float *s, int bf16) {
    const int group = p->heads / p->kv_heads, nv = p->dim / 16;
    CASE_BF16(1, 4) CASE_BF16(2, 4) CASE_BF16(4, 4) CASE_BF16(8, 4)
    CASE_BF16(1, 8) CASE_BF16(2, 8) CASE_BF16(4, 8) CASE_BF16(8, 8)
    CASE(1, 4) CASE(2, 4) CASE(4, 4) CASE(8, 4)
    CASE(1, 8) CASE(2, 8) CASE(4, 8) CASE(8, 8)
    if (bf16) item(p, r, h, s, group, nv, 1); /* any other shape: same code, runtime sizes */
    else item(p, r, h, s, group, nv, 0);
}
#undef CASE
#undef CASE_BF16

/* 0, or -1 for a shape the kernel does not take. */
static inline int attention_shape_ok(int heads, int kv_heads, int dim) {
    return kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP && dim % 16 == 0 &&
                   dim / 16 <= MAX_VECS ? 0 : -1;
}
#endif
