/* act(gate) * up through a table: act(x) for every bf16 bit pattern x (made by PyTorch's own function, so it is
 * PyTorch's value bit for bit) and one spare entry, then the product rounded once, as PyTorch's bf16 mul. */
#ifndef TGI_ACT_H
#define TGI_ACT_H
#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "avx2.h"
#include "bf16.h"

/* y[i] = bf16(act_table[gate[i]] * up[i]) for i in [i0, i1): 16 at a time where AVX-512 gathers the table, 8 on
 * AVX2 (read as 32-bit words at 2-byte steps; the table has one spare entry, so the last word stays inside), the
 * rounding is f32_to_bf16's (nearest even, NaN kept). */
static inline void act_row(const uint16_t *table, const uint16_t *gate, const uint16_t *up, uint16_t *y, int64_t i0,
                           int64_t i1) {
    int64_t i = i0;
#ifdef __AVX512F__
    const __m512i low = _mm512_set1_epi32(0xffff), round = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    for (; i + 16 <= i1; i += 16) {
        const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(gate + i)));
        const __m512i a = _mm512_and_si512(_mm512_i32gather_epi32(idx, (const void *)table, 2), low);
        const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(up + i)));
        const __m512 p = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                                       _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
        const __m512i bits = _mm512_castps_si512(p);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(round, lsb)), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, abs_mask), inf);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtepi32_epi16(r));
    }
#elif HAVE_AVX2_ONLY /* 8 at a time: a prefill step of the small model spent ~3% in the scalar loop */
    const __m256i low = _mm256_set1_epi32(0xffff);
    for (; i + 8 <= i1; i += 8) {
        const __m256i idx = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(gate + i)));
        const __m256i a = _mm256_and_si256(_mm256_i32gather_epi32((const int *)table, idx, 2), low);
        const __m256 p = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), bf16x8(up + i));
        _mm_storeu_si128((__m128i *)(y + i), round_bf16x8(p));
    }
#endif
    for (; i < i1; i++) y[i] = f32_to_bf16(bf16_to_f32(table[gate[i]]) * bf16_to_f32(up[i]));
}

/* Elements [first, last) of y [rows, inter] = act(gate) * up, gu [rows, 2 * inter] holding gate | up per row. */
static inline void act_span(const uint16_t *table, const uint16_t *gu, uint16_t *y, int64_t inter, int64_t first,
                            int64_t last) {
    for (int64_t r = first / inter; r * inter < last; r++) {
        const int64_t i0 = first > r * inter ? first - r * inter : 0, i1 = last < (r + 1) * inter ? last - r * inter : inter;
        act_row(table, gu + r * 2 * inter, gu + r * 2 * inter + inter, y + r * inter, i0, i1);
    }
}

#endif
