/* AVX-512 versions of the 8-bit state's hot loops (oc_lowp.h), for full blocks of
 * OC_Q8_BLOCK elements, picked at run time when the CPU has AVX-512F (oc_q8_simd).
 *
 * They compute the same bits as the portable loops (same operations in the same order, no
 * fused multiply-add, as the build's -ffp-contract=off), and differ only in how they look
 * things up, which gcc cannot vectorize by itself:
 *   - decoding a byte computes the code's value by the arithmetic that defines it
 *     (oc_q8_magnitude: two 16-entry permutes, vpermps, by the exponent of u + 1/2), where
 *     the portable loops look it up in the 256-entry table built from the same arithmetic
 *     (gcc emulates that lookup element by element);
 *   - encoding picks the decimal level without the six-compare chain: the binary exponent of
 *     a = |x| / absmax indexes two 32-entry tables (vpermt2d / vpermt2ps), the highest level
 *     whose lower bound is at or below the binade's start and the next bound, which lies
 *     above it; one compare with that bound finishes the level, since the bounds between
 *     levels are ~10x apart and a binade holds at most one. The level's multiplier and sizes
 *     are then 16-entry permutes;
 *   - codes are narrowed to bytes in registers (vpmovdb).
 * Measured (one thread, data in cache, Adam step with 8-bit m and v): see oc_lowp.h.
 */
#ifndef OC_Q8_SIMD_H
#define OC_Q8_SIMD_H

#include "oc_common.h"

static int oc_q8_simd = 0;  /* the AVX-512 loops are in use (set by oc_q8_init) */

#if OC_X86_DISPATCH
#include <immintrin.h>

#define OC_AVX512 __attribute__((target("avx512f")))
#define OC_AVX512_INLINE static inline __attribute__((target("avx512f"), always_inline))

/* Binade tables of one code for the encoder: entry e - OC_Q8_E0 (e the exponent field of a,
 * clamped below at OC_Q8_E0) holds the level of the binade's start and the bound of the next
 * level. OC_Q8_E0 = 101 puts entry 0 at 2^-26, below the first bound (~5e-7), so that every
 * smaller a is level 0 too, and entry 31 at 2^5, above hi (~1), the bound of the one code. */
#define OC_Q8_E0 101

typedef struct {
    int32_t level[32];
    float next_bound[32];
    float mul[16], k[16];  /* per level (7 used) */
} oc_q8_simd_tables;

static oc_q8_simd_tables oc_q8_simd_tab[2];  /* [0] unsigned, [1] signed */

static inline void oc_q8_simd_init_one(oc_q8_simd_tables *t, const oc_q8_code *q) {
    for (int e = 0; e < 32; e++) {
        const float start = ldexpf(1.0f, e + OC_Q8_E0 - 127);
        int lv = 0;
        for (int i = 1; i < OC_Q8_LEVELS; i++)
            if (q->bound[i] <= start) lv = i;
        t->level[e] = lv;
        t->next_bound[e] = lv < OC_Q8_LEVELS - 1 ? q->bound[lv + 1] : INFINITY;
    }
    for (int i = 0; i < 16; i++) {
        const int l = i < OC_Q8_LEVELS ? i : OC_Q8_LEVELS - 1;
        t->mul[i] = q->mul[l];
        t->k[i] = (float)q->k[l];
    }
}

/* Decoding of 16 bytes (oc_q8_magnitude, with the sign bit and the one code of the signed
 * code), times the block's absmax. */
OC_AVX512_INLINE __m512 oc_q8_simd_decode(const oc_q8_code *q, const uint8_t *src, __m512 absmax,
                                          int is_signed) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    const __m512i u = is_signed ? _mm512_and_si512(b, _mm512_set1_epi32(127)) : b;
    const __m512 f = _mm512_add_ps(_mm512_cvtepi32_ps(u), _mm512_set1_ps(0.5f));
    const __m512i t = _mm512_srli_epi32(_mm512_castps_si512(f), 23);  /* permutes use bits 0-3 */
    const __m512 w = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(9.0f), f),
                                   _mm512_permutexvar_ps(t, _mm512_loadu_ps(q->dec_e)));
    __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(t, _mm512_loadu_ps(q->dec_d)), w);
    if (is_signed) {
        v = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(v), _mm512_and_si512(_mm512_slli_epi32(b, 24),
                                                     _mm512_set1_epi32((int)0x80000000u))));
        v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(128)),
                               _mm512_set1_ps(1.0f));
    }
    return _mm512_mul_ps(v, absmax);
}

/* oc_q8_level_code of 16 values a >= 0 (any result where a is NaN, inf or below the code's
 * range: the callers mask those). */
OC_AVX512_INLINE __m512i oc_q8_simd_level_code(const oc_q8_simd_tables *t, __m512 a) {
    __m512i e = _mm512_srli_epi32(_mm512_castps_si512(a), 23);
    e = _mm512_max_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(OC_Q8_E0)), _mm512_setzero_si512());
    __m512i lv = _mm512_permutex2var_epi32(_mm512_loadu_si512(t->level), e,
                                           _mm512_loadu_si512(t->level + 16));
    const __m512 nb = _mm512_permutex2var_ps(_mm512_loadu_ps(t->next_bound), e,
                                             _mm512_loadu_ps(t->next_bound + 16));
    lv = _mm512_mask_add_epi32(lv, _mm512_cmp_ps_mask(a, nb, _CMP_GE_OQ), lv, _mm512_set1_epi32(1));
    const __m512 m = _mm512_permutexvar_ps(lv, _mm512_loadu_ps(t->mul));
    const __m512 k = _mm512_permutexvar_ps(lv, _mm512_loadu_ps(t->k));
    __m512 x = _mm512_sub_ps(_mm512_mul_ps(a, m), _mm512_mul_ps(k, _mm512_set1_ps(1.0f / 9.0f)));
    x = _mm512_max_ps(x, _mm512_setzero_ps());                              /* x > 0 ? x : 0 */
    x = _mm512_min_ps(x, _mm512_sub_ps(k, _mm512_set1_ps(1.0f)));           /* x < k-1 ? x : k-1 */
    return _mm512_cvttps_epi32(_mm512_add_ps(k, x));
}

/* The codes of 16 values x of a block whose absmax has the reciprocal `inv` (see
 * oc_q8_block_store), as bytes. */
OC_AVX512_INLINE __m128i oc_q8_simd_encode(__m512 x, __m512 inv, int is_signed) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    const __m512 hi = _mm512_set1_ps(oc_q8_codes[is_signed].hi);
    const oc_q8_simd_tables *t = &oc_q8_simd_tab[is_signed];
    __m512i u;
    if (is_signed) {
        const __m512i xb = _mm512_castps_si512(x);
        const __m512 a = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(xb, absmask)), inv);
        u = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, _mm512_set1_ps(oc_q8_codes[1].lo), _CMP_GE_OQ),
                                   oc_q8_simd_level_code(t, a));
        const __mmask16 neg = _mm512_cmplt_epi32_mask(xb, _mm512_setzero_si512());
        u = _mm512_mask_or_epi32(u, neg & _mm512_test_epi32_mask(u, u), u, _mm512_set1_epi32(128));
        const __m512i one = _mm512_mask_mov_epi32(_mm512_set1_epi32(128), neg, _mm512_set1_epi32(255));
        u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(a, hi, _CMP_GE_OQ), one);
    } else {
        const __m512 a = _mm512_castsi512_ps(
            _mm512_and_si512(_mm512_castps_si512(_mm512_mul_ps(x, inv)), absmask));
        u = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ),
                                   oc_q8_simd_level_code(t, a));
        u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(a, hi, _CMP_GE_OQ), _mm512_set1_epi32(1));
    }
    return _mm512_cvtepi32_epi8(u);
}

/* max(acc, |x| as bits): the running absmax of a block, in unsigned order (NaN above inf). */
OC_AVX512_INLINE __m512i oc_q8_simd_absmax(__m512i acc, __m512 x) {
    return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
}

/* The block's absmax from its running bits, stored; returns the encoder's reciprocal. */
OC_AVX512_INLINE __m512 oc_q8_simd_finish_absmax(__m512i acc, float *absmax) {
    const uint32_t bits = _mm512_reduce_max_epu32(acc);
    float mx;
    memcpy(&mx, &bits, 4);
    *absmax = mx;
    return _mm512_set1_ps(mx > 0.0f ? 1.0f / mx : 0.0f);
}

/* Quantize one full block (see oc_q8_block_store): absmax, then the codes. */
static OC_AVX512 __attribute__((noinline)) void
oc_q8_simd_block_store(uint8_t *OC_RESTRICT dst, float *OC_RESTRICT absmax,
                       const float *OC_RESTRICT src, int is_signed) {
    __m512i mb = _mm512_setzero_si512();
    for (int j = 0; j < OC_Q8_BLOCK; j += 16) mb = oc_q8_simd_absmax(mb, _mm512_loadu_ps(src + j));
    const __m512 inv = oc_q8_simd_finish_absmax(mb, absmax);
    if (is_signed)
        for (int j = 0; j < OC_Q8_BLOCK; j += 16)
            _mm_storeu_si128((__m128i *)(dst + j), oc_q8_simd_encode(_mm512_loadu_ps(src + j), inv, 1));
    else
        for (int j = 0; j < OC_Q8_BLOCK; j += 16)
            _mm_storeu_si128((__m128i *)(dst + j), oc_q8_simd_encode(_mm512_loadu_ps(src + j), inv, 0));
}

static OC_AVX512 __attribute__((noinline)) void
oc_q8_simd_block_load(float *OC_RESTRICT dst, const uint8_t *OC_RESTRICT src, float absmax,
                      int is_signed) {
    const __m512 am = _mm512_set1_ps(absmax);
    if (is_signed)
        for (int j = 0; j < OC_Q8_BLOCK; j += 16)
            _mm512_storeu_ps(dst + j, oc_q8_simd_decode(&oc_q8_codes[1], src + j, am, 1));
    else
        for (int j = 0; j < OC_Q8_BLOCK; j += 16)
            _mm512_storeu_ps(dst + j, oc_q8_simd_decode(&oc_q8_codes[0], src + j, am, 0));
}

#endif /* OC_X86_DISPATCH */

#endif /* OC_Q8_SIMD_H */
