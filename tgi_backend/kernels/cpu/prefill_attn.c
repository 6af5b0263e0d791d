/* Prefill attention on AMX (bf16) or, with AVX2 and no AVX-512, on panel.h's micro-kernel: every chunk of a
 * step's flat batch, causal, with its history read back from the paged cache, GQA and a sliding window.
 * PyTorch's CPU flash kernel ran ~0.15 TFLOP/s here at 512 tokens and head dim 64 (a third of a small model's
 * prefill); this one takes both products on the tiles.
 *
 * Per (chunk, KV head) the keys are packed once for the tiles: K as [16-key tile][32 dims][16 pairs x 16 keys],
 * V as [32-key block][16 dims][16 key pairs x 16 dims] (zeros past the context). Per (chunk, head, 16 query rows)
 * the scores of every visible key block go to float32, the softmax is exact (max, exp, sum over the band: no
 * rescaling), P is rounded to bf16 once as PyTorch's flash kernel does, and P @ V sums on the tiles.
 * On AVX2 the same plan with panels (panel.h) for the tiles: K as panels of 16 keys over the dims, V as panels
 * of 16 dims over the keys; the queries (scaled) and P stay float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "amx.h"
#include "panel.h"

#if HAVE_AMX && defined(__AVX512BF16__)
#define PREFILL_AMX 1
#include <immintrin.h>
#elif HAVE_AVX2_ONLY
#define PREFILL_AVX2 1
#endif

#if defined(PREFILL_AMX) || defined(PREFILL_AVX2)
typedef struct { /* one chunk: rows [q_start, q_start + len) of the batch at positions start_pos.. */
    int64_t q_start, len, start_pos, table; /* table: offset of its block ids in `tables`, -1: no history */
} Chunk;

typedef struct {
    const uint16_t *q, *k, *v, *k_cache, *v_cache;
    int64_t q_stride, k_stride, v_stride, out_stride, block_size;
    const Chunk *chunks;
    const int64_t *tables;
    uint16_t *out;
    int64_t heads, kv_heads, dim, window;
    float scale;
} Problem;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Key or value row of position p of chunk c, KV head h: this chunk's from k/v, earlier ones from the cache. */
static inline const uint16_t *kv_row(const Problem *pb, const Chunk *c, int64_t p, int64_t h, int value) {
    if (p >= c->start_pos) {
        const int64_t t = c->q_start + p - c->start_pos;
        return value ? pb->v + t * pb->v_stride + h * pb->dim : pb->k + t * pb->k_stride + h * pb->dim;
    }
    const int64_t slot = pb->tables[c->table + p / pb->block_size] * pb->block_size + p % pb->block_size;
    return (value ? pb->v_cache : pb->k_cache) + (slot * pb->kv_heads + h) * pb->dim;
}

/* The first and last positions of rows [r0, r0 + 16) of chunk c, and the first key the first row sees. */
static inline int64_t item_rows(const Problem *pb, const Chunk *c, int64_t r0, int64_t *first, int64_t *last) {
    const int64_t rows = c->len - r0 < 16 ? c->len - r0 : 16;
    *first = c->start_pos + r0, *last = *first + rows - 1;
    return pb->window > 0 && *first - pb->window + 1 > 0 ? *first - pb->window + 1 : 0;
}
#endif

#ifdef PREFILL_AMX
/* K and V of chunk c, KV head h, packed for the tiles (layouts above); ctx keys, zeros up to whole blocks. */
static void pack(const Problem *pb, const Chunk *c, int64_t h, uint32_t *kp, uint32_t *vp) {
    const int64_t D = pb->dim, ctx = c->start_pos + c->len, blocks = ceil_div(ctx, 32), ds_n = D / 32, ct_n = D / 16;
    for (int64_t kt = 0; kt < blocks * 2; kt++)
        for (int n = 0; n < 16; n++) {
            const int64_t key = kt * 16 + n;
            const uint32_t *row = key < ctx ? (const uint32_t *)kv_row(pb, c, key, h, 0) : NULL;
            for (int64_t ds = 0; ds < ds_n; ds++)
                for (int r = 0; r < 16; r++) kp[((kt * ds_n + ds) * 16 + r) * 16 + n] = row ? row[ds * 16 + r] : 0;
        }
    for (int64_t kb = 0; kb < blocks; kb++)
        for (int r = 0; r < 16; r++) {
            const int64_t k0 = kb * 32 + 2 * r;
            const uint16_t *a = k0 < ctx ? kv_row(pb, c, k0, h, 1) : NULL;
            const uint16_t *b = k0 + 1 < ctx ? kv_row(pb, c, k0 + 1, h, 1) : NULL;
            for (int64_t d = 0; d < D; d++) /* the pair's two values: the first key's in the low half */
                vp[((kb * ct_n + d / 16) * 16 + r) * 16 + d % 16] =
                    (uint32_t)(a ? a[d] : 0) | (uint32_t)(b ? b[d] : 0) << 16;
        }
}

/* 2^t for t <= 0: 2^round(t) * 2^f with |f| <= 1/2 by its Taylor series to degree 5 (relative error < 3e-6;
 * P is rounded to bf16 after), half the work of vec16.h's exp (not included here): the softmax is most of this
 * kernel's time. */
static inline __m512 exp2_nonpositive(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
    const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, r);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022651f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, r);
}

/* Lanes of keys [j, j + 16) inside [lo, hi]. */
static inline __mmask16 visible(int64_t j, int64_t lo, int64_t hi) {
    if (j + 16 <= lo || j > hi) return 0;
    unsigned live = 0xffffu;
    if (j < lo) live &= 0xffffu << (lo - j);
    if (j + 15 > hi) live &= 0xffffu >> (j + 15 - hi);
    return (__mmask16)live;
}

/* exp(s * scale - max) over the row's visible keys [lo, hi] (band-relative), zeros elsewhere, as bf16 into p;
 * returns the float32 sum. */
static float softmax_row(const float *s, uint16_t *p, int64_t width, int64_t lo, int64_t hi, float scale) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = lo / 16 * 16; j <= hi; j += 16)
        m = _mm512_mask_max_ps(m, visible(j, lo, hi), m, _mm512_loadu_ps(s + j));
    const float k = scale * 1.4426950408889634f; /* exp(x) = 2^(x log2 e) */
    const __m512 vk = _mm512_set1_ps(k), shift = _mm512_set1_ps(-_mm512_reduce_max_ps(m) * k);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 live = visible(j, lo, hi);
        const __m512 e = live ? _mm512_maskz_mov_ps(live, exp2_nonpositive(
                                    _mm512_fmadd_ps(_mm512_loadu_ps(s + j), vk, shift)))
                              : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* Rows [r0, r0 + 16) of chunk c, head h: the tiles' scores, softmax, P @ V, out. */
static void attend_rows(const Problem *pb, const Chunk *c, int64_t h, int64_t r0, const uint32_t *kp,
                        const uint32_t *vp, float *s, uint16_t *p, uint16_t *qb, float *o) {
    const int64_t D = pb->dim, ds_n = D / 32, ct_n = D / 16, rows = c->len - r0 < 16 ? c->len - r0 : 16;
    int64_t first, last; /* positions of the rows */
    const int64_t start = item_rows(pb, c, r0, &first, &last);
    const int64_t kb0 = start / 32, kb1 = ceil_div(last + 1, 32), width = (kb1 - kb0) * 32;
    memset(qb, 0, sizeof(uint16_t) * (size_t)(16 * D));
    for (int64_t i = 0; i < rows; i++)
        memcpy(qb + i * D, pb->q + (c->q_start + r0 + i) * pb->q_stride + h * D, sizeof(uint16_t) * (size_t)D);
    for (int64_t kt = kb0 * 2; kt < kb1 * 2; kt += 4) { /* scores: 16 rows x 16 keys a tile, 4 tiles in flight */
        const int64_t nt = kb1 * 2 - kt < 4 ? kb1 * 2 - kt : 4;
        const uint32_t *b = kp + kt * ds_n * 256;
        float *dst = s + (kt - kb0 * 2) * 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t ds = 0; ds < ds_n; ds++) {
            _tile_loadd(4, qb + ds * 32, D * 2);
            _tile_loadd(6, b + ds * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (nt > 1) {
                _tile_loadd(7, b + (ds_n + ds) * 256, 64);
                _tile_dpbf16ps(1, 4, 7);
            }
            if (nt > 2) {
                _tile_loadd(6, b + (2 * ds_n + ds) * 256, 64);
                _tile_dpbf16ps(2, 4, 6);
            }
            if (nt > 3) {
                _tile_loadd(7, b + (3 * ds_n + ds) * 256, 64);
                _tile_dpbf16ps(3, 4, 7);
            }
        }
        _tile_stored(0, dst, width * 4);
        if (nt > 1) _tile_stored(1, dst + 16, width * 4);
        if (nt > 2) _tile_stored(2, dst + 32, width * 4);
        if (nt > 3) _tile_stored(3, dst + 48, width * 4);
    }
    float sums[16];
    for (int64_t i = 0; i < 16; i++) {
        if (i >= rows) { /* padding rows: P zero */
            memset(p + i * width, 0, sizeof(uint16_t) * (size_t)width);
            sums[i] = 1.0f;
            continue;
        }
        const int64_t pos = first + i, lo = pb->window > 0 && pos - pb->window + 1 > 0 ? pos - pb->window + 1 : 0;
        sums[i] = softmax_row(s + i * width, p + i * width, width, lo - kb0 * 32, pos - kb0 * 32, pb->scale);
    }
    for (int64_t c0 = 0; c0 < ct_n; c0 += 4) { /* P @ V, four 16-dim tiles at a time */
        const int64_t n = ct_n - c0 < 4 ? ct_n - c0 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = kb0; kb < kb1; kb++) {
            const uint32_t *b = vp + (kb * ct_n + c0) * 256;
            _tile_loadd(4, p + (kb - kb0) * 32, width * 2);
            _tile_loadd(6, b, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (n > 1) {
                _tile_loadd(7, b + 256, 64);
                _tile_dpbf16ps(1, 4, 7);
            }
            if (n > 2) {
                _tile_loadd(6, b + 512, 64);
                _tile_dpbf16ps(2, 4, 6);
            }
            if (n > 3) {
                _tile_loadd(7, b + 768, 64);
                _tile_dpbf16ps(3, 4, 7);
            }
        }
        _tile_stored(0, o + c0 * 16, D * 4);
        if (n > 1) _tile_stored(1, o + (c0 + 1) * 16, D * 4);
        if (n > 2) _tile_stored(2, o + (c0 + 2) * 16, D * 4);
        if (n > 3) _tile_stored(3, o + (c0 + 3) * 16, D * 4);
    }
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *dst = pb->out + (c->q_start + r0 + i) * pb->out_stride + h * D;
        const __m512 inv = _mm512_set1_ps(1.0f / sums[i]);
        for (int64_t d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i *)(dst + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + i * D + d), inv)));
    }
}

/* Per thread: scores and P of 16 rows, their outputs and queries. */
#define PER_THREAD(widest, dim)                                                                                 \
    ((size_t)(16 * (widest)) * (sizeof(float) + sizeof(uint16_t)) + (size_t)(16 * (dim)) * 6)

static int kernel_permitted(void) {
    static int permitted = -1; /* asked once */
    if (permitted < 0) permitted = amx_permitted();
    return permitted;
}

static void thread_begin(void) { amx_configure(); }
static void thread_end(void) { amx_release(); }

static void attend(const Problem *pb, const Chunk *c, int64_t h, int64_t r0, const uint32_t *kp, const uint32_t *vp,
                   char *mine, int64_t widest) {
    float *s = (float *)mine, *o = s + 16 * widest;
    uint16_t *p = (uint16_t *)(o + 16 * pb->dim), *qb = p + 16 * widest;
    attend_rows(pb, c, h, r0, kp, vp, s, p, qb, o);
}
#endif

#ifdef PREFILL_AVX2
/* K and V of chunk c, KV head h, in panels: K [16-key panel][dim][8 lanes], V [16-dim panel][key][8 lanes] over
 * blocks * 32 keys (panel.h's lanes: lane j holds the panel's entry j in its high half, j + 8 in its low half;
 * zeros past the context). The same words as the tiles' packs: blocks * 16 * dim each. */
static void pack(const Problem *pb, const Chunk *c, int64_t h, uint32_t *kp, uint32_t *vp) {
    const int64_t D = pb->dim, ctx = c->start_pos + c->len, keys = ceil_div(ctx, 32) * 32;
    for (int64_t kt = 0; kt < keys / 16; kt++)
        for (int j = 0; j < 8; j++) {
            const int64_t hi_key = kt * 16 + j, lo_key = hi_key + 8;
            const uint16_t *a = hi_key < ctx ? kv_row(pb, c, hi_key, h, 0) : NULL;
            const uint16_t *b = lo_key < ctx ? kv_row(pb, c, lo_key, h, 0) : NULL;
            for (int64_t d = 0; d < D; d++)
                kp[(kt * D + d) * 8 + j] = (uint32_t)(a ? a[d] : 0) << 16 | (uint32_t)(b ? b[d] : 0);
        }
    for (int64_t key = 0; key < keys; key++) {
        const uint16_t *row = key < ctx ? kv_row(pb, c, key, h, 1) : NULL;
        for (int64_t dp = 0; dp < D / 16; dp++)
            for (int j = 0; j < 8; j++)
                vp[(dp * keys + key) * 8 + j] = row ? (uint32_t)row[dp * 16 + j] << 16 | row[dp * 16 + j + 8] : 0;
    }
}

/* Lanes of keys [j, j + 8) inside [lo, hi], as a mask of all-ones floats. */
static inline __m256 visible8(int64_t j, int64_t lo, int64_t hi) {
    const __m256i at = _mm256_add_epi32(_mm256_set1_epi32((int32_t)j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)lo), at),
                                                   _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)hi + 1), at)));
}

/* In place over a row's band: exp(s - max) on the visible keys [lo, hi] (band-relative), zeros elsewhere;
 * returns the sum. */
static float softmax_band(float *s, int64_t width, int64_t lo, int64_t hi) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t j = lo / 8 * 8; j <= hi; j += 8)
        m = _mm256_blendv_ps(m, _mm256_max_ps(_mm256_loadu_ps(s + j), m), visible8(j, lo, hi));
    const __m256 half = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    const __m256 quad = _mm256_max_ps(half, _mm256_permute_ps(half, 0x4e));
    const __m256 mx = _mm256_max_ps(quad, _mm256_permute_ps(quad, 0xb1)); /* the max in every lane */
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < width; j += 8) {
        const __m256 live = visible8(j, lo, hi);
        const __m256 e = _mm256_and_ps(live, exp_nonpositive8(_mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx),
                                                                             _mm256_setzero_ps())));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum8(sum);
}

/* Rows [r0, r0 + 16) of chunk c, head h: the scores of the band of key blocks they see, softmax, P @ V, out. */
static void attend_rows(const Problem *pb, const Chunk *c, int64_t h, int64_t r0, const uint32_t *kp,
                        const uint32_t *vp, float *s, float *xq, float *o) {
    const int64_t D = pb->dim, rows = c->len - r0 < 16 ? c->len - r0 : 16;
    const int64_t keys = ceil_div(c->start_pos + c->len, 32) * 32;
    int64_t first, last; /* positions of the rows */
    const int64_t start = item_rows(pb, c, r0, &first, &last);
    const int64_t kb0 = start / 32, kb1 = ceil_div(last + 1, 32), width = (kb1 - kb0) * 32;
    for (int64_t i = 0; i < rows; i++) /* the queries, scaled */
        for (int64_t d = 0; d < D; d++)
            xq[i * D + d] = bf16_to_f32(pb->q[(c->q_start + r0 + i) * pb->q_stride + h * D + d]) * pb->scale;
    for (int64_t kt = kb0 * 2; kt < kb1 * 2; kt++) /* scores: 16 keys a panel */
        panel_rows(xq, rows, D, kp + kt * D * 8, s + (kt - kb0 * 2) * 16, NULL, NULL, width, PANEL, NULL, 0);
    float sums[16];
    for (int64_t i = 0; i < rows; i++) {
        const int64_t pos = first + i, lo = pb->window > 0 && pos - pb->window + 1 > 0 ? pos - pb->window + 1 : 0;
        sums[i] = softmax_band(s + i * width, width, lo - kb0 * 32, pos - kb0 * 32);
    }
    for (int64_t dp = 0; dp < D / 16; dp++) /* P @ V: 16 dims a panel, over the band's keys */
        panel_rows(s, rows, width, vp + (dp * keys + kb0 * 32) * 8, o + dp * 16, NULL, NULL, D, PANEL, NULL, 0);
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *dst = pb->out + (c->q_start + r0 + i) * pb->out_stride + h * D;
        const __m256 inv = _mm256_set1_ps(1.0f / sums[i]);
        for (int64_t d = 0; d < D; d += 8)
            _mm_storeu_si128((__m128i *)(dst + d), round_bf16x8(_mm256_mul_ps(_mm256_loadu_ps(o + i * D + d), inv)));
    }
}

/* Per thread: scores (then P) of 16 rows, their queries and outputs, float32. */
#define PER_THREAD(widest, dim) ((size_t)(16 * (widest)) * sizeof(float) + (size_t)(16 * (dim)) * 8)

static int kernel_permitted(void) { return 1; }
static void thread_begin(void) {}
static void thread_end(void) {}

static void attend(const Problem *pb, const Chunk *c, int64_t h, int64_t r0, const uint32_t *kp, const uint32_t *vp,
                   char *mine, int64_t widest) {
    float *s = (float *)mine, *xq = s + 16 * widest;
    attend_rows(pb, c, h, r0, kp, vp, s, xq, xq + 16 * pb->dim);
}
#endif

#if defined(PREFILL_AMX) || defined(PREFILL_AVX2)
/* 1 where this build and CPU run the kernel (AMX granted, or AVX2 without AVX-512). */
int prefill_ready(void) { return kernel_permitted(); }

/* out [tokens, heads, dim] (row stride out_stride) for every chunk's rows; q [tokens, heads, dim], k and v
 * [tokens, kv_heads, dim] (row strides given), the caches [blocks, block_size, kv_heads, dim]; chunks: `n`
 * of (q_start, len, start_pos, offset of its block ids in tables or -1). Returns 0; -1 for what it does not
 * take (neither AMX nor AVX2 alone, dim not a multiple of 32 or past 256, heads not a multiple of kv_heads);
 * -2 out of memory. */
int prefill_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                      int64_t v_stride, const uint16_t *k_cache, const uint16_t *v_cache, int64_t block_size,
                      const int64_t *chunks, int64_t n, const int64_t *tables, uint16_t *out, int64_t out_stride,
                      int64_t heads, int64_t kv_heads, int64_t dim, float scale, int64_t window, int64_t threads) {
    if (!kernel_permitted() || dim % 32 || dim > 256 || kv_heads < 1 || heads % kv_heads || n < 1) return -1;
    const Problem pb = {q, k, v, k_cache, v_cache, q_stride, k_stride, v_stride, out_stride, block_size,
                        (const Chunk *)chunks, tables, out, heads, kv_heads, dim, window, scale};
    int64_t *pack_at = malloc(sizeof(int64_t) * (size_t)(2 * n + 1)), *item_at = pack_at + n, widest = 0;
    if (!pack_at) return -2;
    int64_t words = 0, items = 0;
    for (int64_t i = 0; i < n; i++) { /* per chunk: where its packs start, its first work item */
        const Chunk *c = &pb.chunks[i];
        const int64_t blocks = ceil_div(c->start_pos + c->len, 32);
        pack_at[i] = words, item_at[i] = items;
        words += kv_heads * blocks * 32 * dim; /* per KV head: K then V, blocks * 16 * dim words each */
        items += heads * ceil_div(c->len, 16);
        if (blocks * 32 > widest) widest = blocks * 32;
    }
    item_at[n] = items;
    const size_t per_thread = PER_THREAD(widest, dim) + 128;
    uint32_t *packs = malloc(sizeof(uint32_t) * (size_t)words + 64);
    char *scratch = malloc(per_thread * (size_t)(threads > 0 ? threads : 1) + 64);
    if (!packs || !scratch) {
        free(pack_at), free(packs), free(scratch);
        return -2;
    }
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        char *mine = (char *)(((uintptr_t)(scratch + per_thread * (size_t)omp_get_thread_num()) + 63) & ~(uintptr_t)63);
        thread_begin();
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n * kv_heads; t++) {
            const int64_t i = t / kv_heads, h = t % kv_heads;
            const int64_t blocks = ceil_div(pb.chunks[i].start_pos + pb.chunks[i].len, 32);
            uint32_t *kp = packs + pack_at[i] + h * blocks * 32 * dim; /* K: blocks * 16 * dim words, V the same */
            pack(&pb, &pb.chunks[i], h, kp, kp + blocks * 16 * dim);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items; t++) {
            int64_t lo = 0, hi = n - 1; /* the chunk of item t */
            while (lo < hi) {
                const int64_t mid = (lo + hi + 1) / 2;
                if (item_at[mid] <= t) lo = mid;
                else hi = mid - 1;
            }
            const Chunk *c = &pb.chunks[lo];
            const int64_t local = t - item_at[lo], per_head = ceil_div(c->len, 16), h = local / per_head;
            const int64_t blocks = ceil_div(c->start_pos + c->len, 32), kvh = h / (heads / kv_heads);
            const uint32_t *kp = packs + pack_at[lo] + kvh * blocks * 32 * dim;
            attend(&pb, c, h, (local % per_head) * 16, kp, kp + blocks * 16 * dim, mine, widest);
        }
        thread_end();
    }
    free(pack_at), free(packs), free(scratch);
    return 0;
}
#else
int prefill_ready(void) { return 0; }

int prefill_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                      int64_t v_stride, const uint16_t *k_cache, const uint16_t *v_cache, int64_t block_size,
                      const int64_t *chunks, int64_t n, const int64_t *tables, uint16_t *out, int64_t out_stride,
                      int64_t heads, int64_t kv_heads, int64_t dim, float scale, int64_t window, int64_t threads) {
    (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)k_cache, (void)v_cache;
    (void)block_size, (void)chunks, (void)n, (void)tables, (void)out, (void)out_stride, (void)heads;
    (void)kv_heads, (void)dim, (void)scale, (void)window, (void)threads;
    return -1;
}
#endif
