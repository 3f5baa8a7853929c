/* Fused in-place optimizer updates over a table of float32 tensors.
 *
 * Slots of the oc_list: 0 parameter, 1 gradient, 2 gradient accumulator (optional), 3..5 the
 * rule's state buffers, 6 a model copy of the parameter (optional), 7 the Kahan compensation
 * of a 16-bit parameter (optional). Every buffer is read and written once per call. A slot's
 * address may be NULL for some tensors (no model copy or compensation for that tensor).
 *
 * Low precision (oc_lowp.h): a chunk whose slots are all float32 runs the rule on the buffers
 * directly. Adam has one-loop paths that convert inside the rule's loop: the whole chunk
 * (oc_adam_lp_sweep: parameter, gradient, state and model copy, when no option outside the
 * loop applies) or the state slots of a tile (oc_adam_lp_fused). Otherwise, per tile, the
 * parameter, gradient and state slots stored in another format are converted into float32
 * tiles (L1), the same rule runs on them, and they are stored back in their format in the
 * same sweep: bfloat16 state with stochastic rounding,
 * 8-bit state requantized per block with its new absmax, a bfloat16 or float16 parameter
 * rounded to nearest, stochastically or with its compensation (p = p16 + comp, both of the
 * parameter's format, split again after the update: p16 = rne(p), comp = rne(p - p16)), and
 * the model copy written as bfloat16 or float16 rounded to nearest from the float32
 * parameter.
 *
 * Per tile, the gradient the rule sees is
 *     g = clamp((grad + acc) * scale * tensor_scale[t], +-clamp) + weight_decay * p
 * (acc, tensor_scale, clamp and weight_decay each only when set; scale is negative for
 * `maximize`), then decoupled decay p *= decay, then the rule, then optionally the L1
 * proximal step p = sign(p) * max(|p| - l1_thresh, 0).
 * The formulas of the rules are those documented by torch.optim; scalars that depend on the
 * step (bias corrections, schedules) are computed in float64 by the caller.
 */
#ifndef OC_OPTIM_H
#define OC_OPTIM_H

#include "oc_common.h"
#include "oc_lowp.h"

enum { OC_SLOT_COPY = 6, OC_SLOT_COMP = 7 };

typedef struct {
    float scale;               /* gradient multiplier: grad_scale, negated for maximize */
    const float *tensor_scale; /* per-tensor multiplier (ntensors entries) or NULL */
    float clamp;               /* |g| bound after scaling; INFINITY when off */
    float weight_decay;        /* coupled L2: g += weight_decay * p */
    float decay;               /* decoupled weight decay factor applied to p first; 1 when off */
    float l1_thresh;           /* soft threshold of the L1 proximal step; 0 when off */
    uint32_t rng_key;          /* oc_rng_key(seed, step): stochastic rounding of this step */
    int param_sr;              /* a 16-bit parameter is rounded stochastically (else to nearest) */
} oc_gradopts;

/* The gradient of one tile as the rule sees it. Returns `grad` itself when nothing changes it,
 * else fills and returns `buf`. */
static inline __attribute__((always_inline)) const float *
oc_grad_tile(float *OC_RESTRICT buf, const float *OC_RESTRICT grad, const float *OC_RESTRICT acc,
             const float *OC_RESTRICT p, int64_t n, float s, const oc_gradopts *o) {
    const float c = o->clamp, wd = o->weight_decay;
    if (acc == NULL && s == 1.0f && !(c < INFINITY) && wd == 0.0f) return grad;
    if (acc != NULL) {
        for (int64_t i = 0; i < n; i++) buf[i] = (grad[i] + acc[i]) * s;
    } else {
        for (int64_t i = 0; i < n; i++) buf[i] = grad[i] * s;
    }
    if (c < INFINITY) {
        for (int64_t i = 0; i < n; i++) {
            float g = buf[i];
            buf[i] = g > c ? c : (g < -c ? -c : g);  /* NaN passes through */
        }
    }
    if (wd != 0.0f) {
        for (int64_t i = 0; i < n; i++) buf[i] = buf[i] + wd * p[i];
    }
    return buf;
}

static inline __attribute__((always_inline)) void
oc_decay_tile(float *OC_RESTRICT p, int64_t n, float decay) {
    if (decay != 1.0f)
        for (int64_t i = 0; i < n; i++) p[i] = p[i] * decay;
}

static inline __attribute__((always_inline)) void
oc_l1_tile(float *OC_RESTRICT p, int64_t n, float t) {
    if (t > 0.0f) {
        for (int64_t i = 0; i < n; i++) {
            float a = fabsf(p[i]) - t;
            p[i] = a <= 0.0f ? 0.0f : copysignf(a, p[i]);  /* NaN passes through */
        }
    }
}

/* max(a, b) that returns NaN when either is NaN, like torch.maximum. */
static inline __attribute__((always_inline)) float oc_nanmax(float a, float b) {
    return (a > b || a != a) ? a : b;
}

/* ---- rules: one tile, g already prepared --------------------------------------------- */

typedef struct { float lr, momentum, dampening_c; int nesterov, first; } oc_sgd_h;

static inline __attribute__((always_inline)) void
oc_sgd_tile(const oc_sgd_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
            float *OC_RESTRICT buf, float *OC_RESTRICT unused1, float *OC_RESTRICT unused2, int64_t n) {
    (void)unused1; (void)unused2;
    const float lr = h->lr, mu = h->momentum, dc = h->dampening_c;
    if (buf == NULL) {
        for (int64_t i = 0; i < n; i++) p[i] = p[i] - lr * g[i];
    } else if (h->first) {
        if (h->nesterov)
            for (int64_t i = 0; i < n; i++) { buf[i] = g[i]; p[i] = p[i] - lr * (g[i] + mu * g[i]); }
        else
            for (int64_t i = 0; i < n; i++) { buf[i] = g[i]; p[i] = p[i] - lr * g[i]; }
    } else if (h->nesterov) {
        for (int64_t i = 0; i < n; i++) {
            float b = mu * buf[i] + dc * g[i];
            buf[i] = b;
            p[i] = p[i] - lr * (g[i] + mu * b);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float b = mu * buf[i] + dc * g[i];
            buf[i] = b;
            p[i] = p[i] - lr * b;
        }
    }
}

typedef struct { float clr, eps; } oc_adagrad_h;

static inline __attribute__((always_inline)) void
oc_adagrad_tile(const oc_adagrad_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                float *OC_RESTRICT sum, float *OC_RESTRICT unused1, float *OC_RESTRICT unused2, int64_t n) {
    (void)unused1; (void)unused2;
    const float clr = h->clr, eps = h->eps;
    for (int64_t i = 0; i < n; i++) {
        float s = sum[i] + g[i] * g[i];
        sum[i] = s;
        p[i] = p[i] - clr * (g[i] / (sqrtf(s) + eps));
    }
}

typedef struct { float lr, alpha, alpha_c, eps, momentum; int centered; } oc_rmsprop_h;

static inline __attribute__((always_inline)) float oc_rms_denom(float sq, float ga, float eps, int centered) {
    float var = centered ? sq - ga * ga : sq;
    var = var < 0.0f ? 0.0f : var;  /* rounding can push the centered estimate below 0; NaN passes */
    return sqrtf(var) + eps;
}

static inline __attribute__((always_inline)) void
oc_rmsprop_tile(const oc_rmsprop_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                float *OC_RESTRICT sq, float *OC_RESTRICT gavg, float *OC_RESTRICT buf, int64_t n) {
    const float lr = h->lr, a = h->alpha, ac = h->alpha_c, eps = h->eps, mu = h->momentum;
    if (h->centered) {
        for (int64_t i = 0; i < n; i++) {
            float s = a * sq[i] + ac * (g[i] * g[i]);
            float m = a * gavg[i] + ac * g[i];
            sq[i] = s;
            gavg[i] = m;
            float d = oc_rms_denom(s, m, eps, 1);
            if (buf != NULL) { float b = mu * buf[i] + g[i] / d; buf[i] = b; p[i] = p[i] - lr * b; }
            else p[i] = p[i] - lr * (g[i] / d);
        }
    } else if (buf != NULL) {
        for (int64_t i = 0; i < n; i++) {
            float s = a * sq[i] + ac * (g[i] * g[i]);
            sq[i] = s;
            float b = mu * buf[i] + g[i] / (sqrtf(s) + eps);
            buf[i] = b;
            p[i] = p[i] - lr * b;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float s = a * sq[i] + ac * (g[i] * g[i]);
            sq[i] = s;
            p[i] = p[i] - lr * (g[i] / (sqrtf(s) + eps));
        }
    }
}

typedef struct { float step_size, beta1, beta1_c, beta2, beta2_c, bc2_sqrt, eps; } oc_adam_h;

static inline __attribute__((always_inline)) void
oc_adam_tile(const oc_adam_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
             float *OC_RESTRICT m, float *OC_RESTRICT v, float *OC_RESTRICT vmax, int64_t n) {
    const float ss = h->step_size, b1 = h->beta1, b1c = h->beta1_c, b2 = h->beta2, b2c = h->beta2_c;
    const float bc2s = h->bc2_sqrt, eps = h->eps;
    if (vmax == NULL) {
        for (int64_t i = 0; i < n; i++) {
            float mi = b1 * m[i] + b1c * g[i];
            float vi = b2 * v[i] + b2c * (g[i] * g[i]);
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] - ss * (mi / (sqrtf(vi) / bc2s + eps));
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            float mi = b1 * m[i] + b1c * g[i];
            float vi = b2 * v[i] + b2c * (g[i] * g[i]);
            float vm = oc_nanmax(vmax[i], vi);
            m[i] = mi;
            v[i] = vi;
            vmax[i] = vm;
            p[i] = p[i] - ss * (mi / (sqrtf(vm) / bc2s + eps));
        }
    }
}

/* oc_adam_tile without AMSGrad in one loop with the conversions of its low-precision slots,
 * so that they run beside the divisions and square root instead of in passes of their own.
 * The kinds are compile-time constants at every call (gcc compiles one loop per combination):
 *   pk  the parameter: OC_F32 (p, in place) or OC_BF16 (p16: widened, then rounded
 *       stochastically with the low 16 bits of oc_mix32(pbase + i) when psr, else to nearest);
 *   gk  the gradient: OC_F32 (g), OC_BF16 or OC_F16 (g16), widened, then times s;
 *   sk  m and v: OC_F32 (m, v) or OC_BF16 (m16, v16: widened, rounded stochastically with the
 *       low (m) and high (v) 16 bits of the random word oc_mix32(rbase + i), as the tile path
 *       draws them);
 *   ck  the model copy: OC_NO_COPY, or OC_BF16 (copy: the new p rounded to nearest; a float16
 *       copy stays on the tile path: gcc 12 does not vectorize its narrowing in this loop).
 * p is multiplied by `decay` before the step (AdamW's decoupled decay). The tile path skips
 * the products by s or decay when they are 1; x * 1 is x, except that a signalling NaN turns
 * quiet, which the rule's arithmetic does to it anyway: the same bits either way. */
enum { OC_NO_COPY = -1 };

static inline __attribute__((always_inline)) void
oc_adam_lp_loop(const oc_adam_h *h, int pk, int gk, int sk, int ck, int psr,
                float *OC_RESTRICT p, uint16_t *OC_RESTRICT p16, uint32_t pbase,
                const float *OC_RESTRICT g, const uint16_t *OC_RESTRICT g16, float s, float decay,
                float *OC_RESTRICT m, float *OC_RESTRICT v, uint16_t *OC_RESTRICT m16,
                uint16_t *OC_RESTRICT v16, uint32_t rbase, uint16_t *OC_RESTRICT copy, int64_t n) {
    const float ss = h->step_size, b1 = h->beta1, b1c = h->beta1_c, b2 = h->beta2, b2c = h->beta2_c;
    const float bc2s = h->bc2_sqrt, eps = h->eps;
    const uint32_t nn = (uint32_t)n;
    for (uint32_t i = 0; i < nn; i++) {
        const float gi = (gk == OC_BF16 ? oc_bf16_to_f32(g16[i])
                          : gk == OC_F16 ? oc_f16_to_f32(g16[i]) : g[i]) * s;
        const float pi = (pk == OC_BF16 ? oc_bf16_to_f32(p16[i]) : p[i]) * decay;
        const float mo = sk == OC_BF16 ? oc_bf16_to_f32(m16[i]) : m[i];
        const float vo = sk == OC_BF16 ? oc_bf16_to_f32(v16[i]) : v[i];
        const float mi = b1 * mo + b1c * gi;
        const float vi = b2 * vo + b2c * (gi * gi);
        if (sk == OC_BF16) {
            const uint32_t r = oc_mix32(rbase + i);
            m16[i] = oc_f32_to_bf16_sr(mi, r);
            v16[i] = oc_f32_to_bf16_sr(vi, r >> 16);
        } else {
            m[i] = mi;
            v[i] = vi;
        }
        const float pn = pi - ss * (mi / (sqrtf(vi) / bc2s + eps));
        if (pk == OC_BF16)
            p16[i] = psr ? oc_f32_to_bf16_sr(pn, oc_mix32(pbase + i)) : oc_f32_to_bf16_rne(pn);
        else
            p[i] = pn;
        if (ck == OC_BF16) copy[i] = oc_f32_to_bf16_rne(pn);
    }
}

static int oc_bf16_pairs_on = 1;  /* oc_adam_bf16_pairs is in use (else oc_adam_lp_loop): tests */

/* A 32-bit word of two bfloat16 elements, at any 2-byte aligned address. */
typedef uint32_t oc_bf16_pair __attribute__((may_alias, aligned(2)));

/* oc_adam_lp_loop for bfloat16 parameter, gradient, m and v, two elements per 32-bit word:
 * element 2w is the low half of word w (little-endian), so that it widens by one shift and
 * element 2w + 1 by one mask, and the two rounded halves are put back by a shift, a mask and an
 * or, where 16-bit lanes would need a widening and a narrowing instruction each (8 instead of
 * 20 per 16 elements, all of them on the ALU ports). The values are those of oc_adam_lp_loop,
 * bit for bit, and so are the roundings without its NaN selects: every operand of the
 * arithmetic is a widened bfloat16 (low 16 bits zero) or a scalar (the hyper-parameters are
 * finite, and the gradient scale is NaN only as the result of arithmetic on such values), and
 * every NaN the arithmetic returns is quiet with the payload of such an operand or the default
 * NaN, so its low 16 bits are zero and adding at most 0xffff to them keeps the top half, the
 * quiet NaN the selects would return. An odd last element goes through oc_adam_lp_loop. */
static inline __attribute__((always_inline)) void
oc_adam_bf16_pairs(const oc_adam_h *h, int psr, uint16_t *p16, uint32_t pbase,
                   const uint16_t *g16, float s, float decay, uint16_t *m16, uint16_t *v16,
                   uint32_t rbase, int64_t n) {
    const float ss = h->step_size, b1 = h->beta1, b1c = h->beta1_c, b2 = h->beta2, b2c = h->beta2_c;
    const float bc2s = h->bc2_sqrt, eps = h->eps;
    oc_bf16_pair *OC_RESTRICT pp = (oc_bf16_pair *)p16, *OC_RESTRICT mp = (oc_bf16_pair *)m16;
    oc_bf16_pair *OC_RESTRICT vp = (oc_bf16_pair *)v16;
    const oc_bf16_pair *OC_RESTRICT gp = (const oc_bf16_pair *)g16;
    const uint32_t nw = (uint32_t)(n / 2);
    for (uint32_t w = 0; w < nw; w++) {
        const uint32_t pw = pp[w], gw = gp[w], mw = mp[w], vw = vp[w];
        const float g0 = oc_float(gw << 16) * s, g1 = oc_float(gw & 0xffff0000u) * s;
        const float p0 = oc_float(pw << 16) * decay, p1 = oc_float(pw & 0xffff0000u) * decay;
        const float m0 = b1 * oc_float(mw << 16) + b1c * g0;
        const float m1 = b1 * oc_float(mw & 0xffff0000u) + b1c * g1;
        const float v0 = b2 * oc_float(vw << 16) + b2c * (g0 * g0);
        const float v1 = b2 * oc_float(vw & 0xffff0000u) + b2c * (g1 * g1);
        const uint32_t r0 = oc_mix32(rbase + 2 * w), r1 = oc_mix32(rbase + 2 * w + 1);
        mp[w] = oc_bf16_join(oc_bf16_sr_word(m0, r0), oc_bf16_sr_word(m1, r1));
        vp[w] = oc_bf16_join(oc_bf16_sr_word(v0, r0 >> 16), oc_bf16_sr_word(v1, r1 >> 16));
        const float n0 = p0 - ss * (m0 / (sqrtf(v0) / bc2s + eps));
        const float n1 = p1 - ss * (m1 / (sqrtf(v1) / bc2s + eps));
        pp[w] = psr ? oc_bf16_join(oc_bf16_sr_word(n0, oc_mix32(pbase + 2 * w)),
                                   oc_bf16_sr_word(n1, oc_mix32(pbase + 2 * w + 1)))
                    : oc_bf16_join(oc_bf16_rne_word(n0), oc_bf16_rne_word(n1));
    }
}

/* 8-bit (m signed, v unsigned): decoding, update and parameter step together, the new float32
 * moments kept in L1 for the per-block requantization that needs their absmax. */
static inline __attribute__((always_inline)) void
oc_adam_q8_loop(const oc_adam_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                const uint8_t *OC_RESTRICT mq, const uint8_t *OC_RESTRICT vq, float am, float av,
                float *OC_RESTRICT mf, float *OC_RESTRICT vf, int64_t n) {
    const float ss = h->step_size, b1 = h->beta1, b1c = h->beta1_c, b2 = h->beta2, b2c = h->beta2_c;
    const float bc2s = h->bc2_sqrt, eps = h->eps;
    const float *cm = oc_q8_codes[1].value, *cv = oc_q8_codes[0].value;
    for (int64_t i = 0; i < n; i++) {
        float mi = b1 * (cm[mq[i]] * am) + b1c * g[i];
        float vi = b2 * (cv[vq[i]] * av) + b2c * (g[i] * g[i]);
        mf[i] = mi;
        vf[i] = vi;
        p[i] = p[i] - ss * (mi / (sqrtf(vi) / bc2s + eps));
    }
}

#if OC_X86_DISPATCH
typedef struct { __m512 ss, b1, b1c, b2, b2c, bc2s, eps; } oc_adam_v;

/* Elements [j, j + 16) of one block of oc_adam_q8_loop: decoding, update, parameter step;
 * the new moments go to mf and vf and into the block's running absmax bits. */
OC_AVX512_INLINE void
oc_q8_simd_adam16(const oc_adam_v *c, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                  const uint8_t *OC_RESTRICT mq, const uint8_t *OC_RESTRICT vq, __m512 am, __m512 av,
                  float *OC_RESTRICT mf, float *OC_RESTRICT vf, __m512i *mbm, __m512i *mbv) {
    const __m512 gj = _mm512_loadu_ps(g);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(c->b1, oc_q8_simd_decode(&oc_q8_codes[1], mq, am, 1)),
                                    _mm512_mul_ps(c->b1c, gj));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(c->b2, oc_q8_simd_decode(&oc_q8_codes[0], vq, av, 0)),
                                    _mm512_mul_ps(c->b2c, _mm512_mul_ps(gj, gj)));
    _mm512_store_ps(mf, mi);
    _mm512_store_ps(vf, vi);
    *mbm = oc_q8_simd_absmax(*mbm, mi);
    *mbv = oc_q8_simd_absmax(*mbv, vi);
    const __m512 d = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), c->bc2s), c->eps);
    _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_loadu_ps(p), _mm512_mul_ps(c->ss, _mm512_div_ps(mi, d))));
}

/* oc_adam_q8_loop and the requantization of m and v on nb full blocks (absmax am, av per
 * block), block by block: the update into L1, then the codes. */
static OC_AVX512 __attribute__((noinline)) void
oc_q8_simd_adam_blocks(const oc_adam_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                       uint8_t *OC_RESTRICT mq, uint8_t *OC_RESTRICT vq, float *OC_RESTRICT am,
                       float *OC_RESTRICT av, int64_t nb) {
    float mf[OC_Q8_BLOCK] __attribute__((aligned(64)));
    float vf[OC_Q8_BLOCK] __attribute__((aligned(64)));
    const oc_adam_v c = {_mm512_set1_ps(h->step_size), _mm512_set1_ps(h->beta1),
                         _mm512_set1_ps(h->beta1_c), _mm512_set1_ps(h->beta2),
                         _mm512_set1_ps(h->beta2_c), _mm512_set1_ps(h->bc2_sqrt),
                         _mm512_set1_ps(h->eps)};
    for (int64_t b = 0; b < nb; b++) {
        const int64_t o = b * OC_Q8_BLOCK;
        __m512i mbm = _mm512_setzero_si512(), mbv = _mm512_setzero_si512();
        const __m512 a = _mm512_set1_ps(am[b]), v = _mm512_set1_ps(av[b]);
        for (int j = 0; j < OC_Q8_BLOCK; j += 16)
            oc_q8_simd_adam16(&c, g + o + j, p + o + j, mq + o + j, vq + o + j, a, v, mf + j, vf + j,
                              &mbm, &mbv);
        const __m512 im = oc_q8_simd_finish_absmax(mbm, am + b);
        const __m512 iv = oc_q8_simd_finish_absmax(mbv, av + b);
        for (int j = 0; j < OC_Q8_BLOCK; j += 16) {
            _mm_storeu_si128((__m128i *)(mq + o + j), oc_q8_simd_encode(_mm512_load_ps(mf + j), im, 1));
            _mm_storeu_si128((__m128i *)(vq + o + j), oc_q8_simd_encode(_mm512_load_ps(vf + j), iv, 0));
        }
    }
}
#endif

static inline __attribute__((always_inline)) int
oc_adam_lp_fused(const oc_adam_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
                 const oc_lp_slot *S, int64_t i, int64_t n, int64_t first) {
    if (S[5].data != NULL) return 0;
    if (S[3].kind == OC_BF16 && S[4].kind == OC_BF16) {
        oc_adam_lp_loop(h, OC_F32, OC_F32, OC_BF16, OC_NO_COPY, 0, p, NULL, 0, g, NULL, 1.0f, 1.0f,
                        NULL, NULL, (uint16_t *)S[3].data + i, (uint16_t *)S[4].data + i,
                        S[3].base + (uint32_t)first, NULL, n);
        return 1;
    }
    if (S[3].kind == OC_Q8S && S[4].kind == OC_Q8U) {
        float mf[OC_Q8_BLOCK] __attribute__((aligned(64)));
        float vf[OC_Q8_BLOCK] __attribute__((aligned(64)));
        int64_t b = 0;
#if OC_X86_DISPATCH
        if (oc_q8_simd && n >= OC_Q8_BLOCK) {
            b = n / OC_Q8_BLOCK * OC_Q8_BLOCK;
            oc_q8_simd_adam_blocks(h, g, p, (uint8_t *)S[3].data + i, (uint8_t *)S[4].data + i,
                                   S[3].absmax + i / OC_Q8_BLOCK, S[4].absmax + i / OC_Q8_BLOCK,
                                   b / OC_Q8_BLOCK);
        }
#endif
        for (; b < n; b += OC_Q8_BLOCK) {
            const int64_t k = n - b < OC_Q8_BLOCK ? n - b : OC_Q8_BLOCK;
            const int64_t blk = (i + b) / OC_Q8_BLOCK;
            uint8_t *mq = (uint8_t *)S[3].data + i + b, *vq = (uint8_t *)S[4].data + i + b;
            oc_adam_q8_loop(h, g + b, p + b, mq, vq, S[3].absmax[blk], S[4].absmax[blk], mf, vf, k);
            oc_q8_block_store(mq, S[3].absmax + blk, mf, k, 1);
            oc_q8_block_store(vq, S[4].absmax + blk, vf, k, 0);
        }
        return 1;
    }
    return 0;
}

/* A whole chunk of Adam in one loop that also owns the parameter, gradient and model copy
 * (oc_adam_lp_loop): when nothing else applies to it (no accumulator, clamp, coupled weight
 * decay, L1 step, AMSGrad or compensation; the scale s and decoupled decay are in the loop), for
 * a float32 or bfloat16 parameter (no model copy), a float32, bfloat16 or float16 gradient (a
 * bfloat16 parameter's is bfloat16 or float32), float32 or bfloat16 m and v, and a bfloat16
 * model copy of a float32 parameter. Returns 0 (the tile path runs) otherwise. Each runtime
 * kind below is turned into a constant by its branch. */
typedef struct {
    const oc_adam_h *h;
    const oc_lp_slot *S;
    float s, decay;
    uint32_t first;
    int64_t n;
} oc_adam_lp_args;

static inline __attribute__((always_inline)) void
oc_adam_lp_call(const oc_adam_lp_args *a, int pk, int gk, int sk, int ck, int psr) {
    const oc_lp_slot *S = a->S;
    const int hs = sk == OC_BF16;
    int64_t e = 0;  /* elements done two per word; the one-element loop runs [e, n) */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (pk == OC_BF16 && gk == OC_BF16 && hs && oc_bf16_pairs_on) {
        e = a->n / 2 * 2;
        oc_adam_bf16_pairs(a->h, psr, (uint16_t *)S[0].data, S[0].base + a->first,
                           (const uint16_t *)S[1].data, a->s, a->decay, (uint16_t *)S[3].data,
                           (uint16_t *)S[4].data, S[3].base + a->first, e);
        if (e == a->n) return;
    }
#endif
    const uint32_t first = a->first + (uint32_t)e;
    oc_adam_lp_loop(a->h, pk, gk, sk, ck, psr, pk == OC_F32 ? (float *)S[0].data + e : NULL,
                    pk == OC_F32 ? NULL : (uint16_t *)S[0].data + e, S[0].base + first,
                    gk == OC_F32 ? (const float *)S[1].data + e : NULL,
                    gk == OC_F32 ? NULL : (const uint16_t *)S[1].data + e, a->s, a->decay,
                    hs ? NULL : (float *)S[3].data + e, hs ? NULL : (float *)S[4].data + e,
                    hs ? (uint16_t *)S[3].data + e : NULL, hs ? (uint16_t *)S[4].data + e : NULL,
                    S[3].base + first,
                    ck == OC_NO_COPY ? NULL : (uint16_t *)S[OC_SLOT_COPY].data + e, a->n - e);
}

static inline __attribute__((always_inline)) void
oc_adam_lp_by_state(const oc_adam_lp_args *a, int pk, int gk, int ck, int psr) {
    if (a->S[3].kind == OC_BF16) oc_adam_lp_call(a, pk, gk, OC_BF16, ck, psr);
    else oc_adam_lp_call(a, pk, gk, OC_F32, ck, psr);
}

static inline __attribute__((always_inline)) void
oc_adam_lp_by_grad(const oc_adam_lp_args *a, int pk, int ck, int psr) {
    const int gk = a->S[1].kind;
    if (gk == OC_BF16) oc_adam_lp_by_state(a, pk, OC_BF16, ck, psr);
    else if (gk == OC_F16 && pk == OC_F32) oc_adam_lp_by_state(a, pk, OC_F16, ck, psr);
    else oc_adam_lp_by_state(a, pk, OC_F32, ck, psr);
}

/* The two halves of the dispatch, each a function of its own (and its own ISA clones): in one
 * function with the rest of the driver, gcc 12 left some of these loops scalar. */
OC_CLONES static void oc_adam_lp_bf16_param(const oc_adam_lp_args *a, int psr) {
    if (psr) oc_adam_lp_by_grad(a, OC_BF16, OC_NO_COPY, 1);
    else oc_adam_lp_by_grad(a, OC_BF16, OC_NO_COPY, 0);
}

OC_CLONES static void oc_adam_lp_f32_param(const oc_adam_lp_args *a, int ck) {
    if (ck == OC_BF16) oc_adam_lp_by_grad(a, OC_F32, OC_BF16, 0);
    else oc_adam_lp_by_grad(a, OC_F32, OC_NO_COPY, 0);
}

static inline __attribute__((always_inline)) int64_t
oc_adam_lp_sweep(const oc_adam_h *h, const oc_gradopts *o, float s, const float *acc,
                 const oc_lp_slot *S, int64_t n, int64_t first) {
    const int pk = S[0].kind, gk = S[1].kind, sk = S[3].kind;
    const int ck = S[OC_SLOT_COPY].data != NULL ? S[OC_SLOT_COPY].kind : OC_NO_COPY;
    if (acc != NULL || o->clamp < INFINITY || o->weight_decay != 0.0f || o->l1_thresh > 0.0f
        || S[5].data != NULL || S[OC_SLOT_COMP].data != NULL || S[4].kind != sk
        || (sk != OC_F32 && sk != OC_BF16) || (gk == OC_F16 && pk != OC_F32)
        || !(pk == OC_F32 || (pk == OC_BF16 && ck == OC_NO_COPY))
        || (ck != OC_NO_COPY && ck != OC_BF16))
        return 0;
    const oc_adam_lp_args a = {h, S, s, o->decay, (uint32_t)first, n};
    if (pk == OC_BF16) oc_adam_lp_bf16_param(&a, o->param_sr);
    else oc_adam_lp_f32_param(&a, ck);
    return n;
}

typedef struct { float clr, beta1, beta1_c, beta2, eps; } oc_adamax_h;

static inline __attribute__((always_inline)) void
oc_adamax_tile(const oc_adamax_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
               float *OC_RESTRICT m, float *OC_RESTRICT u, float *OC_RESTRICT unused, int64_t n) {
    (void)unused;
    const float clr = h->clr, b1 = h->beta1, b1c = h->beta1_c, b2 = h->beta2, eps = h->eps;
    for (int64_t i = 0; i < n; i++) {
        float mi = b1 * m[i] + b1c * g[i];
        float ui = oc_nanmax(b2 * u[i], fabsf(g[i]) + eps);
        m[i] = mi;
        u[i] = ui;
        p[i] = p[i] - clr * (mi / ui);
    }
}

typedef struct { float coef_g, coef_m, beta1, beta1_c, beta2, beta2_c, bc2, eps; } oc_nadam_h;

static inline __attribute__((always_inline)) void
oc_nadam_tile(const oc_nadam_h *h, const float *OC_RESTRICT g, float *OC_RESTRICT p,
              float *OC_RESTRICT m, float *OC_RESTRICT v, float *OC_RESTRICT unused, int64_t n) {
    (void)unused;
    const float cg = h->coef_g, cm = h->coef_m, b1 = h->beta1, b1c = h->beta1_c;
    const float b2 = h->beta2, b2c = h->beta2_c, bc2 = h->bc2, eps = h->eps;
    for (int64_t i = 0; i < n; i++) {
        float mi = b1 * m[i] + b1c * g[i];
        float vi = b2 * v[i] + b2c * (g[i] * g[i]);
        float d = sqrtf(vi / bc2) + eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = (p[i] - cg * (g[i] / d)) - cm * (mi / d);
    }
}

/* ---- drivers: one parallel sweep over the chunks of the table ------------------------- */

/* Whether every slot of chunk c is float32. */
static inline int oc_chunk_all_f32(const oc_list *L, int64_t c) {
    const int64_t t = L->chunk_tensor[c];
    for (int s = 0; s < OC_MAX_SLOTS; s++)
        if (L->slots[s] != NULL && L->kinds[s] != NULL && L->kinds[s][t] != OC_F32) return 0;
    return 1;
}

/* The slots of chunk c with their formats, at the chunk's first element. */
static inline void oc_lp_slots(const oc_list *L, int64_t c, uint32_t key, oc_lp_slot *out) {
    const int64_t t = L->chunk_tensor[c], start = L->chunk_start[c];
    for (int s = 0; s < OC_MAX_SLOTS; s++) {
        oc_lp_slot *o = &out[s];
        o->data = NULL;
        o->absmax = NULL;
        o->kind = OC_F32;
        o->base = oc_rng_base(key, t, s);
        if (L->slots[s] == NULL || L->slots[s][t] == NULL) continue;
        o->kind = L->kinds[s] != NULL ? L->kinds[s][t] : OC_F32;
        const int64_t size = o->kind == OC_F32 ? 4 : (o->kind == OC_BF16 || o->kind == OC_F16 ? 2 : 1);
        o->data = (char *)L->slots[s][t] + start * size;
        if (o->kind == OC_Q8S || o->kind == OC_Q8U) o->absmax = L->absmax[s][t] + start / OC_Q8_BLOCK;
    }
}

/* Tile [i, i + n) of a slot as float32: the slot itself, or `buf` filled from it. */
static inline __attribute__((always_inline)) float *
oc_lp_tile(const oc_lp_slot *s, float *buf, int64_t i, int64_t n) {
    if (s->data == NULL) return NULL;
    if (s->kind == OC_F32) return (float *)s->data + i;
    oc_lp_load(buf, s, i, n);
    return buf;
}

/* A 16-bit parameter (`kind` OC_BF16 or OC_F16) with its compensation of the same format, as
 * float32: p + comp. */
static inline __attribute__((always_inline)) void
oc_kahan_load(float *OC_RESTRICT p, const uint16_t *OC_RESTRICT pb, const uint16_t *OC_RESTRICT cb,
              int64_t n, int kind) {
    if (kind == OC_BF16)
        for (int64_t i = 0; i < n; i++) p[i] = oc_bf16_to_f32(pb[i]) + oc_bf16_to_f32(cb[i]);
    else
        for (int64_t i = 0; i < n; i++) p[i] = oc_f16_to_f32(pb[i]) + oc_f16_to_f32(cb[i]);
}

/* Split p into its rounding to nearest and the rounded remainder (p - p16 is exact in
 * float32: p16 is within half an ulp of p). */
static inline __attribute__((always_inline)) void
oc_kahan_store(uint16_t *OC_RESTRICT pb, uint16_t *OC_RESTRICT cb, const float *OC_RESTRICT p,
               int64_t n, int kind) {
    if (kind == OC_BF16) {
        for (int64_t i = 0; i < n; i++) {
            uint16_t b = oc_f32_to_bf16_rne(p[i]);
            pb[i] = b;
            cb[i] = oc_f32_to_bf16_rne(p[i] - oc_bf16_to_f32(b));
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint16_t b = oc_f32_to_f16_rne(p[i]);
            pb[i] = b;
            cb[i] = oc_f32_to_f16_rne(p[i] - oc_f16_to_f32(b));
        }
    }
}

/* SWEEP(h, o, s, acc, S, n, first): the elements [0, k) of the chunk (n elements, the first
 * at tensor index `first`) in one loop that owns every conversion, returning k (the tiles run
 * the rest: all of it when 0) for the chunk's formats and options. FUSED(h, g, p, S, i, n, first): the rule on
 * the state slots S[3..5] of tile [i, i + n) in one loop with their conversions (p and g
 * already float32 tiles), returning 0 (the tile path runs) when it has none. OC_NO_FUSED: a
 * rule without either. Same operations, same bits as the tile path. */
#define OC_NO_FUSED(...) 0

#define OC_DEFINE_UPDATE(NAME, H_T, TILE, FUSED, SWEEP)                                        \
    static inline __attribute__((always_inline)) void NAME##_chunk(                         \
        const oc_list *L, const oc_gradopts *o, const H_T *h, int64_t c) {                   \
        float gbuf[OC_TILE] __attribute__((aligned(64)));                                    \
        const int64_t n = oc_chunk_len(L, c);                                                \
        float s = o->scale;                                                                   \
        if (o->tensor_scale != NULL) s = s * o->tensor_scale[L->chunk_tensor[c]];            \
        float *p = oc_slot(L, 0, c), *s1 = oc_slot(L, 3, c);                                 \
        float *s2 = oc_slot(L, 4, c), *s3 = oc_slot(L, 5, c);                                \
        const float *gr = oc_slot(L, 1, c), *acc = oc_slot(L, 2, c);                         \
        oc_prefetch_next(L, c);                                                              \
        for (int64_t i = 0; i < n; i += OC_TILE) {                                           \
            const int64_t m = n - i < OC_TILE ? n - i : OC_TILE;                             \
            const float *g = oc_grad_tile(gbuf, gr + i, acc ? acc + i : NULL, p + i, m, s, o); \
            oc_decay_tile(p + i, m, o->decay);                                               \
            TILE(h, g, p + i, s1 ? s1 + i : NULL, s2 ? s2 + i : NULL, s3 ? s3 + i : NULL, m); \
            oc_l1_tile(p + i, m, o->l1_thresh);                                              \
        }                                                                                     \
    }                                                                                         \
    static inline __attribute__((always_inline)) void NAME##_lp_chunk(                      \
        const oc_list *L, const oc_gradopts *o, const H_T *h, int64_t c) {                   \
        float gbuf[OC_TILE] __attribute__((aligned(64)));                                    \
        float graw[OC_TILE] __attribute__((aligned(64)));                                    \
        float pbuf[OC_TILE] __attribute__((aligned(64)));                                    \
        float sbuf[3][OC_TILE] __attribute__((aligned(64)));                                 \
        uint32_t rnd[OC_TILE] __attribute__((aligned(64)));                                  \
        oc_lp_slot S[OC_MAX_SLOTS];                                                          \
        oc_lp_slots(L, c, o->rng_key, S);                                                    \
        const int pair_sr = oc_kind_half(S[3].kind) || oc_kind_half(S[4].kind);              \
        const int64_t n = oc_chunk_len(L, c), start = L->chunk_start[c];                     \
        float s = o->scale;                                                                   \
        if (o->tensor_scale != NULL) s = s * o->tensor_scale[L->chunk_tensor[c]];            \
        const float *acc = oc_slot(L, 2, c);                                                 \
        const oc_lp_slot *P = &S[0], *K = &S[OC_SLOT_COMP], *MC = &S[OC_SLOT_COPY];          \
        oc_prefetch_next(L, c);                                                              \
        for (int64_t i = SWEEP(h, o, s, acc, S, n, start); i < n; i += OC_TILE) {                \
            const int64_t m = n - i < OC_TILE ? n - i : OC_TILE;                             \
            float *pt;                                                                        \
            if (K->data != NULL) {                                                            \
                oc_kahan_load(pbuf, (const uint16_t *)P->data + i,                           \
                              (const uint16_t *)K->data + i, m, P->kind);                    \
                pt = pbuf;                                                                    \
            } else {                                                                          \
                pt = oc_lp_tile(P, pbuf, i, m);                                               \
            }                                                                                 \
            const float *gt = oc_lp_tile(&S[1], graw, i, m);                                  \
            const float *g = oc_grad_tile(gbuf, gt, acc ? acc + i : NULL, pt, m, s, o);       \
            oc_decay_tile(pt, m, o->decay);                                                   \
            if (!FUSED(h, g, pt, S, i, m, start + i)) {                                       \
                float *t1 = oc_lp_tile(&S[3], sbuf[0], i, m);                                 \
                float *t2 = oc_lp_tile(&S[4], sbuf[1], i, m);                                 \
                float *t3 = oc_lp_tile(&S[5], sbuf[2], i, m);                                 \
                TILE(h, g, pt, t1, t2, t3, m);                                                \
                if (pair_sr) oc_rand_fill(rnd, S[3].base, start + i, m);                     \
                for (int k = 0; k < 2; k++)                                                   \
                    if (S[3 + k].data != NULL && S[3 + k].kind != OC_F32)                     \
                        oc_lp_store(&S[3 + k], sbuf[k], i, m, rnd, 16 * k);                   \
                if (S[5].data != NULL && S[5].kind != OC_F32)                                 \
                    oc_lp_store_sr(&S[5], sbuf[2], i, m, start + i);                          \
            }                                                                                 \
            oc_l1_tile(pt, m, o->l1_thresh);                                                  \
            if (K->data != NULL)                                                              \
                oc_kahan_store((uint16_t *)P->data + i, (uint16_t *)K->data + i, pbuf, m,    \
                               P->kind);                                                      \
            else if (P->kind != OC_F32 && o->param_sr)                                        \
                oc_lp_store_sr(P, pbuf, i, m, start + i);                                     \
            else if (P->kind != OC_F32)                                                       \
                oc_lp_store(P, pbuf, i, m, NULL, 0);                                          \
            if (MC->data != NULL) oc_lp_store(MC, pt, i, m, NULL, 0);                        \
        }                                                                                     \
    }                                                                                         \
    OC_CLONES static void NAME(const oc_list *L, const oc_gradopts *o, const H_T *h,         \
                               const oc_exec *ex) {                                           \
        OC_FOR_EACH_CHUNK(L, ex, c,                                                           \
                          if (oc_chunk_all_f32(L, c)) NAME##_chunk(L, o, h, c);               \
                          else NAME##_lp_chunk(L, o, h, c));                                  \
    }

OC_DEFINE_UPDATE(oc_sgd_run, oc_sgd_h, oc_sgd_tile, OC_NO_FUSED, OC_NO_FUSED)
OC_DEFINE_UPDATE(oc_adagrad_run, oc_adagrad_h, oc_adagrad_tile, OC_NO_FUSED, OC_NO_FUSED)
OC_DEFINE_UPDATE(oc_rmsprop_run, oc_rmsprop_h, oc_rmsprop_tile, OC_NO_FUSED, OC_NO_FUSED)
OC_DEFINE_UPDATE(oc_adam_run, oc_adam_h, oc_adam_tile, oc_adam_lp_fused, oc_adam_lp_sweep)
OC_DEFINE_UPDATE(oc_adamax_run, oc_adamax_h, oc_adamax_tile, OC_NO_FUSED, OC_NO_FUSED)
OC_DEFINE_UPDATE(oc_nadam_run, oc_nadam_h, oc_nadam_tile, OC_NO_FUSED, OC_NO_FUSED)

/* Set slot `s` of every tensor to `value` (zero_grad over a table of arrays): float32, or a
 * 16-bit slot (its format from the table) to `value` rounded to nearest. */
static inline __attribute__((always_inline)) void
oc_fill_chunk(const oc_list *L, int s, float value, int64_t c) {
    const int64_t t = L->chunk_tensor[c], n = oc_chunk_len(L, c);
    const int kind = L->kinds[s] != NULL ? L->kinds[s][t] : OC_F32;
    if (kind == OC_F32) {
        float *x = oc_slot(L, s, c);
        for (int64_t i = 0; i < n; i++) x[i] = value;
        return;
    }
    const uint16_t h = kind == OC_BF16 ? oc_f32_to_bf16_rne(value) : oc_f32_to_f16_rne(value);
    uint16_t *x = (uint16_t *)L->slots[s][t] + L->chunk_start[c];
    for (int64_t i = 0; i < n; i++) x[i] = h;
}

OC_CLONES static void oc_fill_run(const oc_list *L, int s, float value, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_fill_chunk(L, s, value, c));
}

#endif /* OC_OPTIM_H */
