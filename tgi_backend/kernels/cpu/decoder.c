/* A whole decode step of a Llama-family decoder for a few rows, in one call and one OpenMP parallel region:
 * per layer RMSNorm (+ residual), the qkv linear, rotary + K/V store, paged decode attention, o linear,
 * RMSNorm (+ residual), gate|up linear, act(gate) * up, down linear; then the final RMSNorm (and, where a step
 * of few rows is all plain greedy, the LM head down to each row's greedy token). The layers' ops are
 * the native kernels' own code (gemv.h, rms_norm.h, rope.h, paged_decode.h), so each rounds as they do; no
 * fork and join per op, and no Python runs between them (per layer that was ~15 calls and their checks: ~0.3 ms
 * of a 3-20 ms step here).
 * bf16 only. The activation is a table over all 65,536 bf16 inputs made by PyTorch's own function, so
 * act(gate) is bit for bit what PyTorch computes.
 */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "act.h"
#include "argmax.h"
#include "amx.h"
#include "gemv.h"
#include "panel.h"
#include "paged_decode.h"
#include "rms_norm.h"
#include "rope.h"

typedef struct { /* one decoder layer; weights bf16 [out, in] row-major; biases NULL where none */
    const uint16_t *input_norm, *post_norm;
    const uint16_t *qkv, *qkv_bias, *o, *o_bias, *gate_up, *gate_up_bias, *down, *down_bias;
    const uint16_t *qkv_amx, *o_amx, *gate_up_amx, *down_amx; /* packed for amx.h; NULL: no AMX */
    const uint32_t *qkv_panel, *o_panel, *gate_up_panel, *down_panel; /* packed for panel.h; NULL: none */
    void *k_cache, *v_cache; /* [num_slots, kv_heads, dim] */
    int64_t window;          /* sliding window; 0: none */
} Layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, dim, intermediate, block_size, num_slots;
    int64_t few_rows; /* up to this many rows the few-row kernel (gemv.h) on the plain weights, past it AMX
                       * (or the panels) */
    int64_t max_rows;
    float eps, scale;
    const uint16_t *final_norm;
    const uint16_t *act_table; /* act(x) for every bf16 bit pattern x, and one spare entry */
    const Layer *layer;
    const uint16_t *lm_head; /* [vocab, hidden] bf16 as loaded; NULL: the step never takes the LM head */
    const uint32_t *lm_head_panel; /* the same in panels (panel.h): the step's LM head from them; NULL: none */
    int64_t vocab;
    int64_t panels; /* past few_rows (0 where there are panels) the linears on Layer's panels (panel.h, AVX2
                     * builds); 0: AMX */
    const uint16_t *embed;                /* [vocab_rows, hidden] bf16: Step.ids' rows; NULL: Step.x given */
    int64_t vocab_rows;
    const float *cos_table, *sin_table; /* [max_positions, dim] float32 (sin's first half negated); NULL: given */
    int64_t max_positions;
} Model;

enum { FEW_ROWS, WIDE_AMX, WIDE_PANEL }; /* how a step's linears run: by its rows and the CPU */

typedef struct { /* one decode step: `rows` tokens, one per request */
    int64_t rows;
    const uint16_t *x;        /* [rows, hidden]: the embeddings */
    const uint16_t *cos, *sin; /* [rows, dim], sin's first half negated */
    const int64_t *slots;     /* [rows] */
    const int64_t *table;     /* [rows, table_row_stride] block ids */
    const int64_t *positions; /* [rows] */
    int64_t table_row_stride, max_len, threads;
    uint16_t *out;       /* [rows, hidden]: the final norm's output */
    int64_t steal_spins; /* a thread waiting on a phase this many spins redoes its unfinished tasks; <0: never */
    int64_t stall_task;  /* tests: the thread that takes this task first waits (up to ~1 s) for the same phase one
                          * layer on to be done by the others: a preemption that ends mid-step; -1: none */
    int64_t stolen;      /* out: tasks a waiting thread redid and committed first */
    int64_t *argmax;     /* [rows]: each row's greedy token from the LM head, a last phase; NULL: no LM head */
    const int64_t *ids;  /* [rows] token ids: with x NULL, x is their rows of Model.embed; with cos NULL, cos and
                          * sin are the tables' rows at positions, rounded to bf16 (as PyTorch's .to) */
} Step;

int amx_ready(void);

enum { NORM_IN, QKV, ROPE, ATTEND, O_PROJ, NORM_POST, GATE_UP, ACT, DOWN, PHASES }; /* per layer, in order */
enum { FINAL_NORM = PHASES, HEAD }; /* after the layers: the final norm, then (with Step.argmax) the LM head */
#define HEAD_CHUNK 256 /* vocab entries per LM-head task: at 64 the tasks' claims cost small's 4-row steps 6% */
/* outputs per linear task: whole tiles, AMX_OUTPUTS at a time on AMX. A thread's tasks alternate with the
 * other's, and its weight reads are contiguous for a task: from 32 to 128 a step got 5-7% shorter with one to
 * four rows (medium model, few-row kernel), 3-6% with 8-32 (AMX), 1.4% with 128 (ABBA in one engine). */
#define CHUNK 128
_Static_assert(CHUNK % AMX_OUTPUTS == 0 && CHUNK % 4 == 0, "a task is whole AMX chunks and whole tiles");
/* Each task costs ~1 us of atomics on lines both threads write (the counter, its claim, the phase's count, the
 * phase-done reads), more than a row's norm: a norm, rope or attention task takes rows_per_task rows (at most
 * ROW_TASKS tasks a phase), an act task at least ACT_CHUNK elements (at most ACT_TASKS tasks). Steps, old and new
 * alternated in pairs: at most 32 tasks a phase against a task a row, 128 rows 1.04-1.07x (small); at most 8
 * against 32: small 32 / 128 rows 1.077x / 1.029x (32 rows of mixed contexts 1.047x; next to a burner taking 6%
 * of the cores in 100 us bursts 1.073x / 1.005x), 16 rows 1.031x, medium 32 / 128 rows 1.024x / 1.020x; 8 rows
 * and fewer unchanged. */
#define ROW_TASKS 8
#define ACT_CHUNK 1024
#define ACT_TASKS 8
#define SPINS_BEFORE_YIELD 4096

typedef struct { /* where a step's activations live (bf16); y, attn and act have `padded` rows for the tiles */
    uint16_t *resid, *y, *qkv, *attn, *h, *gu, *act;
    int64_t padded;
    int wide; /* FEW_ROWS, WIDE_AMX, WIDE_PANEL */
    float *head_best;   /* [head tasks][rows]: each task's first maximum per row, and where */
    int64_t *head_at;
} Acts;

typedef struct { /* a thread's own outputs: a task computes here, in its destination's layout; the commit copies */
    uint16_t *out;  /* [rows, widest output] */
    uint16_t *sum;  /* [rows, hidden]: a norm's residual sum */
    uint16_t *slot; /* [kv_heads * dim]: rope's cache rows, dropped (the commit stores them) */
    float *scores, *xf;
    int64_t widened;
    float head_best[MAX_ROWS]; /* the LM-head task's first maximum per row, and where */
    int64_t head_at[MAX_ROWS];
} Own;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static inline int64_t rows_per_task(int64_t rows) { return ceil_div(rows, ROW_TASKS); }

/* Rows [*first, *end) of task k of a phase by rows (norms, rope, the final norm). */
static inline void task_rows(int64_t rows, int64_t k, int64_t *first, int64_t *end) {
    const int64_t n = rows_per_task(rows);
    *first = k * n, *end = *first + n < rows ? *first + n : rows;
}

static inline int64_t attend_items(const Model *m, int64_t rows) { /* a row's KV heads, several rows past ROW_TASKS */
    return items_per_task((int)rows, (int)m->kv_heads) * (rows >= ROW_ITEMS ? rows_per_task(rows) : 1);
}

static inline int64_t act_chunk(int64_t elements) { /* whole vectors of 16 */
    const int64_t even = ceil_div(ceil_div(elements, ACT_TASKS), 16) * 16;
    return even > ACT_CHUNK ? even : ACT_CHUNK;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ volatile("" ::: "memory");
#endif
}

/* The kind of the step's phase p: a layer's (p % PHASES), then FINAL_NORM, then HEAD. */
static inline int phase_kind(const Model *m, int64_t p) {
    return p < m->layers * PHASES ? (int)(p % PHASES) : p == m->layers * PHASES ? FINAL_NORM : HEAD;
}

/* Tasks of phase `phase` of a layer (or FINAL_NORM, HEAD). */
static int64_t phase_tasks(const Model *m, int64_t R, int phase) {
    const int64_t qkv_out = (m->heads + 2 * m->kv_heads) * m->dim;
    switch (phase) {
    case HEAD: return ceil_div(m->vocab, HEAD_CHUNK);
    case QKV: return ceil_div(qkv_out, CHUNK);
    case ATTEND: return ceil_div(R * m->kv_heads, attend_items(m, R));
    case O_PROJ: case DOWN: return ceil_div(m->hidden, CHUNK);
    case GATE_UP: return ceil_div(2 * m->intermediate, CHUNK);
    case ACT: return ceil_div(R * m->intermediate, act_chunk(R * m->intermediate));
    default: return ceil_div(R, rows_per_task(R)); /* norms, rope, the final norm: rows_per_task rows each */
    }
}

static inline void widen_once(const uint16_t *x, int64_t n, float *xf, int64_t *widened, int64_t phase_id) {
    if (*widened == phase_id) return;
    for (int64_t i = 0; i < n; i++) xf[i] = bf16_to_f32(x[i]);
    *widened = phase_id;
}

/* One linear task: outputs [k * CHUNK, ...) of y = x @ w.T + bias; on AMX from the packed weight, else from
 * the panels, else the few-row kernel, x widened first where bf16 is emulated (once per phase and thread:
 * *widened remembers which). */
static inline void linear_task(const Acts *a, const uint16_t *x, int64_t rows, int64_t in, const uint16_t *w,
                               const uint16_t *w_amx, const uint32_t *w_panel, int64_t out, const uint16_t *bias,
                               uint16_t *y, int64_t k, Own *o, int64_t phase_id) {
    const int64_t first = k * CHUNK, last = first + CHUNK < out ? first + CHUNK : out;
    if (a->wide == WIDE_AMX) {
        for (int64_t c = first; c < last; c += AMX_OUTPUTS)
            amx_chunk(x, rows, a->padded, in, w_amx, out, c, bias, y, 0, NULL, NULL);
        return;
    }
#if HAVE_AVX2_ONLY
    if (a->wide == WIDE_PANEL) {
        widen_once(x, rows * in, o->xf, &o->widened, phase_id);
        /* summed and biased in float32, rounded once: the modules' float32 path, up to the sums' order */
        panel_outputs(o->xf, rows, in, w_panel, first, last, NULL, y + first, bias, out, NULL);
        return;
    }
#else
    (void)w_panel;
#endif
#ifdef __AVX512BF16__
    (void)o, (void)phase_id;
    gemv_rows(x, rows, in, w, out, first, last, bias, y, 0);
#else
    widen_once(x, rows * in, o->xf, &o->widened, phase_id);
    gemv_rows(o->xf, rows, in, w, out, first, last, bias, y, 0);
#endif
}

/* Whether v, later in vocab order, replaces b as the first maximum: argmax's rule, a NaN counts as the maximum. */
static inline int later_wins(float v, float b) { return v > b || (v != v && b == b); }

/* LM-head task k: logits [k * HEAD_CHUNK, ...) of every row rounded to bf16 values (as gemv.linear's and
 * panel.linear's float32 logits), from the panels where the step has them, and each row's first maximum among
 * them (a NaN counts as the maximum, as in argmax). The step's greedy tokens without a [rows, vocab] tensor or a
 * second native call. */
static void head_task(const Model *m, const Step *s, int64_t k, Own *o) {
    const int64_t R = s->rows, H = m->hidden, first = k * HEAD_CHUNK;
    const int64_t width = first + HEAD_CHUNK < m->vocab ? HEAD_CHUNK : m->vocab - first;
#ifdef __AVX512BF16__
    const xelem *x = s->out;
#else
    widen_once(s->out, R * H, o->xf, &o->widened, -2); /* the final norm's rows, once per thread */
    const xelem *x = o->xf;
#endif
#if HAVE_AVX2_ONLY
    if (m->lm_head_panel) { /* panel_linear's argmax: each row's lanes kept from the registers, then merged */
        float best[MAX_ROWS * 16];
        int32_t at[MAX_ROWS * 16];
        for (int64_t j = 0; j < R * 16; j++) best[j] = -INFINITY, at[j] = INT32_MAX;
        const PanelBest pb = {best, at};
        panel_outputs(x, R, H, m->lm_head_panel, first, first + width, NULL, NULL, NULL, 0, &pb);
        lanes_argmax(best, at, 1, R, o->head_at, o->head_best);
        return;
    }
#endif
    float y[MAX_ROWS * HEAD_CHUNK];
    gemv_rows(x, R, H, m->lm_head + first * H, width, 0, width, NULL, y, 1);
    for (int64_t r = 0; r < R; r++) {
        const float *row = y + r * width;
        int64_t at = 0;
        for (int64_t i = 1; i < width; i++)
            if (later_wins(row[i], row[at])) at = i;
        o->head_best[r] = row[at], o->head_at[r] = first + at;
    }
}

/* Task k of `phase` of layer l (l == layers: the final norm), into the thread's own buffers: it reads only
 * activations of phases before it, so a copy of it run twice (below: stolen) computes the same bits. */
static void run_task(const Model *m, const Step *s, const Acts *a, int64_t l, int phase, int64_t k, Own *o) {
    const int64_t R = s->rows, H = m->hidden, D = m->dim, I = m->intermediate;
    const int64_t qkv_out = (m->heads + 2 * m->kv_heads) * D, phase_id = l * PHASES + phase;
    if (phase == HEAD) {
        head_task(m, s, k, o);
        return;
    }
    int64_t first_row, end_row;
    task_rows(R, k, &first_row, &end_row);
    if (l == m->layers) { /* the final norm of the task's rows */
        for (int64_t r = first_row; r < end_row; r++)
            norm_row(a->h + r * H, a->resid + r * H, o->sum + r * H, o->out + r * H, m->final_norm, (int)H, m->eps, 1);
        return;
    }
    const Layer *L = &m->layer[l];
    switch (phase) {
    case NORM_IN: /* y = norm(x + residual), the sum the new residual; layer 0: residual = x */
        for (int64_t r = first_row; r < end_row; r++) {
            if (l == 0) norm_row(s->x + r * H, NULL, NULL, o->out + r * H, L->input_norm, (int)H, m->eps, 1);
            else norm_row(a->h + r * H, a->resid + r * H, o->sum + r * H, o->out + r * H, L->input_norm, (int)H,
                          m->eps, 1);
        }
        break;
    case QKV:
        linear_task(a, a->y, R, H, L->qkv, L->qkv_amx, L->qkv_panel, qkv_out, L->qkv_bias, o->out, k, o, phase_id);
        break;
    case ROPE: /* rotated in a copy of the rows; the cache rows go to a scratch slot */
        memcpy(o->out + first_row * qkv_out, a->qkv + first_row * qkv_out,
               sizeof(uint16_t) * (size_t)((end_row - first_row) * qkv_out));
        for (int64_t r = first_row; r < end_row; r++)
            rope_token(o->out + r * qkv_out, s->cos + r * D, s->sin + r * D, o->slot, o->slot, 0, (int)m->heads,
                       (int)m->kv_heads, (int)D, 1);
        break;
    case ATTEND: {
        const Problem p = {a->qkv, L->k_cache, L->v_cache, s->table, s->positions, o->out, qkv_out,
                           s->table_row_stride, (int)R, (int)m->heads, (int)m->kv_heads, (int)D,
                           (int)m->block_size, (int)L->window, m->scale};
        const int64_t n = attend_items(m, R);
        for (int64_t w = k * n; w < (k + 1) * n && w < R * m->kv_heads; w++)
            attend_item(&p, (int)(w / m->kv_heads), (int)(w % m->kv_heads), o->scores, 1);
        break;
    }
    case O_PROJ:
        linear_task(a, a->attn, R, m->heads * D, L->o, L->o_amx, L->o_panel, H, L->o_bias, o->out, k, o, phase_id);
        break;
    case NORM_POST:
        for (int64_t r = first_row; r < end_row; r++)
            norm_row(a->h + r * H, a->resid + r * H, o->sum + r * H, o->out + r * H, L->post_norm, (int)H, m->eps, 1);
        break;
    case GATE_UP:
        linear_task(a, a->y, R, H, L->gate_up, L->gate_up_amx, L->gate_up_panel, 2 * I, L->gate_up_bias, o->out, k, o,
                    phase_id);
        break;
    case ACT: { /* act(gate) * up, each rounded to bf16 as PyTorch's two ops; elements [first, last) */
        const int64_t n = act_chunk(R * I), first = k * n, last = first + n < R * I ? first + n : R * I;
        act_span(m->act_table, a->gu, o->out, I, first, last);
        break;
    }
    default:
        linear_task(a, a->act, R, I, L->down, L->down_amx, L->down_panel, H, L->down_bias, o->out, k, o, phase_id);
        break;
    }
}

/* Columns [first, last) of every row of y [rows, width], from the thread's copy in the same layout. */
static inline void copy_columns(uint16_t *y, const uint16_t *own, int64_t rows, int64_t width, int64_t first,
                                int64_t last) {
    if (last - first == CHUNK) { /* a constant size: inlined moves, not ~10k library calls a step */
        for (int64_t r = 0; r < rows; r++)
            memcpy(y + r * width + first, own + r * width + first, sizeof(uint16_t) * CHUNK);
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        memcpy(y + r * width + first, own + r * width + first, sizeof(uint16_t) * (size_t)(last - first));
}

/* Task k's outputs from the thread's copy to the activations (and rope's to the cache): run by the one thread
 * whose claim of the task won. */
static void commit_task(const Model *m, const Step *s, const Acts *a, int64_t l, int phase, int64_t k, const Own *o) {
    const int64_t R = s->rows, H = m->hidden, D = m->dim, I = m->intermediate, kv = m->kv_heads * D;
    const int64_t qkv_out = (m->heads + 2 * m->kv_heads) * D;
    const size_t row = sizeof(uint16_t) * (size_t)H;
    const int64_t first = k * CHUNK;
    if (phase == HEAD) {
        memcpy(a->head_best + k * R, o->head_best, sizeof(float) * (size_t)R);
        memcpy(a->head_at + k * R, o->head_at, sizeof(int64_t) * (size_t)R);
        return;
    }
    int64_t first_row, end_row;
    task_rows(R, k, &first_row, &end_row);
    const size_t rows = row * (size_t)(end_row - first_row);
    if (l == m->layers) {
        memcpy(s->out + first_row * H, o->out + first_row * H, rows);
        return;
    }
    const Layer *L = &m->layer[l];
    switch (phase) {
    case NORM_IN: case NORM_POST:
        memcpy(a->resid + first_row * H, (l == 0 && phase == NORM_IN ? s->x : o->sum) + first_row * H, rows);
        memcpy(a->y + first_row * H, o->out + first_row * H, rows);
        break;
    case QKV: copy_columns(a->qkv, o->out, R, qkv_out, first, first + CHUNK < qkv_out ? first + CHUNK : qkv_out); break;
    case ROPE:
        memcpy(a->qkv + first_row * qkv_out, o->out + first_row * qkv_out,
               sizeof(uint16_t) * (size_t)((end_row - first_row) * qkv_out));
        for (int64_t r = first_row; r < end_row; r++) {
            const uint16_t *rotated = o->out + r * qkv_out;
            const int64_t at = s->slots[r] * kv;
            memcpy((uint16_t *)L->k_cache + at, rotated + m->heads * D, sizeof(uint16_t) * (size_t)kv);
            memcpy((uint16_t *)L->v_cache + at, rotated + m->heads * D + kv, sizeof(uint16_t) * (size_t)kv);
        }
        break;
    case ATTEND: { /* the query heads of task k's items: consecutive KV heads of consecutive rows */
        const int64_t group = m->heads / m->kv_heads, items = attend_items(m, R), first = k * items;
        const int64_t n = first + items < R * m->kv_heads ? items : R * m->kv_heads - first;
        const int64_t at = ((first / m->kv_heads) * m->heads + (first % m->kv_heads) * group) * D;
        memcpy(a->attn + at, o->out + at, sizeof(uint16_t) * (size_t)(n * group * D));
        break;
    }
    case O_PROJ: case DOWN: copy_columns(a->h, o->out, R, H, first, first + CHUNK < H ? first + CHUNK : H); break;
    case GATE_UP: copy_columns(a->gu, o->out, R, 2 * I, first, first + CHUNK < 2 * I ? first + CHUNK : 2 * I); break;
    default: { /* ACT */
        const int64_t n = act_chunk(R * I), at = k * n, last = at + n < R * I ? at + n : R * I;
        memcpy(a->act + at, o->out + at, sizeof(uint16_t) * (size_t)(last - at));
        break;
    }
    }
}

typedef struct { /* the step's shared state */
    const Model *m;
    const Step *s;
    const Acts *a;
    int64_t phases;
    const int64_t *end; /* tasks before phase p's end */
    int64_t *done;      /* per phase: tasks committed */
    uint8_t *claimed;   /* per task: 1 once a thread won the right to commit it */
} Plan;

static inline int64_t phase_start(const Plan *pl, int64_t p) { return p > 0 ? pl->end[p - 1] : 0; }

static inline int phase_done(const Plan *pl, int64_t p) {
    return __atomic_load_n(&pl->done[p], __ATOMIC_ACQUIRE) == pl->end[p] - phase_start(pl, p);
}

/* Runs task t (phase p) and commits it unless another thread did first. Returns 1 when this thread committed. */
static int finish_task(const Plan *pl, int64_t p, int64_t t, Own *o) {
    const int phase = phase_kind(pl->m, p);
    const int64_t l = phase >= FINAL_NORM ? pl->m->layers : p / PHASES, k = t - phase_start(pl, p);
    run_task(pl->m, pl->s, pl->a, l, phase, k, o);
    uint8_t free_ = 0;
    if (!__atomic_compare_exchange_n(&pl->claimed[t], &free_, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return 0;
    commit_task(pl->m, pl->s, pl->a, l, phase, k, o);
    __atomic_fetch_add(&pl->done[p], 1, __ATOMIC_RELEASE);
    return 1;
}

/* A thread waiting on phase q redoes its uncommitted tasks (their takers are preempted, or slower), from the
 * first unfinished phase on while the phase before each is complete. Returns how many it committed. */
static int64_t help(const Plan *pl, int64_t q, Own *o) {
    int64_t e = q, n = 0;
    while (e > 0 && !phase_done(pl, e - 1)) e--;
    for (; e <= q && (e == 0 || phase_done(pl, e - 1)); e++)
        for (int64_t t = phase_start(pl, e); t < pl->end[e]; t++)
            if (!__atomic_load_n(&pl->claimed[t], __ATOMIC_RELAXED)) n += finish_task(pl, e, t, o);
    return n;
}

/* Step.x, cos and sin from the tables (those NULL; `own` has room for them). Returns 0, -4 for a token id outside
 * the embedding, -5 for a position outside the rotary table. */
static int gather_inputs(const Model *m, Step *s, uint16_t *own) {
    const int64_t R = s->rows, H = m->hidden, D = m->dim;
    if (!s->x) {
        for (int64_t r = 0; r < R; r++) {
            if (s->ids[r] < 0 || s->ids[r] >= m->vocab_rows) return -4;
            memcpy(own + r * H, m->embed + s->ids[r] * H, sizeof(uint16_t) * (size_t)H);
        }
        s->x = own, own += R * H;
    }
    if (!s->cos) {
        uint16_t *cos = own, *sin = own + R * D;
        for (int64_t r = 0; r < R; r++) {
            const int64_t p = s->positions[r];
            if (p < 0 || p >= m->max_positions) return -5;
            for (int64_t j = 0; j < D; j++) {
                cos[r * D + j] = f32_to_bf16(m->cos_table[p * D + j]);
                sin[r * D + j] = f32_to_bf16(m->sin_table[p * D + j]);
            }
        }
        s->cos = cos, s->sin = sin;
    }
    return 0;
}

/* Every row's position inside its table row and the step's context, and the block ids it reads inside the cache:
 * the attention indexes memory with them unchecked. */
static int positions_fit(const Model *m, const Step *s) {
    const int64_t blocks = m->num_slots / m->block_size;
    for (int64_t r = 0; r < s->rows; r++) {
        const int64_t p = s->positions[r];
        if (p < 0 || p >= s->max_len || p / m->block_size >= s->table_row_stride) return 0;
        const int64_t *row = s->table + r * s->table_row_stride;
        for (int64_t b = 0; b <= p / m->block_size; b++)
            if (row[b] < 0 || row[b] >= blocks) return 0;
    }
    return 1;
}

/* Returns 0; -1 for a shape it does not take (rows outside 1..max_rows, head dim, group, AMX missing, no tables
 * for inputs not given); -2 out of memory; -3 a slot outside the cache, -4 a token id outside the embedding, -5 a
 * position outside the rotary table, its block table or the context, or a block id outside the cache (nothing
 * written, for each).
 *
 * The step is a chain of phases (per layer: NORM_IN .. DOWN; then the final norm), each cut into tasks. Threads
 * take the next task from one counter, and a task waits only until every task of the phase before it is
 * done: no barrier. A thread the OS preempts (two cores shared with tritonserver and its clients) would still
 * hold up the next phase by the task it has: a thread that waits long redoes that task itself, and whichever
 * copy finishes first is committed (tasks compute into per-thread buffers), so the step goes on meanwhile. */
int decode_step(const Model *m, Step *given) {
    Step step = *given, *s = &step; /* its x, cos and sin may be gathered here */
    const int64_t R = s->rows, H = m->hidden, D = m->dim, I = m->intermediate;
    const int64_t qkv_out = (m->heads + 2 * m->kv_heads) * D, group = m->heads / m->kv_heads;
    const int wide = R <= m->few_rows ? FEW_ROWS : m->panels ? WIDE_PANEL : WIDE_AMX, amx = wide == WIDE_AMX;
    if (R < 1 || R > m->max_rows || (!wide && R > MAX_ROWS) || (wide == WIDE_PANEL && !HAVE_AVX2_ONLY)
        || attention_shape_ok((int)m->heads, (int)m->kv_heads, (int)D) || D % 2 || D > MAX_DIM || (amx && !amx_ready()))
        return -1;
    const int head = s->argmax != NULL; /* the LM head: few rows only (past them amx_linear or the model's) */
    if (head && ((wide && !(wide == WIDE_PANEL && m->lm_head_panel)) || R > MAX_ROWS || !m->lm_head || m->vocab < 1))
        return -1;
    for (int64_t l = 0; wide && l < m->layers; l++) {
        const Layer *L = &m->layer[l];
        if (amx ? !L->qkv_amx || !L->o_amx || !L->gate_up_amx || !L->down_amx
                : !L->qkv_panel || !L->o_panel || !L->gate_up_panel || !L->down_panel)
            return -1;
    }
    if ((!s->x && (!s->ids || !m->embed)) || (!s->cos && (!m->cos_table || !m->sin_table)) || !s->cos != !s->sin)
        return -1;
    for (int64_t r = 0; r < R; r++)
        if (s->slots[r] < 0 || s->slots[r] >= m->num_slots) return -3;
    if (!positions_fit(m, s)) return -5;
    const int64_t threads = s->threads > 0 ? s->threads : 1, max_len = s->max_len > 0 ? s->max_len : 1;
    const int64_t widest = (H > I ? H : I) > m->heads * D ? (H > I ? H : I) : m->heads * D;
    const int64_t phases = m->layers * PHASES + 1 + head; /* then the final norm, and the LM head */
    const int64_t P = amx ? (R + 15) / 16 * 16 : R; /* rows of the linears' inputs: whole tiles on AMX */
    /* activations (bf16): residual, normed x, qkv, attention, o / down output, gate|up, act */
    const size_t acts = (size_t)R * (size_t)(2 * H + qkv_out + 2 * I) + (size_t)P * (size_t)(H + m->heads * D + I);
    /* scores, x widened */
    const size_t per_thread = (size_t)group * (size_t)max_len + (amx ? 0 : (size_t)R * (size_t)widest);
    int64_t widest_out = qkv_out > 2 * I ? qkv_out : 2 * I; /* heads * dim is at most qkv_out */
    if (H > widest_out) widest_out = H;
    /* per thread: out, sum, slot (Own) */
    const size_t own = ((size_t)R * (size_t)(widest_out + H) + (size_t)(m->kv_heads * D) + 31) / 32 * 32;
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)(2 * phases + 1)); /* done, end, next */
    if (!counts) return -2;
    int64_t *done = counts, *end = done + phases, *next = end + phases;
    memset(done, 0, sizeof(int64_t) * (size_t)phases);
    *next = 0;
    for (int64_t p = 0, total = 0; p < phases; p++) {
        total += phase_tasks(m, R, phase_kind(m, p));
        end[p] = total;
    }
    const int64_t tasks = end[phases - 1], head_tasks = head ? end[phases - 1] - end[phases - 2] : 0;
    const size_t thread_bytes = per_thread * sizeof(float) + own * sizeof(uint16_t);
    const size_t head_bytes = (size_t)(head_tasks * R) * (sizeof(float) + sizeof(int64_t));
    const size_t inputs = (size_t)R * (size_t)(H + 2 * D); /* x, cos, sin where gathered here */
    char *scratch = malloc(acts * sizeof(uint16_t) + (size_t)threads * thread_bytes + (size_t)tasks + head_bytes
                           + inputs * sizeof(uint16_t) + 320);
    if (!scratch) {
        free(counts);
        return -2;
    }
    Acts a;
    a.padded = P, a.wide = wide;
    a.resid = (uint16_t *)scratch;
    a.y = a.resid + R * H, a.qkv = a.y + P * H, a.attn = a.qkv + R * qkv_out, a.h = a.attn + P * m->heads * D;
    a.gu = a.h + R * H, a.act = a.gu + R * 2 * I;
    float *floats = (float *)(((uintptr_t)(a.act + P * I) + 63) & ~(uintptr_t)63);
    uint16_t *owns = (uint16_t *)(((uintptr_t)(floats + (size_t)threads * per_thread) + 63) & ~(uintptr_t)63);
    uint8_t *claimed = (uint8_t *)(owns + (size_t)threads * own);
    memset(claimed, 0, (size_t)tasks);
    a.head_at = (int64_t *)(((uintptr_t)(claimed + tasks) + 63) & ~(uintptr_t)63);
    a.head_best = (float *)(a.head_at + head_tasks * R);
    uint16_t *inputs_at = (uint16_t *)(((uintptr_t)(a.head_best + head_tasks * R) + 63) & ~(uintptr_t)63);
    const int gathered = gather_inputs(m, s, inputs_at);
    if (gathered) {
        free(scratch);
        free(counts);
        return gathered;
    }
    if (P > R) { /* the tiles' padding rows: zeros, never written by a phase */
        memset(a.y + R * H, 0, sizeof(uint16_t) * (size_t)((P - R) * H));
        memset(a.attn + R * m->heads * D, 0, sizeof(uint16_t) * (size_t)((P - R) * m->heads * D));
        memset(a.act + R * I, 0, sizeof(uint16_t) * (size_t)((P - R) * I));
    }
    const Plan plan = {m, s, &a, phases, end, done, claimed};
    int64_t stolen = 0;

#pragma omp parallel num_threads(threads) reduction(+ : stolen)
    {
        const int id = omp_get_thread_num();
        Own o;
        o.scores = floats + (size_t)id * per_thread, o.xf = o.scores + (size_t)group * (size_t)max_len, o.widened = -1;
        o.out = owns + (size_t)id * own, o.sum = o.out + R * widest_out, o.slot = o.sum + R * H;
        int64_t p = 0;
        if (amx) amx_configure();
        for (;;) {
            const int64_t t = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
            if (t >= tasks) break;
            while (t >= end[p]) p++;
            /* the phase before done: spin, then redo its tasks still out, then give the core away */
            for (int64_t spins = 0; p > 0 && !phase_done(&plan, p - 1); spins++) {
                if (spins == s->steal_spins) {
                    const int64_t n = help(&plan, p - 1, &o);
                    stolen += n;
                    if (n) spins = -1; /* progress: wait afresh */
                } else if (spins >= SPINS_BEFORE_YIELD) {
                    sched_yield();
                } else {
                    cpu_relax();
                }
            }
            if (t == s->stall_task && s->steal_spins >= 0 && omp_get_num_threads() > 1) { /* tests: Step.stall_task */
                const int64_t until = p + PHASES < m->layers * PHASES ? p + PHASES : m->layers * PHASES - 1;
                for (int i = 0; i < 1000000 && !phase_done(&plan, until); i++) sched_yield();
            }
            finish_task(&plan, p, t, &o);
        }
        if (amx) amx_release();
    }
    given->stolen = stolen;
    for (int64_t r = 0; r < R && head; r++) { /* the tasks' maxima in vocab order: the first maximum, or NaN */
        int64_t best = 0;
        for (int64_t k = 1; k < head_tasks; k++)
            if (later_wins(a.head_best[k * R + r], a.head_best[best * R + r])) best = k;
        s->argmax[r] = a.head_at[best * R + r];
    }
    free(scratch);
    free(counts);
    return 0;
}

/* 1 where this build has AMX-BF16 and Linux granted its tile state to the process, else 0. */
int amx_ready(void) {
    static int state = -1; /* asked once */
    if (state < 0) state = HAVE_AMX && amx_permitted();
    return state;
}

/* y [rows, out] = x @ w.T + bias on AMX (the LM head of a fused step, tests; decode steps call amx_chunk): x has
 * `padded` rows (a multiple of 16; the padding zeros), w packed by vnni_pack; y bf16 or (y_f32) float32, or NULL
 * with `argmax`. `argmax` (int64 [rows]; with float32 y or none): each row's first maximum, as torch.argmax,
 * kept per lane from the registers (amx_argmax_update) and merged here.
 * Returns 0, -1 without AMX or for a shape it does not take (in a multiple of 32, out of 16), -2 out of memory. */
int amx_linear(const uint16_t *x, int64_t rows, int64_t padded, int64_t in, const uint16_t *w, int64_t out,
               const uint16_t *bias, void *y, int64_t y_f32, int64_t threads, int64_t *argmax) {
    if (!amx_ready() || in % 32 || out % 16 || padded % 16 || rows > padded || rows < 1 || (argmax && y && !y_f32) ||
        (!y && !argmax))
        return -1;
    const int64_t chunks = (out + AMX_OUTPUTS - 1) / AMX_OUTPUTS, teams = threads > 0 ? threads : 1, lanes = rows * 16;
    float *best = argmax ? malloc(sizeof(float) * (size_t)(teams * lanes)) : NULL;
    int32_t *at = argmax ? malloc(sizeof(int32_t) * (size_t)(teams * lanes)) : NULL;
    if (argmax && (!best || !at)) {
        free(best), free(at);
        return -2;
    }
    for (int64_t j = 0; argmax && j < teams * lanes; j++) best[j] = -INFINITY, at[j] = INT32_MAX;
#pragma omp parallel num_threads(teams)
    {
        const int64_t id = omp_get_thread_num();
        float *b = best ? best + id * lanes : NULL;
        int32_t *a = at ? at + id * lanes : NULL;
        amx_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) amx_chunk(x, rows, padded, in, w, out, c * AMX_OUTPUTS, bias, y, (int)y_f32, b, a);
        amx_release();
    }
    if (argmax) lanes_argmax(best, at, teams, rows, argmax, NULL); /* every thread's lanes, as amx_argmax_update */
    free(best), free(at);
    return 0;
}
