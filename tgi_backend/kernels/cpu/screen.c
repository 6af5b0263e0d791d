/* The LM head's greedy tokens on AVX2 (no AVX-512), screened in 8-bit integers, then decided exactly.
 *
 * Past a few rows the head is compute-bound, and AVX2's u8 x s8 multiply-add (vpmaddubsw: 32 products an
 * instruction) does ~2.3x the float32 FMAs' products a cycle here. Every row and output gets an integer
 * estimate A of x . w with a rigorous bound e on |x . w - A| (Cauchy-Schwarz over the two quantization errors,
 * plus float32's summation error), so only outputs whose A + e reaches the row's best A - e can hold the
 * maximum. Those few are computed exactly as panel.h does (one FMA chain an output, input by input), rounded to
 * bf16 and compared with argmax's rule: the token is the one panel_linear's argmax gives, bit for bit. The 8 of
 * highest bound go first: the bounds grow with the square root of the width, and at hidden 1024 (medium) ~750
 * outputs reach the best lower bound, a few dozen the exact best of those 8. Rows the screen cannot narrow
 * (non-finite or huge values, too many candidates) are left to panel_linear (screen.py).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "panel.h"

#define LEVELS 63           /* |w_q|, |x_q| <= 63, x_q + 64 <= 127: two vpmaddubsw pair sums add in int16 */
#define SCREEN_CHUNK 128    /* outputs per task: 8 panels, 64 KB of int8 at 512 inputs */
#define SCREEN_MR 3         /* rows per micro-kernel call: 6 int32 sums in registers */
#define SCREEN_AHEAD 4096   /* bytes of weights asked for ahead at one or two rows */
#define MAX_CANDIDATES 1024 /* per row past the first 8; beyond, the row is computed whole */
#define STATS 4             /* per output: scale, ||dw||, s ||w_q|| + ||dw||, ||w||; [outputs / 8][STATS][8] */

/* 1 where this build has the screen (and panel.h's kernel for the exact part). */
int screen_ready(void) { return HAVE_AVX2_ONLY; }

static inline int64_t padded_in(int64_t in) { return (in + 7) / 8 * 8; }

/* A float at least d (bounds are rounded up). */
static inline float up(double d) { return nextafterf((float)(d * (1.0 + 1e-9)), INFINITY); }

/* Byte of output o, input k in the screen's layout: per panel of 16 outputs and 8 inputs, four 32-byte lines
 * (outputs 0-7 inputs 0-3, outputs 0-7 inputs 4-7, then outputs 8-15), each output's 4 inputs together. */
static inline int64_t screen_at(int64_t o, int64_t k, int64_t kp) {
    const int64_t half = (o % 16) / 8, sub = (k % 8) / 4;
    return (((o / 16) * (kp / 8) + k / 8) * 4 + half * 2 + sub) * 32 + (o % 8) * 4 + k % 4;
}

/* w [out, in] bf16 -> wq [ceil(out / 16) * 16 * padded in] int8 (w / scale rounded, |.| <= 63), stats (STATS
 * floats for as many outputs) and sumq (the sum of each output's w_q). Returns 0; -1 where a weight is not
 * finite or past 1e15 (no bound may overflow). */
int screen_pack(const uint16_t *w, int64_t out, int64_t in, int8_t *wq, float *stats, int32_t *sumq) {
    const int64_t kp = padded_in(in), outs = (out + 15) / 16 * 16;
    memset(wq, 0, (size_t)(outs * kp));
    int refused = 0;
#pragma omp parallel for schedule(static) reduction(| : refused)
    for (int64_t o = 0; o < outs; o++) {
        float *st = stats + (o / 8) * STATS * 8 + o % 8; /* st[8 * i]: statistic i */
        st[0] = st[8] = st[16] = st[24] = 0.0f, sumq[o] = 0;
        if (o >= out) continue;
        double mx = 0.0;
        for (int64_t k = 0; k < in; k++) {
            const float v = bf16_to_f32(w[o * in + k]);
            if (!(fabsf(v) <= 1e15f)) refused = 1; /* NaN too */
            mx = fmax(mx, fabs(v));
        }
        if (refused) continue;
        const float s = mx > 0.0 ? (float)(mx / LEVELS) : 1.0f;
        double dw2 = 0.0, q2 = 0.0, w2 = 0.0;
        int32_t sum = 0;
        for (int64_t k = 0; k < in; k++) {
            const double v = bf16_to_f32(w[o * in + k]);
            long q = lrint(v / s);
            q = q > LEVELS ? LEVELS : q < -LEVELS ? -LEVELS : q;
            const double d = v - (double)s * (double)q; /* exact in double: s has 24 bits, q 7 */
            dw2 += d * d, q2 += (double)q * q, w2 += v * v, sum += (int32_t)q;
            wq[screen_at(o, k, kp)] = (int8_t)q;
        }
        st[0] = s, st[8] = up(sqrt(dw2)), st[16] = up(s * sqrt(q2) + sqrt(dw2)), st[24] = up(sqrt(w2));
        sumq[o] = sum;
    }
    return refused ? -1 : 0;
}

#if HAVE_AVX2_ONLY
typedef struct { /* a row quantized: x ~ t x_q; norms rounded up */
    float t, xqn, dxn, gx; /* t ||x_q||, ||x - t x_q||, float32 summation's bound per ||w|| */
    int ok;                /* finite and small enough that no bound overflows */
} RowQ;

/* Row x (in bf16) -> xf (float32), xu (x_q + 64, padded with 64: zero weights there) and its RowQ. */
static RowQ quantize_row(const uint16_t *x, int64_t in, float *xf, uint8_t *xu) {
    RowQ q = {1.0f, 0.0f, 0.0f, 0.0f, 1};
    double mx = 0.0;
    for (int64_t k = 0; k < in; k++) {
        xf[k] = bf16_to_f32(x[k]);
        if (!isfinite(xf[k])) q.ok = 0;
        else mx = fmax(mx, fabs(xf[k]));
    }
    if (!q.ok || mx > 1e15) return (RowQ){1.0f, 0.0f, 0.0f, 0.0f, 0};
    q.t = mx > 0.0 ? (float)(mx / LEVELS) : 1.0f;
    double q2 = 0.0, d2 = 0.0, x2 = 0.0;
    for (int64_t k = 0; k < padded_in(in); k++) {
        long v = 0;
        if (k < in) {
            v = lrint(xf[k] / q.t);
            v = v > LEVELS ? LEVELS : v < -LEVELS ? -LEVELS : v;
            const double d = (double)xf[k] - (double)q.t * (double)v;
            q2 += (double)v * v, d2 += d * d, x2 += (double)xf[k] * xf[k];
        }
        xu[k] = (uint8_t)(v + 64);
    }
    const double gamma = in * 0x1p-24 / (1.0 - in * 0x1p-24); /* |fl(sum) - sum| <= gamma sum |x_k w_k| */
    q.xqn = up(q.t * sqrt(q2)), q.dxn = up(sqrt(d2)), q.gx = up(gamma * sqrt(x2));
    return q;
}

/* Outputs o .. o + 16 of MR rows: the integer sums, then each output's bounds lo/hi: hi stored (hi + r * ldh),
 * lo folded into the rows' running maxima per lane (lomax + r * 8); outputs past `out`: -inf. */
static inline __attribute__((always_inline)) void screen_micro(const uint8_t *xu, int64_t kp, const int8_t *wq,
                                                                const float *stats, const int32_t *sumq, const RowQ *rq,
                                                                const int MR, const int ahead, int64_t o, int64_t out,
                                                                float *hi, int64_t ldh, float *lomax) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[SCREEN_MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kp; k += 8) {
        const __m256i *w = (const __m256i *)(wq + k * 16); /* four lines: see screen_at */
        if (ahead) { /* one or two rows: the weights come from DRAM, 4 KB ahead (as panel_outputs_ahead) */
            __builtin_prefetch((const char *)w + SCREEN_AHEAD, 0, 3);
            __builtin_prefetch((const char *)w + SCREEN_AHEAD + 64, 0, 3);
        }
        for (int r = 0; r < MR; r++) {
            int32_t four[2];
            memcpy(four, xu + r * kp + k, sizeof four);
            const __m256i xa = _mm256_set1_epi32(four[0]), xb = _mm256_set1_epi32(four[1]);
            for (int h = 0; h < 2; h++) { /* two pair sums <= 2 * 2 * 127 * 63 < 32768: int16 holds them */
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(xa, _mm256_load_si256(w + 2 * h)),
                                                   _mm256_maddubs_epi16(xb, _mm256_load_si256(w + 2 * h + 1)));
                acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(p, ones));
            }
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 tiny = _mm256_set1_ps(0x1p-20f), slack = _mm256_set1_ps(1.0f + 0x1p-16f);
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int h = 0; h < 2; h++) {
        const int64_t at = o + 8 * h;
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(out - at)), lane));
        __m256 st[STATS];
        for (int i = 0; i < STATS; i++) st[i] = _mm256_loadu_ps(stats + (at / 8) * STATS * 8 + i * 8);
        const __m256i bias = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(sumq + at)), 6); /* 64 sum w_q */
        for (int r = 0; r < MR; r++) {
            const __m256 a = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], bias)), st[0]),
                                           _mm256_set1_ps(rq[r].t));
            __m256 e = _mm256_mul_ps(_mm256_set1_ps(rq[r].xqn), st[1]);
            e = _mm256_fmadd_ps(_mm256_set1_ps(rq[r].dxn), st[2], e);
            e = _mm256_fmadd_ps(_mm256_set1_ps(rq[r].gx), st[3], e);
            e = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_and_ps(a, abs_mask), tiny, e), slack);
            const __m256 lo = _mm256_blendv_ps(minus_inf, _mm256_sub_ps(a, e), valid);
            const __m256 hv = _mm256_blendv_ps(minus_inf, _mm256_add_ps(a, e), valid);
            _mm256_storeu_ps(hi + r * ldh + at, hv);
            _mm256_storeu_ps(lomax + r * 8, _mm256_max_ps(_mm256_loadu_ps(lomax + r * 8), lo));
        }
    }
}

/* Rows [0, rows) through outputs [first, last) (first a multiple of 16), SCREEN_MR rows a call. */
static void screen_rows(const uint8_t *xu, int64_t rows, int64_t kp, const int8_t *wq, const float *stats,
                        const int32_t *sumq, const RowQ *rq, int64_t first, int64_t last, int64_t out, float *hi,
                        int64_t ldh, float *lomax) {
    for (int64_t o = first; o < last; o += PANEL) {
        const int8_t *w = wq + (o / 16) * 16 * kp;
#define SCREEN_CALL(MR, AHEAD)                                                                                  \
    screen_micro(xu + r * kp, kp, w, stats, sumq, rq + r, MR, AHEAD, o, out, hi + r * ldh, ldh, lomax + r * 8)
        int64_t r = 0;
        if (rows <= 2) {
            if (rows == 1) SCREEN_CALL(1, 1);
            else SCREEN_CALL(2, 1);
            continue;
        }
        for (; r + SCREEN_MR <= rows; r += SCREEN_MR) SCREEN_CALL(SCREEN_MR, 0);
        switch (rows - r) {
        case 2: SCREEN_CALL(2, 0); break;
        case 1: SCREEN_CALL(1, 0); break;
        default: break;
        }
#undef SCREEN_CALL
    }
}

/* Exact logits of up to 8 outputs `at` of row xf, rounded to bf16, into v: panel.h's sums (one FMA chain an
 * output, input by input, from zero), from the plain weights w [out, in] (a candidate's 2 bytes an input, where
 * its panel would bring 32). Each input's 8 weights come in one gather of the 4 bytes ending at them. */
static void exact8(const float *xf, int64_t in, const uint16_t *w, const int32_t *at, int n, float *v) {
    int32_t idx[8];
    for (int i = 0; i < 8; i++) idx[i] = (int32_t)((int64_t)at[i < n ? i : n - 1] * in);
    const __m256i rows = _mm256_loadu_si256((const __m256i *)idx), high = _mm256_set1_epi32((int)0xffff0000u);
    /* input 0: the 4 bytes from it (its weight in the low half); then those ending at each input (the high half) */
    __m256 acc = _mm256_fmadd_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_i32gather_epi32((const int *)w, rows, 2), 16)),
        _mm256_broadcast_ss(xf), _mm256_setzero_ps());
    for (int64_t k = 1; k < in; k++) {
        const __m256i g = _mm256_i32gather_epi32((const int *)(w + k - 1), rows, 2);
        acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(g, high)), _mm256_broadcast_ss(xf + k), acc);
    }
    float s[8];
    _mm256_storeu_ps(s, acc);
    for (int i = 0; i < n; i++) v[i] = bf16_to_f32(f32_to_bf16(s[i]));
}

/* The n <= 8 outputs of row hi [out] with the highest bounds (-inf ones never), into first; returns n. */
static int highest8(const float *hi, int64_t out, int32_t *first) {
    float v[8];
    int n = 0, low = 0; /* low: the slot of the lowest of 8 kept */
    __m256 floor_ = _mm256_set1_ps(-INFINITY);
    for (int64_t o = 0; o < out; o += 8) {
        const int lanes = out - o < 8 ? (int)(out - o) : 8;
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(hi + o), floor_, _CMP_GT_OQ)) & ((1 << lanes) - 1);
        while (m) { /* rare once 8 are kept: a vector compare a step */
            const int64_t c = o + __builtin_ctz(m);
            m &= m - 1;
            if (n < 8) {
                v[n] = hi[c], first[n++] = (int32_t)c;
            } else if (hi[c] > v[low]) {
                v[low] = hi[c], first[low] = (int32_t)c;
            } else {
                continue;
            }
            if (n == 8) {
                for (int i = 0; i < 8; i++) low = v[i] < v[low] ? i : low;
                floor_ = _mm256_set1_ps(v[low]);
            }
        }
    }
    return n;
}

/* Below best - 2^-5 |best|, an output's bf16 value is below the best's (bf16 rounds by at most 2^-8 of it). */
static inline float below(float best) { return nextafterf(best - (0x1p-5f * fabsf(best) + 1e-37f), -INFINITY); }

/* Row r's token from its screen. The 8 outputs of highest bound are computed exactly first: their best (an
 * exact value, no 2e of doubt) sets the floor; the others whose bound reaches it (or the best lower bound) are
 * computed in ascending order, so the first of equals is the lowest. hi is the row's scratch (changed).
 * Returns 0, or -1 when the row must go whole. */
static int decide_row(float *hi, int64_t out, const float *lomax, int64_t teams,
                      int64_t lanes, const float *xf, int64_t in, const uint16_t *w, int32_t *cand, int64_t *token) {
    float lo_best = -INFINITY;
    for (int64_t t = 0; t < teams; t++)
        for (int l = 0; l < 8; l++) lo_best = fmaxf(lo_best, lomax[t * lanes + l]);
    if (!isfinite(lo_best)) return -1;
    int32_t first[8];
    const int nf = highest8(hi, out, first);
    float v[8], best = -INFINITY;
    int32_t at = INT32_MAX;
    exact8(xf, in, w, first, nf, v);
    for (int j = 0; j < nf; j++) {
        if (at == INT32_MAX || v[j] > best || (v[j] == best && first[j] < at)) best = v[j], at = first[j];
        hi[first[j]] = -INFINITY; /* computed: not a candidate again */
    }
    if (at == INT32_MAX || !isfinite(best)) return -1;
    const __m256 f = _mm256_set1_ps(fmaxf(below(best), below(lo_best)));
    int n = 0;
    for (int64_t o = 0; o < out; o += 8) {
        const int lanes8 = out - o < 8 ? (int)(out - o) : 8;
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(hi + o), f, _CMP_GE_OQ)) & ((1 << lanes8) - 1);
        while (m) {
            if (n == MAX_CANDIDATES) return -1;
            cand[n++] = (int32_t)(o + __builtin_ctz(m));
            m &= m - 1;
        }
    }
    for (int i = 0; i < n; i += 8) {
        const int k = n - i < 8 ? n - i : 8;
        exact8(xf, in, w, cand + i, k, v);
        for (int j = 0; j < k; j++)
            if (v[j] > best || (v[j] == best && cand[i + j] < at)) best = v[j], at = cand[i + j];
    }
    *token = at;
    return 0;
}
#endif

/* argmax [rows] = each row's first maximum of x @ w.T rounded to bf16 (panel_linear's argmax), x bf16 [rows, in],
 * w bf16 [out, in] plain and as screen_pack packed it; hi: float32 scratch [rows, ceil(out / 16) * 16]; -1 for
 * the rows the screen could not narrow. Returns how many those are (>= 0); -1 without the kernel; -2 out of memory. */
int screen_argmax(const uint16_t *x, int64_t rows, int64_t in, const uint16_t *w, const int8_t *wq,
                  const float *stats, const int32_t *sumq, int64_t out, float *hi, int threads,
                  int64_t *argmax) {
#if HAVE_AVX2_ONLY
    const int64_t kp = padded_in(in), ldh = (out + 15) / 16 * 16, teams = threads > 0 ? threads : 1;
    const int64_t block = rows < 128 ? rows : 128, chunks = (out + SCREEN_CHUNK - 1) / SCREEN_CHUNK;
    const int64_t tasks = (rows + block - 1) / block * chunks, lanes = rows * 8;
    float *xf = malloc(sizeof(float) * (size_t)(rows * in + teams * lanes));
    uint8_t *xu = malloc((size_t)(rows * kp) + 32);
    RowQ *rq = malloc(sizeof(RowQ) * (size_t)rows);
    int32_t *cand = malloc(sizeof(int32_t) * (size_t)(teams * MAX_CANDIDATES));
    if (!xf || !xu || !rq || !cand) {
        free(xf), free(xu), free(rq), free(cand);
        return -2;
    }
    float *lomax = xf + rows * in;
    for (int64_t j = 0; j < teams * lanes; j++) lomax[j] = -INFINITY;
    int64_t whole = 0;
#pragma omp parallel num_threads(teams) reduction(+ : whole)
    {
        const int64_t id = omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) rq[r] = quantize_row(x + r * in, in, xf + r * in, xu + r * kp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t b = t / chunks * block, n = b + block < rows ? block : rows - b;
            const int64_t first = t % chunks * SCREEN_CHUNK, last = first + SCREEN_CHUNK < out ? first + SCREEN_CHUNK : out;
            screen_rows(xu + b * kp, n, kp, wq, stats, sumq, rq + b, first, last, out, hi + b * ldh, ldh,
                        lomax + id * lanes + b * 8);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++)
            if (!rq[r].ok || decide_row(hi + r * ldh, out, lomax + r * 8, teams, lanes, xf + r * in, in,
                                        w, cand + id * MAX_CANDIDATES, argmax + r) != 0)
                argmax[r] = -1, whole++; /* the caller computes it whole */
    }
    free(xf), free(xu), free(rq), free(cand);
    return (int)whole;
#else
    (void)x, (void)rows, (void)in, (void)w, (void)wq, (void)stats, (void)sumq, (void)out, (void)hi, (void)threads;
    (void)argmax;
    return -1;
#endif
}
