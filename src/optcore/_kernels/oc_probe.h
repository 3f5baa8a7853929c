/* Roofline probe: STREAM-style sweeps that measure what the memory system delivers to the
 * same chunked, OpenMP, multi-ISA code path the optcore kernels use.
 *
 * Each sweep does the least arithmetic that keeps its memory traffic, so its speed is the
 * bandwidth limit of its access pattern (bytes counted as loads + stores, 4 per element):
 *   copy   a = b                                    1 load, 1 store    8 B/element
 *   triad  a = b + s * c                            2 loads, 1 store  12 B/element
 *   sumsq  sum(x * x)                               1 load             4 B/element
 *   sgd    b = mu * b + g;  p = p - lr * b          3 loads, 2 stores 20 B/element
 *   adam   m = a m + (1-a) g;  v = b v + (1-b) g^2;  p = p - lr (m + v)
 *                                                   4 loads, 3 stores 28 B/element
 * The sgd and adam sweeps are the access patterns of the SGD-momentum / AdaGrad / RMSProp and
 * of the Adam-family update kernels, without their divisions and square roots.
 *
 * The low-precision Adam patterns (oc_lowp.h formats; bf16 as uint16 bits, widened by a shift
 * and narrowed by truncation, the trivial conversions):
 *   adam_bf16     float32 p r/w, float32 g r, bfloat16 m, v r/w              20 B/element
 *   adam_int8     float32 p r/w, float32 g r, uint8 m, v r/w and one float32
 *                 absmax each per block of 256 r/w (m' = m + 1, v' = v + 1)  16 + 1/16
 *   adam_bf16all  bfloat16 p r/w, g r, m, v r/w                              14
 *   adam_copy     float32 p, m, v r/w, bfloat16 g r, bfloat16 copy of p w    28
 *
 * The arrays are single flat buffers cut into OC_CHUNK work items (as the kernels cut their
 * tensors), so the sum of squares is bitwise identical for any thread count: float32 lanes
 * over short blocks, each block added into a float64 partial per chunk, chunk partials summed
 * in index order by the caller.
 */
#ifndef OC_PROBE_H
#define OC_PROBE_H

#include "oc_common.h"
#include "oc_lowp.h"

#define OC_PROBE_LANES 16
#define OC_PROBE_BLOCK 1024  /* elements summed in float32 lanes before folding into float64 */
#define OC_PROBE_Q8 256      /* elements per absmax of the int8 pattern (as OC_Q8_BLOCK) */

/* A one-tensor oc_list header for OC_FOR_EACH_CHUNK (which reads total and nchunks only);
 * chunk c covers [c * OC_CHUNK, min((c + 1) * OC_CHUNK, n)). */
static inline oc_list oc_probe_list(int64_t n) {
    oc_list L;
    L.ntensors = 1;
    L.nchunks = (n + OC_CHUNK - 1) / OC_CHUNK;
    L.total = n;
    L.lengths = NULL;
    L.chunk_tensor = NULL;
    L.chunk_start = NULL;
    for (int s = 0; s < OC_MAX_SLOTS; s++) {
        L.slots[s] = NULL;
        L.kinds[s] = NULL;
        L.absmax[s] = NULL;
    }
    return L;
}

static inline __attribute__((always_inline)) int64_t oc_probe_len(int64_t n, int64_t c) {
    int64_t rest = n - c * OC_CHUNK;
    return rest < OC_CHUNK ? rest : OC_CHUNK;
}

/* Chunk bodies (macro arguments cannot hold top-level commas, so each is a function). */
static inline __attribute__((always_inline)) void
oc_probe_copy_chunk(float *__restrict__ a, const float *__restrict__ b, int64_t k) {
    for (int64_t i = 0; i < k; i++) a[i] = b[i];
}

static inline __attribute__((always_inline)) void
oc_probe_triad_chunk(float *__restrict__ a, const float *__restrict__ b,
                     const float *__restrict__ cc, float s, int64_t k) {
    for (int64_t i = 0; i < k; i++) a[i] = b[i] + s * cc[i];
}

/* Sum of squares of one chunk: float32 lanes per block, blocks folded into float64. */
static inline __attribute__((always_inline)) double
oc_probe_sumsq_chunk(const float *__restrict__ x, int64_t k) {
    double total = 0.0;
    int64_t i = 0;
    while (i + OC_PROBE_LANES <= k) {
        float acc[OC_PROBE_LANES] __attribute__((aligned(64))) = {0};
        int64_t end = i + OC_PROBE_BLOCK < k ? i + OC_PROBE_BLOCK : k;
        end = i + ((end - i) / OC_PROBE_LANES) * OC_PROBE_LANES;
        for (; i < end; i += OC_PROBE_LANES)
            for (int j = 0; j < OC_PROBE_LANES; j++) acc[j] += x[i + j] * x[i + j];
        double block = 0.0;
        for (int j = 0; j < OC_PROBE_LANES; j++) block += (double)acc[j];
        total += block;
    }
    for (; i < k; i++) total += (double)x[i] * (double)x[i];
    return total;
}

static inline __attribute__((always_inline)) void
oc_probe_sgd_chunk(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ b,
                   float mu, float lr, int64_t k) {
    for (int64_t i = 0; i < k; i++) {
        float bi = mu * b[i] + g[i];
        b[i] = bi;
        p[i] = p[i] - lr * bi;
    }
}

typedef struct { float a, a_c, b, b_c, lr; } oc_probe_adam_h;

static inline __attribute__((always_inline)) void
oc_probe_adam_chunk(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
                    float *__restrict__ v, const oc_probe_adam_h *h, int64_t k) {
    const float a = h->a, a_c = h->a_c, b = h->b, b_c = h->b_c, lr = h->lr;
    for (int64_t i = 0; i < k; i++) {
        float mi = a * m[i] + a_c * g[i];
        float vi = b * v[i] + b_c * (g[i] * g[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - lr * (mi + vi);
    }
}

/* ---- low-precision Adam patterns --------------------------------------------------- */
/* bf16 narrowing by truncation (widening: oc_bf16_to_f32, a shift). */
static inline __attribute__((always_inline)) uint16_t oc_probe_narrow(float x) {
    return (uint16_t)(oc_bits(x) >> 16);
}

static inline __attribute__((always_inline)) void
oc_probe_adam_bf16_chunk(float *__restrict__ p, const float *__restrict__ g, uint16_t *__restrict__ m,
                         uint16_t *__restrict__ v, const oc_probe_adam_h *h, int64_t k) {
    const float a = h->a, a_c = h->a_c, b = h->b, b_c = h->b_c, lr = h->lr;
    for (int64_t i = 0; i < k; i++) {
        float mi = a * oc_bf16_to_f32(m[i]) + a_c * g[i];
        float vi = b * oc_bf16_to_f32(v[i]) + b_c * (g[i] * g[i]);
        m[i] = oc_probe_narrow(mi);
        v[i] = oc_probe_narrow(vi);
        p[i] = p[i] - lr * (mi + vi);
    }
}

/* k <= OC_CHUNK elements from a block boundary; am, av: the chunk's absmax entries. */
static inline __attribute__((always_inline)) void
oc_probe_adam_int8_chunk(float *__restrict__ p, const float *__restrict__ g, uint8_t *__restrict__ m,
                         uint8_t *__restrict__ v, float *__restrict__ am, float *__restrict__ av,
                         float lr, int64_t k) {
    for (int64_t b = 0; b * OC_PROBE_Q8 < k; b++) {
        const int64_t lo = b * OC_PROBE_Q8, hi = lo + OC_PROBE_Q8 < k ? lo + OC_PROBE_Q8 : k;
        const float sm = am[b], sv = av[b];
        for (int64_t i = lo; i < hi; i++) {
            p[i] = p[i] - lr * (g[i] + sm * (float)m[i] + sv * (float)v[i]);
            m[i] = (uint8_t)(m[i] + 1u);
            v[i] = (uint8_t)(v[i] + 1u);
        }
        am[b] = sm * 0.5f;
        av[b] = sv * 0.5f;
    }
}

static inline __attribute__((always_inline)) void
oc_probe_adam_bf16all_chunk(uint16_t *__restrict__ p, const uint16_t *__restrict__ g,
                            uint16_t *__restrict__ m, uint16_t *__restrict__ v,
                            const oc_probe_adam_h *h, int64_t k) {
    const float a = h->a, a_c = h->a_c, b = h->b, b_c = h->b_c, lr = h->lr;
    for (int64_t i = 0; i < k; i++) {
        const float gi = oc_bf16_to_f32(g[i]);
        float mi = a * oc_bf16_to_f32(m[i]) + a_c * gi;
        float vi = b * oc_bf16_to_f32(v[i]) + b_c * (gi * gi);
        m[i] = oc_probe_narrow(mi);
        v[i] = oc_probe_narrow(vi);
        p[i] = oc_probe_narrow(oc_bf16_to_f32(p[i]) - lr * (mi + vi));
    }
}

static inline __attribute__((always_inline)) void
oc_probe_adam_copy_chunk(float *__restrict__ p, const uint16_t *__restrict__ g, float *__restrict__ m,
                         float *__restrict__ v, uint16_t *__restrict__ copy,
                         const oc_probe_adam_h *h, int64_t k) {
    const float a = h->a, a_c = h->a_c, b = h->b, b_c = h->b_c, lr = h->lr;
    for (int64_t i = 0; i < k; i++) {
        const float gi = oc_bf16_to_f32(g[i]);
        float mi = a * m[i] + a_c * gi;
        float vi = b * v[i] + b_c * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const float pi = p[i] - lr * (mi + vi);
        p[i] = pi;
        copy[i] = oc_probe_narrow(pi);
    }
}

/* ---- drivers: one parallel sweep over the chunks ------------------------------------ */
#define OC_AT(x, c) ((x) + (c) * (int64_t)OC_CHUNK)

OC_CLONES static void oc_probe_copy(float *a, const float *b, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c, oc_probe_copy_chunk(OC_AT(a, c), OC_AT(b, c), oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_triad(float *a, const float *b, const float *cc, float s, int64_t n,
                                     const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_triad_chunk(OC_AT(a, c), OC_AT(b, c), OC_AT(cc, c), s, oc_probe_len(n, c)));
}

/* Writes one float64 partial per chunk into `partial` (ceil(n / OC_CHUNK) entries). */
OC_CLONES static void oc_probe_sumsq(const float *x, double *partial, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c, partial[c] = oc_probe_sumsq_chunk(OC_AT(x, c), oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_sgd(float *p, const float *g, float *b, float mu, float lr, int64_t n,
                                   const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_sgd_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(b, c), mu, lr, oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_adam(float *p, const float *g, float *m, float *v,
                                    const oc_probe_adam_h *h, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_adam_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(m, c), OC_AT(v, c), h,
                                          oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_adam_bf16(float *p, const float *g, uint16_t *m, uint16_t *v,
                                         const oc_probe_adam_h *h, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_adam_bf16_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(m, c), OC_AT(v, c), h,
                                               oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_adam_int8(float *p, const float *g, uint8_t *m, uint8_t *v, float *am,
                                         float *av, float lr, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    const int64_t per = OC_CHUNK / OC_PROBE_Q8;
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_adam_int8_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(m, c), OC_AT(v, c),
                                               am + c * per, av + c * per, lr, oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_adam_bf16all(uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v,
                                            const oc_probe_adam_h *h, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_adam_bf16all_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(m, c), OC_AT(v, c), h,
                                                  oc_probe_len(n, c)));
}

OC_CLONES static void oc_probe_adam_copy(float *p, const uint16_t *g, float *m, float *v, uint16_t *copy,
                                         const oc_probe_adam_h *h, int64_t n, const oc_exec *ex) {
    const oc_list L = oc_probe_list(n);
    OC_FOR_EACH_CHUNK(&L, ex, c,
                      oc_probe_adam_copy_chunk(OC_AT(p, c), OC_AT(g, c), OC_AT(m, c), OC_AT(v, c),
                                               OC_AT(copy, c), h, oc_probe_len(n, c)));
}

#endif /* OC_PROBE_H */
