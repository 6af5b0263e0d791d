/* A whole decode step of a Llama-family decoder for a few rows, in one call and one OpenMP parallel region:
 * per layer RMSNorm (+ residual), the qkv linear, rotary + K/V store, paged decode attention, o linear,
 * RMSNorm (+ residual), gate|up linear, act(gate) * up, down linear; then the final RMSNorm. The layers' ops are
 * the native kernels' own code (gemv.h, rms_norm.h, rope.h, paged_decode.h), so each rounds as they do; the
 * threads meet at a barrier between phases instead of forking and joining per op, and no Python runs between
 * them (per layer that was ~15 calls and their checks: ~0.3 ms of a 3-20 ms step here).
 * bf16 only. The activation is a table over all 65,536 bf16 inputs made by PyTorch's own function, so
 * act(gate) is bit for bit what PyTorch computes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "gemv.h"
#include "paged_decode.h"
#include "rms_norm.h"
#include "rope.h"

typedef struct { /* one decoder layer; weights bf16 [out, in] row-major; biases NULL where none */
    const uint16_t *input_norm, *post_norm;
    const uint16_t *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
    void *k_cache, *v_cache; /* [num_slots, kv_heads, dim] */
    int64_t window;          /* sliding window; 0: none */
} Layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, dim, intermediate, block_size, num_slots;
    float eps, scale;
    const uint16_t *final_norm;
    const uint16_t *act_table; /* act(x) for every bf16 bit pattern x */
    const Layer *layer;
} Model;

typedef struct { /* one decode step: `rows` tokens, one per request */
    int64_t rows;
    const uint16_t *x;        /* [rows, hidden]: the embeddings */
    const uint16_t *cos, *sin; /* [rows, dim], sin's first half negated */
    const int64_t *slots;     /* [rows] */
    const int64_t *table;     /* [rows, table_row_stride] block ids */
    const int64_t *positions; /* [rows] */
    int64_t table_row_stride, max_len, threads;
    uint16_t *out; /* [rows, hidden]: the final norm's output */
} Step;

/* This thread's share of a linear: outputs split in whole tiles, x widened first where bf16 is emulated. */
static inline void linear_share(const uint16_t *x, int64_t rows, int64_t in, const uint16_t *w, int64_t out,
                                const uint16_t *bias, uint16_t *y, int tid, int nt, float *xf) {
    int64_t first, last;
    gemv_share(out, tid, nt, &first, &last);
#ifdef __AVX512BF16__
    (void)xf;
    gemv_rows(x, rows, in, w, out, first, last, bias, y, 0);
#else
    for (int64_t i = 0; i < rows * in; i++) xf[i] = bf16_to_f32(x[i]);
    gemv_rows(xf, rows, in, w, out, first, last, bias, y, 0);
#endif
}

/* Rows r = tid, tid + nt, ...: y = norm(x + residual), the sum written back into residual (NULL: first layer,
 * residual = x). */
static inline void norm_share(const uint16_t *x, uint16_t *residual, int first_layer, uint16_t *y,
                              const uint16_t *weight, int64_t rows, int64_t hidden, float eps, int tid, int nt) {
    for (int64_t r = tid; r < rows; r += nt) {
        const uint16_t *xr = x + r * hidden;
        uint16_t *rr = residual + r * hidden;
        if (first_layer) {
            memcpy(rr, xr, sizeof(uint16_t) * (size_t)hidden);
            norm_row(xr, NULL, NULL, y + r * hidden, weight, (int)hidden, eps, 1);
        } else {
            norm_row(xr, rr, rr, y + r * hidden, weight, (int)hidden, eps, 1);
        }
    }
}

/* Returns 0; -1 for a shape it does not take (rows outside 1..MAX_ROWS, head dim, group); -2 out of memory;
 * -3 a slot outside the cache (nothing written). Positions and block ids are the caller's to check. */
int decode_step(const Model *m, const Step *s) {
    const int64_t R = s->rows, H = m->hidden, D = m->dim, I = m->intermediate;
    const int64_t qkv_out = (m->heads + 2 * m->kv_heads) * D, group = m->heads / m->kv_heads;
    if (R < 1 || R > MAX_ROWS || attention_shape_ok((int)m->heads, (int)m->kv_heads, (int)D) || D % 2 || D > MAX_DIM)
        return -1;
    for (int64_t r = 0; r < R; r++)
        if (s->slots[r] < 0 || s->slots[r] >= m->num_slots) return -3;
    const int64_t threads = s->threads > 0 ? s->threads : 1, max_len = s->max_len > 0 ? s->max_len : 1;
    const int64_t widest = (H > I ? H : I) > m->heads * D ? (H > I ? H : I) : m->heads * D;
    /* activations (bf16): residual, normed x, qkv, attention, o / down output, gate|up, act */
    const size_t acts = (size_t)R * (size_t)(3 * H + qkv_out + m->heads * D + 3 * I);
    const size_t per_thread = (size_t)group * (size_t)max_len + (size_t)R * (size_t)widest; /* scores, x widened */
    char *scratch = malloc(acts * sizeof(uint16_t) + (size_t)threads * per_thread * sizeof(float) + 64);
    if (!scratch) return -2;
    uint16_t *resid = (uint16_t *)scratch, *y = resid + R * H, *qkv = y + R * H, *attn = qkv + R * qkv_out;
    uint16_t *h = attn + R * m->heads * D, *gu = h + R * H, *act = gu + R * 2 * I;
    float *floats = (float *)(((uintptr_t)(act + R * I) + 63) & ~(uintptr_t)63);

#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *scores = floats + (size_t)tid * per_thread, *xf = scores + (size_t)group * (size_t)max_len;
        for (int64_t l = 0; l < m->layers; l++) {
            const Layer *L = &m->layer[l];
            norm_share(l == 0 ? s->x : h, resid, l == 0, y, L->input_norm, R, H, m->eps, tid, nt);
#pragma omp barrier
            linear_share(y, R, H, L->qkv, qkv_out, L->qkv_bias, qkv, tid, nt, xf);
#pragma omp barrier
            for (int64_t r = tid; r < R; r += nt)
                rope_token(qkv + r * qkv_out, s->cos + r * D, s->sin + r * D, L->k_cache, L->v_cache, s->slots[r],
                           (int)m->heads, (int)m->kv_heads, (int)D, 1);
#pragma omp barrier
            const Problem p = {qkv, L->k_cache, L->v_cache, s->table, s->positions, attn, qkv_out,
                               s->table_row_stride, (int)R, (int)m->heads, (int)m->kv_heads, (int)D,
                               (int)m->block_size, (int)L->window, m->scale};
            for (int64_t w = tid; w < R * m->kv_heads; w += nt)
                attend_item(&p, (int)(w / m->kv_heads), (int)(w % m->kv_heads), scores, 1);
#pragma omp barrier
            linear_share(attn, R, m->heads * D, L->o, H, L->o_bias, h, tid, nt, xf);
#pragma omp barrier
            norm_share(h, resid, 0, y, L->post_norm, R, H, m->eps, tid, nt);
#pragma omp barrier
            linear_share(y, R, H, L->gate_up, 2 * I, L->gate_up_bias, gu, tid, nt, xf);
#pragma omp barrier
            { /* act(gate) * up, each rounded to bf16 as PyTorch's two ops */
                const int64_t n = R * I, first = n * tid / nt, last = n * (tid + 1) / nt;
                for (int64_t e = first; e < last; e++) {
                    const int64_t r = e / I, i = e % I;
                    const float a = bf16_to_f32(m->act_table[gu[r * 2 * I + i]]);
                    act[e] = f32_to_bf16(a * bf16_to_f32(gu[r * 2 * I + I + i]));
                }
            }
#pragma omp barrier
            linear_share(act, R, I, L->down, H, L->down_bias, h, tid, nt, xf);
#pragma omp barrier
        }
        for (int64_t r = tid; r < R; r += nt)
            norm_row(h + r * H, resid + r * H, resid + r * H, s->out + r * H, m->final_norm, (int)H, m->eps, 1);
    }
    free(scratch);
    return 0;
}
