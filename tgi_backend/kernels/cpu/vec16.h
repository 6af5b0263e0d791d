/* 16-float vectors for the CPU kernels (GCC vector extensions: the compiler lowers them to AVX-512, AVX2 or
 * SSE), and the few vector functions they share. */
#ifndef TGI_VEC16_H
#define TGI_VEC16_H
#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline float hsum(v16f x) { /* a tree: a serial sum would wait on 16 dependent adds */
    v8f a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef int32_t v16i __attribute__((vector_size(64)));

/* 16 bf16 values from p as float32 (bf16 is the top half of a float32) */
static inline v16f widen16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f out;
    memcpy(&out, &u, sizeof out);
    return out;
}

/* Lane-wise max (C has no vector ?:; a compare gives an all-ones mask per lane). */
static inline v16f vmax(v16f a, v16f b) {
    const v16i take_a = a > b;
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v16i r = (ai & take_a) | (bi & ~take_a);
    v16f out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* exp(x) for x <= 0 (scores minus their max), 16 lanes: 2^i * 2^f, 2^f by its Taylor series to degree 7
 * (relative error < 2e-6), plain arithmetic so that it vectorizes. */
static inline v16f exp_nonpositive16(v16f x) {
    v16f t = x * 1.4426950408889634f;
    t = vmax(t, (v16f){0} - 126.0f);
    const v16i i = __builtin_convertvector(t + 128.0f, v16i) - 128;
    const v16f f = (t - __builtin_convertvector(i, v16f)) * 0.6931471805599453f;
    const v16f p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
    const v16i bits = (i + 127) << 23;
    v16f scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float exp_nonpositive(float x) { return exp_nonpositive16((v16f){0} + x)[0]; }
#endif
