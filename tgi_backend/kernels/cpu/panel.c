/* panel.h's linear as an op (the linear plan's, where bf16 is emulated on AVX2), and its packing. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "argmax.h"
#include "bf16.h"
#include "panel.h"

#define PANEL_CHUNK 128 /* outputs per task: 8 panels */

/* 1 where this build has panel.h's kernel (AVX2 and FMA, no AVX-512). */
int panel_ready(void) { return HAVE_AVX2_ONLY; }

/* w [out, in] bf16 -> panel [ceil(out / 16) * in * 8] uint32. Returns 0. */
int panel_pack_bf16(const uint16_t *w, int64_t out, int64_t in, uint32_t *panel) {
    panel_pack(w, out, in, panel);
    return 0;
}

/* y [rows, out] = x @ w.T + bias: x bf16 [rows, in], w in panels, bias bf16 or NULL. The float32 sums, biased in
 * float32, are rounded to bf16 once: y bf16, or (y_f32) float32 holding those bf16 values (logits); or, y NULL,
 * `argmax` [rows] gets each row's first maximum of those values (torch.argmax's), and no logits are written.
 * Returns 0; -1 without the kernel; -2 out of memory. */
int panel_linear(const uint16_t *x, int64_t rows, int64_t in, const uint32_t *panel, int64_t out,
                 const uint16_t *bias, void *y, int y_f32, int threads, int64_t *argmax) {
#if HAVE_AVX2_ONLY
    const int64_t block = panel_row_block(rows, in); /* a task: a block of rows through a chunk of outputs */
    const int64_t teams = threads > 0 ? threads : 1, chunks = (out + PANEL_CHUNK - 1) / PANEL_CHUNK;
    const int64_t tasks = (rows + block - 1) / block * chunks, lanes = argmax ? rows * 16 : 0;
    if (!y == !argmax) return -1;
    float *xf = malloc(sizeof(float) * (size_t)(rows * in + teams * block * PANEL_CHUNK) +
                       (sizeof(float) + sizeof(int32_t)) * (size_t)(teams * lanes));
    if (!xf) return -2;
    float *sums = xf + rows * in, *best = sums + teams * block * PANEL_CHUNK;
    int32_t *at = (int32_t *)(best + teams * lanes);
    for (int64_t j = 0; j < teams * lanes; j++) best[j] = -INFINITY, at[j] = INT32_MAX;
#pragma omp parallel num_threads(teams)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * in; i++) xf[i] = bf16_to_f32(x[i]);
        const int64_t id = omp_get_thread_num();
        float *own = sums + id * block * PANEL_CHUNK;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t b = t / chunks * block, n = b + block < rows ? block : rows - b;
            const int64_t first = t % chunks * PANEL_CHUNK;
            const int64_t last = first + PANEL_CHUNK < out ? first + PANEL_CHUNK : out;
            if (argmax) { /* the thread's lanes of these rows */
                const PanelBest pb = {best + id * lanes + b * 16, at + id * lanes + b * 16};
                panel_outputs(xf + b * in, n, in, panel, first, last, NULL, NULL, bias, 0, &pb);
                continue;
            }
            if (!y_f32) {
                panel_outputs(xf + b * in, n, in, panel, first, last, NULL, (uint16_t *)y + b * out + first, bias, out,
                              NULL);
                continue;
            }
            panel_outputs(xf + b * in, n, in, panel, first, last, own, NULL, NULL, PANEL_CHUNK, NULL);
            for (int64_t r = 0; r < n; r++) /* logits: the bf16 values as float32 */
                for (int64_t o = first; o < last; o++) {
                    const float v = own[r * PANEL_CHUNK + o - first] + (bias ? bf16_to_f32(bias[o]) : 0.0f);
                    ((float *)y)[(b + r) * out + o] = bf16_to_f32(f32_to_bf16(v));
                }
        }
    }
    if (argmax) lanes_argmax(best, at, teams, rows, argmax, NULL);
    free(xf);
    return 0;
#else
    (void)x, (void)rows, (void)in, (void)panel, (void)out, (void)bias, (void)y, (void)y_f32, (void)threads;
    (void)argmax;
    return -1;
#endif
}
