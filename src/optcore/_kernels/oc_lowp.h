/* Low-precision element formats of the kernels: bfloat16, IEEE half (float16) and 8-bit
 * block-wise quantized state, converted tile by tile in registers/L1 inside the sweep.
 *
 * bfloat16 <-> float32 by integer operations on the bits (they vectorize on any x86-64 ISA):
 *   - widening is exact: the 16 bits become the top half of the float32;
 *   - round to nearest even: add 0x7FFF + (bit 16) and keep the top half (NaN stays quiet NaN);
 *   - stochastic rounding: add 16 random bits and keep the top half, so that
 *     E[round(x)] = x. The bits come from a counter-based hash of (seed, step, tensor, slot,
 *     element index): the same for any thread count or schedule. One hash per element serves
 *     two slots: element k of a tensor draws w = oc_mix32(base(tensor, slot 3) + k); the first
 *     state slot (slot 3) rounds with the low 16 bits of w, the second (slot 4) with the high
 *     16 bits; a third state slot and a 16-bit parameter draw the low bits of their own
 *     stream oc_mix32(base(tensor, slot) + k).
 *
 * float16 <-> float32, also by integer operations (and one float add or subtract on normal
 * numbers, so that flush-to-zero and denormals-are-zero modes do not change the result):
 *   - widening is exact, subnormal halves included;
 *   - round to nearest even, as IEEE 754 (and NumPy's astype): above the largest half
 *     (65504) by half an ulp or more gives inf, NaN stays a quiet NaN;
 *   - stochastic rounding with 16 random bits r, in the normal range by adding r to the 13
 *     dropped mantissa bits (the carry rounds up), in the subnormal range (ulp 2^-24) by
 *     adding r scaled to the dropped bits of the fixed-point value.
 *
 * 8-bit state (Dettmers, Lewis, Shleifer, Zettlemoyer 2022, "8-bit Optimizers via Block-wise
 * Quantization", ICLR): each block of OC_Q8_BLOCK elements stores one float32 absmax and one
 * byte per element, a code of the dynamic (tree) data type applied to x / absmax. Decimal
 * level i = 0..6 (scale s_i = 10^(i-6)) holds K_i values s_i (0.1 + 0.9 (j + 1/2) / K_i),
 * j = 0..K_i-1, the midpoints of K_i equal steps of [0.1 s_i, s_i]:
 *   signed code (first moments):    byte = sign << 7 | u, u = K_i + j, K_i = 2^i   (u in 1..127)
 *   unsigned code (second moments): byte = u,             u = K_i + j, K_i = 2^(i+1) (u in 2..255)
 * u = 0 is 0.0; the byte 0x80 (signed) or 1 (unsigned) is exactly 1.0, so the element holding
 * the block's absmax is exact when positive. These are the values of bitsandbytes'
 * create_dynamic_map(signed) (127 or 254 levels, zero and one). Quantization picks the
 * nearest code arithmetically, without a search: the decimal level by comparisons against the
 * six midpoints between levels, then j by one multiply inside the level's linear grid. One
 * exception: with the unsigned code a positive value never rounds to 0 but at least to the
 * smallest code (the "zero-point problem" of second moments, Li, Chen, Zhu 2023, "Memory
 * Efficient Optimizers with 4-bit States"): a second moment flushed to 0 under a surviving
 * first moment makes the next Adam step m / eps. On the MLP problem this took 8-bit Adam's
 * final loss from +19% to within 1% of float32 Adam's.
 *
 * Speed lessons (gcc 12, AVX-512 Xeon VM at 2.1 GHz, one thread, data in cache; Adam step,
 * ns/element: float32 state 0.74; bfloat16 state 1.87 -> 0.77; 8-bit state 5.5 -> 1.75):
 *   - An Adam step in cache is bound by its two divisions and square root (~25 cycles per
 *     16 elements). Conversions in passes of their own add their full cost; the same
 *     operations inside the rule's loop run beside the divider nearly for free
 *     (oc_adam_lp_loop in oc_optim.h: bf16 state costs 4% over float32 state; a bf16 gradient
 *     widened and a bf16 model copy narrowed in the loop cost ~2%, against ~0.15-0.3
 *     ns/element as passes).
 *   - "Nearly free" ends where the two 512-bit ALU ports fill up: bf16 parameter, gradient and
 *     state with stochastic rounding need two hashes (4 vpmulld), four widenings and three
 *     roundings per 16 elements beside Adam's ~20 operations, ~65 uops on ports 0 and 5:
 *     ~0.93 ns/element in cache against 0.67 for float32 Adam, in one loop or in tile passes
 *     alike (the passes stay in L1), more than the memory time of its 14 bytes; 256-bit
 *     vectors (three ALU ports) were slower still. Two elements per 32-bit word
 *     (oc_adam_bf16_pairs: a shift or a mask to widen, shift, mask and or to narrow, no NaN
 *     selects) cut the conversions from ~20 to ~8 uops per 16 elements: 1.28-1.31 -> 1.16
 *     ns/element in cache (float32 Adam 0.96-1.04 in the same runs), 1.05-1.09x the float32
 *     step at 256K elements, and the 16M step from 56-79% to 71-98% of its probe. The two
 *     hashes (44 of ~107 vector uops per 32 elements) and the divider are what is left.
 *   - gcc 12 left some specializations of one always_inline loop scalar ("control flow in
 *     loop") once some 25 of them were inlined into one large driver, while each vectorized on
 *     its own: keep the specializations in small functions (with their own ISA clones), and
 *     check the hot loop of a build with perf rather than a test file compiled alone. The
 *     float16 narrowing did not vectorize inside the Adam loop at all (a float16 model copy
 *     stays on the tile path).
 *   - A loop index of 64 bits feeding a 32-bit hash makes gcc carry 64-bit lanes and shuffle
 *     them down: count in uint32_t. One hash for two slots halves the hashing.
 *   - Narrowing: select NaN on the 32-bit word, then shift and narrow once; selecting after
 *     the narrowing made gcc narrow both arms.
 *   - AVX512F alone has no 16-bit or 8-bit vector lanes: gcc falls back to 256-bit vectors
 *     for any loop touching uint16/uint8 arrays. The x86-64-v4 clone (AVX512BW) halves the
 *     bf16 conversions' cost.
 *   - Byte outputs inside a float loop made gcc pick narrow vectors and spill the encoder's
 *     20 constants: compute int32 codes at full width, narrow to bytes in a second loop
 *     (encoder 1.5 -> 0.7 ns/element signed, 1.3 -> 0.5 unsigned).
 *   - The 256-entry table lookup of the decoder is emulated by gcc (no gather under generic
 *     tuning), ~0.3-0.45 ns/element. On AVX-512F CPUs the 8-bit loops run hand-written
 *     versions (oc_q8_simd.h, same bits): 8-bit Adam 2.65 -> 1.75 ns/element. What counts there
 *     is uops on ports 0 and 5, not the divider: eight vpermt2ps and seven blends per 16
 *     bytes (a table lookup) -> an arithmetic decoder with two 16-entry permutes (the code's
 *     values are defined by that arithmetic, see oc_q8_magnitude); a six-compare level chain
 *     -> the exponent's binade table and one compare; narrowing in registers (vpmovdb). The
 *     loop is still ~100 uops per 16 elements (decode 28, Adam 14, encode 54) against ~25 for
 *     float32 Adam, so it stays compute-bound. Software-pipelining the requantization of
 *     block b - 1 into the update of block b did not pay (over whole chunks, and again 16 or
 *     64 elements at a time), the ports, not the divider's latency, being the limit; nor did
 *     a gather (vgatherdps) instead of the permutes.
 *   - The phases, one thread, 4096 elements in L1, C harness over these headers (ns/element,
 *     m and v together): decoding 0.31, requantizing 0.62, the update alone 0.73-0.77 (the
 *     divider: two divisions and a square root per 16 elements take 31 cycles), the fused
 *     step 1.46-1.59. The divider does not hold the ports: 24 extra permutes (port 5) or 24
 *     extra integer adds (ports 0/5) per 16 elements beside it cost nothing (31-33 cycles),
 *     48 adds 35-43, so the step is the ports' ~100 uops, overlapped with the divider.
 *   - An AVX-512 VBMI decoder (the 256-entry value table as four byte planes, two vpermi2b
 *     and a blend per plane, unpacks back to floats: ~26 uops per 64 elements against ~50)
 *     measured 0.29-0.30 against 0.31 ns/element, and no faster in the fused step (1.52-1.57
 *     in L1; at 16M, 2 threads equal within noise, or slower when each block was decoded
 *     before its update): every byte shuffle of a 512-bit vector issues on port 5 alone (17
 *     of its 26 uops). Narrowing by vpackusdw/vpackuswb and one vpermd instead of vpmovdb:
 *     0.61 against 0.62. Neither was kept.
 */
#ifndef OC_LOWP_H
#define OC_LOWP_H

#include <string.h>
#include "oc_common.h"

enum { OC_F32 = 0, OC_BF16 = 1, OC_Q8S = 2, OC_Q8U = 3, OC_F16 = 4 };

#define OC_Q8_BLOCK 256
#define OC_Q8_LEVELS 7

/* ---- bit casts and the hash -------------------------------------------------------------- */

static inline __attribute__((always_inline)) uint32_t oc_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline __attribute__((always_inline)) float oc_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* A 32-bit integer mixer (two multiply-xorshift rounds; "lowbias32", C. Wellons 2018): every
 * input bit changes each output bit with probability ~1/2. */
static inline __attribute__((always_inline)) uint32_t oc_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0xd35a2d97u;
    x ^= x >> 15;
    return x;
}

/* The key of one (seed, step) pair, and of one tensor's slot under it; element i of that
 * tensor then draws oc_mix32(base + i). */
static inline uint32_t oc_rng_key(uint32_t seed, uint32_t step) {
    return oc_mix32(seed ^ oc_mix32(step + 0x9e3779b9u));
}

static inline uint32_t oc_rng_base(uint32_t key, int64_t tensor, int slot) {
    return oc_mix32(key ^ oc_mix32((uint32_t)tensor * 16u + (uint32_t)slot + 0x85ebca6bu));
}

/* ---- bfloat16 ---------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) float oc_bf16_to_f32(uint16_t b) {
    return oc_float((uint32_t)b << 16);
}

/* The rounded bfloat16 of a non-NaN x in the top half of a 32-bit word: to nearest even, or
 * stochastically with 16 random bits r (rounds up with probability (x - down) / ulp). */
static inline __attribute__((always_inline)) uint32_t oc_bf16_rne_word(float x) {
    const uint32_t u = oc_bits(x);
    return u + 0x7fffu + ((u >> 16) & 1u);
}

static inline __attribute__((always_inline)) uint32_t oc_bf16_sr_word(float x, uint32_t r) {
    return oc_bits(x) + (r & 0xffffu);
}

/* The select on NaN (kept a quiet NaN) is taken on the 32-bit word before the one shift and
 * narrowing, so that the vectorized loop narrows once. */
static inline __attribute__((always_inline)) uint16_t oc_f32_to_bf16_rne(float x) {
    const uint32_t w = x != x ? (oc_bits(x) | 0x400000u) : oc_bf16_rne_word(x);
    return (uint16_t)(w >> 16);
}

static inline __attribute__((always_inline)) uint16_t oc_f32_to_bf16_sr(float x, uint32_t r) {
    const uint32_t w = x != x ? (oc_bits(x) | 0x400000u) : oc_bf16_sr_word(x, r);
    return (uint16_t)(w >> 16);
}

/* The top halves of two rounded words in one word of two bfloat16, lo's in the low half. With
 * the words above, rounding without the NaN select: only for values whose NaNs have zero low
 * 16 bits (see oc_adam_bf16_pairs). */
static inline __attribute__((always_inline)) uint32_t oc_bf16_join(uint32_t lo, uint32_t hi) {
    return (lo >> 16) | (hi & 0xffff0000u);
}

static inline __attribute__((always_inline)) void
oc_bf16_load(float *OC_RESTRICT dst, const uint16_t *OC_RESTRICT src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_bf16_to_f32(src[i]);
}

static inline __attribute__((always_inline)) void
oc_bf16_store_rne(uint16_t *OC_RESTRICT dst, const float *OC_RESTRICT src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_f32_to_bf16_rne(src[i]);
}

/* The random words of elements [first, first + n) of a stream keyed by `base`: r[i] =
 * oc_mix32(base + first + i). A 32-bit counter, so that the loop vectorizes without 64-bit
 * lanes (n <= OC_TILE). */
static inline __attribute__((always_inline)) void
oc_rand_fill(uint32_t *OC_RESTRICT r, uint32_t base, int64_t first, int64_t n) {
    const uint32_t b = base + (uint32_t)first, m = (uint32_t)n;
    for (uint32_t i = 0; i < m; i++) r[i] = oc_mix32(b + i);
}

/* Stochastic rounding with the 16 bits (r[i] >> shift) & 0xffff of each random word. */
static inline __attribute__((always_inline)) void
oc_bf16_store_sr(uint16_t *OC_RESTRICT dst, const float *OC_RESTRICT src, int64_t n,
                 const uint32_t *OC_RESTRICT r, int shift) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_f32_to_bf16_sr(src[i], r[i] >> shift);
}

/* ---- float16 ----------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) float oc_f16_to_f32(uint16_t h) {
    const uint32_t em = ((uint32_t)h & 0x7fffu) << 13;   /* exponent and mantissa, f32 place */
    const uint32_t e = em & 0x0f800000u;                 /* the half's exponent field */
    uint32_t u = em + ((uint32_t)(127 - 15) << 23);      /* rebias */
    u += e == 0x0f800000u ? ((uint32_t)(128 - 16) << 23) : 0u;  /* inf / NaN: exponent 255 */
    /* subnormal half: m * 2^-24 = (1.m' * 2^-14) - 2^-14 with the hidden bit added */
    const float sub = oc_float(u + (1u << 23)) - oc_float(113u << 23);
    const uint32_t mag = e == 0 ? oc_bits(sub) : u;
    return oc_float(mag | (((uint32_t)h & 0x8000u) << 16));
}

static inline __attribute__((always_inline)) uint16_t oc_f32_to_f16_rne(float x) {
    const uint32_t u = oc_bits(x), a = u & 0x7fffffffu;
    const uint32_t sign = (u >> 16) & 0x8000u;
    /* normal half: rebias, then round the 13 dropped bits to nearest even */
    const uint32_t nrm = (a - ((uint32_t)(127 - 15) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    /* below 2^-14: adding 0.5 leaves the value in units of 2^-24 in the low mantissa bits,
     * rounded to nearest even by the float add */
    const float mag = oc_float(a);
    const uint32_t sub = oc_bits(mag + 0.5f) - oc_bits(0.5f);
    uint32_t o = a < (113u << 23) ? sub : nrm;
    o = a >= (143u << 23) ? 0x7c00u : o;                /* >= 65536: inf (and 65520.. via nrm) */
    o = o > 0x7c00u ? 0x7c00u : o;
    o = a > 0x7f800000u ? 0x7e00u : o;                  /* NaN */
    return (uint16_t)(o | sign);
}

/* Stochastic rounding with 16 random bits r: rounds up with probability (x - down) / ulp
 * (to 2^-16); overflow past the largest half gives inf. */
static inline __attribute__((always_inline)) uint16_t oc_f32_to_f16_sr(float x, uint32_t r) {
    const uint32_t u = oc_bits(x), a = u & 0x7fffffffu;
    const uint32_t sign = (u >> 16) & 0x8000u;
    r &= 0xffffu;
    const uint32_t nrm = (a - ((uint32_t)(127 - 15) << 23) + (r >> 3)) >> 13;
    /* below 2^-14 the value is M * 2^-s in units of 2^-24 (M the 24-bit significand,
     * s = 126 - max(E, 1) >= 14): add r at the top of the s dropped bits, then shift */
    const uint32_t ef = a >> 23;
    const uint64_t m = (uint64_t)((a & 0x7fffffu) | (ef ? 0x800000u : 0u));
    uint32_t s = 126u - (ef ? ef : 1u);
    s = s > 40u ? 40u : s;                               /* below: M * 2^-40 < 2^-16 */
    const uint32_t sub = (uint32_t)((m + (((uint64_t)r << s) >> 16)) >> s);
    uint32_t o = a < (113u << 23) ? sub : nrm;
    o = a >= (143u << 23) ? 0x7c00u : o;
    o = o > 0x7c00u ? 0x7c00u : o;
    o = a > 0x7f800000u ? 0x7e00u : o;
    return (uint16_t)(o | sign);
}

static inline __attribute__((always_inline)) void
oc_f16_load(float *OC_RESTRICT dst, const uint16_t *OC_RESTRICT src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_f16_to_f32(src[i]);
}

static inline __attribute__((always_inline)) void
oc_f16_store_rne(uint16_t *OC_RESTRICT dst, const float *OC_RESTRICT src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_f32_to_f16_rne(src[i]);
}

static inline __attribute__((always_inline)) void
oc_f16_store_sr(uint16_t *OC_RESTRICT dst, const float *OC_RESTRICT src, int64_t n,
                const uint32_t *OC_RESTRICT r, int shift) {
    for (int64_t i = 0; i < n; i++) dst[i] = oc_f32_to_f16_sr(src[i], r[i] >> shift);
}

/* ---- 8-bit dynamic code ------------------------------------------------------------------ */

/* Constants of one code (filled once by oc_q8_init). */
typedef struct {
    float value[256];            /* the code: value of each byte, in [-1, 1] */
    float dec_d[16], dec_e[16];  /* the values by arithmetic (oc_q8_magnitude) */
    float lo;                    /* |a| below: code 0 */
    float hi;                    /* |a| at or above: the one code (or the top level) */
    float bound[OC_Q8_LEVELS];   /* bound[i]: |a| at or above is level i or higher (bound[0] unused) */
    float mul[OC_Q8_LEVELS];     /* j = floor(|a| * mul[i] - k[i] / 9) inside level i */
    int32_t k[OC_Q8_LEVELS];     /* values in level i */
} oc_q8_code;

static oc_q8_code oc_q8_codes[2];  /* [0] unsigned, [1] signed */

/* The value of magnitude u (0..127 signed, 0..255 unsigned) in float32 arithmetic: in level i
 * (u = K + j, K = K_i) the value s_i (0.1 + 0.9 (j + 1/2) / K) is s_i / (10 K) (9 (u + 1/2) - 8 K),
 * and 9 (u + 1/2) - 8 K is exact in float32, so it is dec_d[t] * (9 f - dec_e[t]) with f = u + 1/2,
 * one rounding of a product with the constant fl(s_i / (10 K)) (within 2^-23 relative of the
 * float64 value). The level is the exponent of f, whose low 4 bits t index the tables: f in
 * [K, 2K) for u in level i, 1/2 (t = 14, d = 0) for u = 0, and 3/2 (t = 15) for the unsigned
 * code's 1.0 at u = 1 (d = 1, e = 12.5). The table `value` is built from it, so that the table
 * lookups and the AVX-512 decoder (oc_q8_simd.h) give the same bits. */
static inline __attribute__((always_inline)) float oc_q8_magnitude(const oc_q8_code *q, uint32_t u) {
    const float f = (float)u + 0.5f;
    const uint32_t t = (oc_bits(f) >> 23) & 15u;
    return q->dec_d[t] * (9.0f * f - q->dec_e[t]);
}

#include "oc_q8_simd.h"

static inline double oc_q8_level_value(int i, int64_t k, int64_t j) {
    static const double scale[OC_Q8_LEVELS] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    return scale[i] * (0.1 + 0.9 * ((double)j + 0.5) / (double)k);
}

static inline void oc_q8_init_one(oc_q8_code *q, int is_signed) {
    static const double scale[OC_Q8_LEVELS] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    for (int t = 0; t < 16; t++) q->dec_d[t] = q->dec_e[t] = 0.0f;
    q->dec_d[15] = 1.0f;  /* u = 1 unsigned: 9 * 1.5 - 12.5 = 1 (signed: level 0 below) */
    q->dec_e[15] = 12.5f;
    for (int i = 0; i < OC_Q8_LEVELS; i++) {
        int64_t k = is_signed ? ((int64_t)1 << i) : ((int64_t)2 << i);
        q->k[i] = (int32_t)k;
        q->mul[i] = (float)((double)k / (0.9 * scale[i]));
        const int t = (int)((oc_bits((float)k + 0.5f) >> 23) & 15u);
        q->dec_d[t] = (float)(scale[i] / (10.0 * (double)k));
        q->dec_e[t] = (float)(8 * k);
        const int64_t kp = i > 0 ? q->k[i - 1] : 0;
        q->bound[i] = i > 0 ? (float)(0.5 * (oc_q8_level_value(i - 1, kp, kp - 1)
                                             + oc_q8_level_value(i, k, 0)))
                            : 0.0f;
    }
    for (int b = 0; b < 256; b++) q->value[b] = 0.0f;
    for (uint32_t u = is_signed ? 1u : 2u; u < (is_signed ? 128u : 256u); u++) {
        const float v = oc_q8_magnitude(q, u);
        q->value[u] = v;
        if (is_signed) q->value[0x80 | u] = -v;
    }
    int64_t k0 = q->k[0], k6 = q->k[OC_Q8_LEVELS - 1];
    q->lo = (float)(0.5 * oc_q8_level_value(0, k0, 0));
    q->hi = (float)(0.5 * (oc_q8_level_value(OC_Q8_LEVELS - 1, k6, k6 - 1) + 1.0));
    q->value[is_signed ? 0x80 : 1] = 1.0f;
}

static inline void oc_q8_init(void) {
    oc_q8_init_one(&oc_q8_codes[0], 0);
    oc_q8_init_one(&oc_q8_codes[1], 1);
#if OC_X86_DISPATCH
    for (int s = 0; s < 2; s++)
        oc_q8_simd_init_one(&oc_q8_simd_tab[s], &oc_q8_codes[s]);
    __builtin_cpu_init();
    oc_q8_simd = __builtin_cpu_supports("avx512f");
#else
    oc_q8_simd = 0;
#endif
}

/* The code u = K + j (0..K_max - 1 of the magnitude, before sign and specials) of a = |x| /
 * absmax: the level's multiplier and size picked by six compares with the bounds between
 * levels, then j = floor(a mul - K / 9) clamped into the level. Below `lo`: 0. */
typedef struct {
    float b1, b2, b3, b4, b5, b6, m0, m1, m2, m3, m4, m5, m6, k0, k1, k2, k3, k4, k5, k6, lo, hi;
} oc_q8_enc;

static inline oc_q8_enc oc_q8_enc_of(const oc_q8_code *q) {
    oc_q8_enc e;
    e.b1 = q->bound[1]; e.b2 = q->bound[2]; e.b3 = q->bound[3];
    e.b4 = q->bound[4]; e.b5 = q->bound[5]; e.b6 = q->bound[6];
    e.m0 = q->mul[0]; e.m1 = q->mul[1]; e.m2 = q->mul[2]; e.m3 = q->mul[3];
    e.m4 = q->mul[4]; e.m5 = q->mul[5]; e.m6 = q->mul[6];
    e.k0 = (float)q->k[0]; e.k1 = (float)q->k[1]; e.k2 = (float)q->k[2]; e.k3 = (float)q->k[3];
    e.k4 = (float)q->k[4]; e.k5 = (float)q->k[5]; e.k6 = (float)q->k[6];
    e.lo = q->lo;
    e.hi = q->hi;
    return e;
}

static inline __attribute__((always_inline)) int32_t oc_q8_level_code(float a, const oc_q8_enc *e) {
    float m = e->m0, k = e->k0;
#define OC_Q8_LEVEL(l) { const int up = a >= e->b##l; m = up ? e->m##l : m; k = up ? e->k##l : k; }
    OC_Q8_LEVEL(1) OC_Q8_LEVEL(2) OC_Q8_LEVEL(3) OC_Q8_LEVEL(4) OC_Q8_LEVEL(5) OC_Q8_LEVEL(6)
#undef OC_Q8_LEVEL
    float t = a * m - k * (1.0f / 9.0f);  /* j = floor(K (a / s - 0.1) / 0.9) = floor(a mul - K / 9) */
    t = t > 0.0f ? t : 0.0f;                 /* NaN -> 0 */
    t = t < k - 1.0f ? t : k - 1.0f;
    return (int32_t)(k + t);                 /* k + floor(t): t >= 0 truncates down */
}

/* Quantize n <= OC_Q8_BLOCK values into one block: absmax, then one byte per value, the
 * nearest code of a = |x| / absmax (oc_q8_level_code). A block holding a NaN gets a NaN absmax
 * (every value reads back NaN, as float32 state would propagate it); an all-zero block gets
 * absmax 0 and reads back zeros. Codes are computed as int32 in one loop and narrowed to
 * bytes in a second, so that the first vectorizes at full width (no byte lanes inside it),
 * with the signed and unsigned codes as separate loops. */
static inline __attribute__((always_inline)) void
oc_q8_block_store(uint8_t *OC_RESTRICT dst, float *OC_RESTRICT absmax,
                  const float *OC_RESTRICT src, int64_t n, int is_signed) {
#if OC_X86_DISPATCH
    if (n == OC_Q8_BLOCK && oc_q8_simd) {
        oc_q8_simd_block_store(dst, absmax, src, is_signed);
        return;
    }
#endif
    const oc_q8_enc e = oc_q8_enc_of(&oc_q8_codes[is_signed]);
    int32_t code[OC_Q8_BLOCK] __attribute__((aligned(64)));
    /* |x| as bits: unsigned order is float order, and NaN sorts above inf */
    uint32_t mb = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = oc_bits(src[i]) & 0x7fffffffu;
        mb = b > mb ? b : mb;
    }
    const float mx = oc_float(mb);
    *absmax = mx;
    const float inv = mx > 0.0f ? 1.0f / mx : 0.0f;
    if (is_signed) {
        for (int64_t i = 0; i < n; i++) {
            const float a = fabsf(src[i]) * inv;
            int32_t u = oc_q8_level_code(a, &e);
            u = a >= e.lo ? u : 0;
            const int32_t neg = (int32_t)(oc_bits(src[i]) >> 31);
            /* negative: the sign bit, except for 0; at or above hi: +1 is 128, and -1 not
             * being a code, the most negative one, 255 */
            u = neg & (u != 0) ? (u | 128) : u;
            code[i] = a >= e.hi ? 128 + 127 * neg : u;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const float a = src[i] * inv;  /* second moments are >= 0 (or NaN) */
            int32_t u = oc_q8_level_code(fabsf(a), &e);
            u = fabsf(a) > 0.0f ? u : 0;    /* a positive value keeps the smallest code */
            code[i] = fabsf(a) >= e.hi ? 1 : u;
        }
    }
    for (int64_t i = 0; i < n; i++) dst[i] = (uint8_t)code[i];
}

static inline __attribute__((always_inline)) void
oc_q8_block_load(float *OC_RESTRICT dst, const uint8_t *OC_RESTRICT src, float absmax, int64_t n,
                 int is_signed) {
    const float *v = oc_q8_codes[is_signed].value;
#if OC_X86_DISPATCH
    if (n == OC_Q8_BLOCK && oc_q8_simd) {
        oc_q8_simd_block_load(dst, src, absmax, is_signed);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = v[src[i]] * absmax;
}

/* ---- one tile of a slot of any format: load into float32, store back -------------------- */

/* A slot of one chunk: its data at the chunk's first element, its format, the absmax of the
 * chunk's first block (8-bit) and the random base (16-bit formats with stochastic rounding). */
typedef struct {
    void *data;
    float *absmax;
    int kind;
    uint32_t base;
} oc_lp_slot;

static inline __attribute__((always_inline)) void
oc_lp_load(float *OC_RESTRICT dst, const oc_lp_slot *s, int64_t off, int64_t n) {
    if (s->kind == OC_BF16) {
        oc_bf16_load(dst, (const uint16_t *)s->data + off, n);
    } else if (s->kind == OC_F16) {
        oc_f16_load(dst, (const uint16_t *)s->data + off, n);
    } else {
        for (int64_t b = 0; b < n; b += OC_Q8_BLOCK) {
            const int64_t m = n - b < OC_Q8_BLOCK ? n - b : OC_Q8_BLOCK;
            const uint8_t *q = (const uint8_t *)s->data + off + b;
            const float am = s->absmax[(off + b) / OC_Q8_BLOCK];
            if (s->kind == OC_Q8S) oc_q8_block_load(dst + b, q, am, m, 1);  /* constant sign: */
            else oc_q8_block_load(dst + b, q, am, m, 0);                    /* no branch inside */
        }
    }
}

static inline __attribute__((always_inline)) int oc_kind_half(int kind) {
    return kind == OC_BF16 || kind == OC_F16;
}

/* Store n float32 values into a slot from its element `off`. The 16-bit formats round
 * stochastically with bits shift..shift+15 of the random words r[0..n), or to nearest when r
 * is NULL; 8-bit formats requantize per block. */
static inline __attribute__((always_inline)) void
oc_lp_store(const oc_lp_slot *s, const float *OC_RESTRICT src, int64_t off, int64_t n,
            const uint32_t *OC_RESTRICT r, int shift) {
    if (s->kind == OC_BF16) {
        uint16_t *d = (uint16_t *)s->data + off;
        if (r != NULL) oc_bf16_store_sr(d, src, n, r, shift);
        else oc_bf16_store_rne(d, src, n);
    } else if (s->kind == OC_F16) {
        uint16_t *d = (uint16_t *)s->data + off;
        if (r != NULL) oc_f16_store_sr(d, src, n, r, shift);
        else oc_f16_store_rne(d, src, n);
    } else {
        for (int64_t b = 0; b < n; b += OC_Q8_BLOCK) {
            const int64_t m = n - b < OC_Q8_BLOCK ? n - b : OC_Q8_BLOCK;
            uint8_t *q = (uint8_t *)s->data + off + b;
            float *am = s->absmax + (off + b) / OC_Q8_BLOCK;
            if (s->kind == OC_Q8S) oc_q8_block_store(q, am, src + b, m, 1);
            else oc_q8_block_store(q, am, src + b, m, 0);
        }
    }
}

/* Store a 16-bit slot with stochastic rounding from its own stream: element k of the tensor
 * draws the low 16 bits of oc_mix32(s->base + k); `first` is the tensor index of element
 * `off`. */
static inline __attribute__((always_inline)) void
oc_lp_store_sr(const oc_lp_slot *s, const float *OC_RESTRICT src, int64_t off, int64_t n,
               int64_t first) {
    uint32_t r[OC_TILE] __attribute__((aligned(64)));
    for (int64_t t = 0; t < n; t += OC_TILE) {
        const int64_t m = n - t < OC_TILE ? n - t : OC_TILE;
        oc_rand_fill(r, s->base, first + t, m);
        oc_lp_store(s, src + t, off + t, m, r, 0);
    }
}

#endif /* OC_LOWP_H */
