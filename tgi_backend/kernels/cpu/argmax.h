/* Each row's first maximum from per-lane running maxima (amx_linear's and panel_linear's argmax): the LM head's
 * greedy tokens without writing its [rows, vocab] logits. */
#ifndef TGI_ARGMAX_H
#define TGI_ARGMAX_H
#include <stdint.h>

/* best/at [teams][rows][16]: a lane's first maximum and its output index (INT32_MAX: the lane saw nothing) ->
 * argmax[rows], torch.argmax's rule: a NaN counts as the maximum, and the lowest index wins among equals; with
 * value, also the maximum itself (0 where no lane saw anything). */
static inline void lanes_argmax(const float *best, const int32_t *at, int64_t teams, int64_t rows, int64_t *argmax,
                                float *value) {
    const int64_t lanes = rows * 16;
    for (int64_t r = 0; r < rows; r++) {
        float v = 0.0f;
        int32_t i = INT32_MAX;
        for (int64_t t = 0; t < teams; t++)
            for (int64_t l = 0; l < 16; l++) {
                const float u = best[t * lanes + r * 16 + l];
                const int32_t j = at[t * lanes + r * 16 + l];
                if (j == INT32_MAX) continue;
                if (i == INT32_MAX || u > v || (u == v && j < i) || (u != u && (v == v || j < i))) v = u, i = j;
            }
        argmax[r] = i == INT32_MAX ? 0 : i;
        if (value) value[r] = v;
    }
}
#endif
