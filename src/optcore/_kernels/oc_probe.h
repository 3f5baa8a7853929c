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
 * The arrays are single flat buffers cut into OC_CHUNK work items (as the kernels cut their
 * tensors), so the sum of squares is bitwise identical for any thread count: float32 lanes
 * over short blocks, each block added into a float64 partial per chunk, chunk partials summed
 * in index order by the caller.
 */
#ifndef OC_PROBE_H
#define OC_PROBE_H

#include "oc_common.h"

#define OC_PROBE_LANES 16
#define OC_PROBE_BLOCK 1024  /* elements summed in float32 lanes before folding into float64 */

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

#endif /* OC_PROBE_H */
