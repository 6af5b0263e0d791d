/* AVX2 helpers shared by gemv.h, panel.h, paged_decode.h and prefill_attn.c (CPUs with AVX2 and FMA but no AVX-512). */
#ifndef TGI_AVX2_H
#define TGI_AVX2_H
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

#define HAVE_AVX2_ONLY 1

static inline __m256 bf16x8(const uint16_t *p) { /* 8 bf16 as float32: zero-extended, shifted to the top half */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 float32 as bf16, rounded to nearest even (NaN stays NaN): bf16.h's f32_to_bf16 on a vector (amx.h's
 * amx_round, with AVX2's compare and blend for AVX-512's mask). */
static inline __m128i round_bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    const __m256i top = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0xD8));
}

/* exp(x) for x <= 0 on 8 lanes: vec16.h's exp_nonpositive16 with AVX2's own vectors (GCC lowers the 16-float
 * generic vectors to scalar compares and stack round trips here); the same series, as fused multiply-adds. */
static inline __m256 exp_nonpositive8(__m256 x) {
    const __m256 t = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)), _mm256_set1_ps(-126.0f));
    const __m256i i = _mm256_sub_epi32(_mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_set1_ps(128.0f))),
                                       _mm256_set1_epi32(128));
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(i)), _mm256_set1_ps(0.6931471805599453f));
    __m256 q = _mm256_set1_ps(1.0f / 5040);
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f / 720));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f / 120));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f / 24));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f / 6));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(0.5f));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f));
    q = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
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
