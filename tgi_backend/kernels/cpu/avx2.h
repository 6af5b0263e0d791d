/* AVX2 helpers shared by gemv.h and paged_decode.h (CPUs with AVX2 and FMA but no AVX-512). */
#ifndef TGI_AVX2_H
#define TGI_AVX2_H
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

#define HAVE_AVX2_ONLY 1

static inline __m256 bf16x8(const uint16_t *p) { /* 8 bf16 as float32: zero-extended, shifted to the top half */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
#else
#define HAVE_AVX2_ONLY 0
#endif
#endif
