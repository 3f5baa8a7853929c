/* Batch normalization kernels over contiguous float32 tensors (Ioffe & Szegedy 2015).
 *
 * Two memory layouts, described by oc_bn_shape:
 *   - rows (planar = 0): a (rows, C) matrix, channels contiguous. This is both the (N, C) input
 *     of a dense layer and a channels-last NHWC tensor seen as (N*H*W, C).
 *   - planar (planar = 1): an NCHW tensor, N*C planes of S = H*W contiguous elements.
 *
 * Reductions (per-channel sums) run over fixed work items that do not depend on the thread
 * count, each writing its own float64 partials; partials are combined per channel in item order,
 * so results are bitwise identical for 1 and N threads.
 *   - rows: rows are grouped in tiles of kr = max(1, OC_BN_TILE / C) rows, each swept as one
 *     flat run of kr*C elements against per-channel vectors replicated kr times (long,
 *     branch-free inner loops even for small C). An item is a fixed number of tiles (about
 *     OC_BN_ITEM elements); inside it, blocks of a few tiles accumulate down the tiles in
 *     float32 registers, 16 tile positions at a time, folding into a float64 scratch tile that
 *     ends in the item's per-channel partials.
 *   - planar: an item is a run of consecutive planes in memory order (about OC_CHUNK elements;
 *     a plane larger than OC_CHUNK is cut into segments of OC_CHUNK, one per item), so memory is
 *     streamed even when planes are small (14x14). Inside a plane, 16 float32 lanes accumulate
 *     blocks of OC_BN_BLOCK elements and fold into 16 float64 lanes, summed in a fixed pairwise
 *     order at the end of the plane into the item's partial for that plane's channel.
 * Every float32 partial therefore sums at most 16 terms before it reaches float64.
 *
 * Centering: kernels see a float shift hi per channel and work on d = x - hi, exact for x within
 * a factor 2 of hi (Sterbenz). With hi the float nearest the float64 mean, the caller folds the
 * remainder mean - hi into per-channel float64 constants, so x - mean keeps its accuracy when
 * |mean| >> std.
 *
 * Element-wise sweeps run in parallel over row tiles (rows layout) or plane segments (planar).
 *
 * Fused ReLU: the forward sweep can write max(y, 0) (the comparison y > 0 keeps 0 for a NaN), and
 * the backward sums and dx sweep can take a mask m (the forward output): dy counts as 0 where
 * m is not > 0, so the gradient of ReLU(BN(x)) costs the same two sweeps as that of BN(x).
 * Every parallel driver is compiled for AVX-512, AVX2 and baseline x86-64 (OC_CLONES).
 */
#ifndef OC_BATCHNORM_H
#define OC_BATCHNORM_H

#include <stdlib.h>
#include <string.h>
#include "oc_common.h"

#define OC_BN_LANES 16
#define OC_BN_BLOCK 256     /* elements a float32 lane block holds before folding (16 per lane) */
#define OC_BN_RB 16         /* rows layout: tiles per work item are a multiple of this */
#define OC_BN_STREAMS 8     /* rows layout: tiles (input streams) read side by side */
#define OC_BN_TILE 1024     /* elements per row tile (at least one row) in the rows layout */
#define OC_BN_ITEM 65536    /* elements per reduction work item in the rows layout */
#define OC_BN_SHIFT_RATIO 4.0  /* redo the statistics when |mean - shift| > 4 std */
#define OC_AI static inline __attribute__((always_inline))

typedef struct {
    int64_t rows;   /* rows layout: number of rows; planar: N */
    int64_t C;      /* channels */
    int64_t S;      /* planar: elements per plane (H*W); rows layout: 1 */
    int planar;
} oc_bn_shape;

static inline int64_t oc_bn_total(const oc_bn_shape *sh) { return sh->rows * sh->C * sh->S; }


/* ---- per-element math ------------------------------------------------------------------ */

/* The two sums of a reduction, with d = x - hi: mode 0 (statistics) d and d*d; mode 1
 * (backward) dy and dy*d. */
OC_AI void oc_bn_terms(int mode, float x, float dy, float hi, float *v1, float *v2) {
    float d = x - hi;
    if (mode == 0) { *v1 = d; *v2 = d * d; }
    else { *v1 = dy; *v2 = dy * d; }
}

/* dy where the mask m (the forward output of BN + ReLU) is > 0, else 0; dy itself without a mask. */
OC_AI float oc_bn_gate(const float *m, int64_t i, float dy) {
    return m == NULL || m[i] > 0.0f ? dy : 0.0f;
}

/* ---- reductions ------------------------------------------------------------------------ */

/* 16 float32 lanes as one GCC vector: the target_clones variants lower it to their registers
 * (one zmm, two ymm, four xmm), so the lanes stay in registers across a block. Each block folds
 * into 16 float64 lanes (two 8-double vectors), also kept in registers. */
typedef float oc_v16f __attribute__((vector_size(64)));
typedef float oc_v8f __attribute__((vector_size(32)));
typedef double oc_v8d __attribute__((vector_size(64)));
typedef int32_t oc_v16i __attribute__((vector_size(64)));

/* Vectors wider than the baseline registers travel through pointers, never by value (no ABI
 * differences between the clones); everything here is inlined anyway. */
#define OC_V16_LOAD(v, p) memcpy(&(v), (p), sizeof(oc_v16f))

/* *g kept where the 16 mask values at p are > 0, else 0 (a bitwise and with the comparison). */
OC_AI void oc_v16_gate(oc_v16f *g, const float *p) {
    oc_v16f m;
    OC_V16_LOAD(m, p);
    *g = (oc_v16f)((oc_v16i)*g & (m > (oc_v16f){0}));
}

/* Float64 lanes of the two sums: lanes 0-7 in [0], 8-15 in [1]. */
typedef struct { oc_v8d s1[2], s2[2]; } oc_bn_lanes;

OC_AI void oc_bn_fold(oc_v8d *f, const oc_v16f *l) {
    oc_v8f lo, hi;
    memcpy(&lo, l, sizeof lo);
    memcpy(&hi, (const char *)l + sizeof lo, sizeof hi);
    f[0] += __builtin_convertvector(lo, oc_v8d);
    f[1] += __builtin_convertvector(hi, oc_v8d);
}

/* The 16 lanes summed in a fixed pairwise order. */
OC_AI double oc_bn_lane_sum(const oc_v8d *f) {
    oc_v8d a = f[0] + f[1];
    double b0 = a[0] + a[4], b1 = a[1] + a[5], b2 = a[2] + a[6], b3 = a[3] + a[7];
    return (b0 + b2) + (b1 + b3);
}

/* Add the sums of one contiguous run of n elements (one channel) to the float64 lanes; in mode 1,
 * dy is gated by the mask m when m is not NULL. */
OC_AI void oc_bn_run_sums(int mode, const float *x, const float *dy, const float *m, int64_t n,
                          float hi, oc_bn_lanes *F) {
    const oc_v16f vh = hi - (oc_v16f){0};
    int64_t i = 0;
    while (i + OC_BN_LANES <= n) {
        oc_v16f l1 = {0}, l2 = {0};
        int64_t end = i + OC_BN_BLOCK;
        if (end > n) end = i + ((n - i) / OC_BN_LANES) * OC_BN_LANES;
        if (mode == 0) {
            for (; i < end; i += OC_BN_LANES) {
                oc_v16f d;
                OC_V16_LOAD(d, x + i);
                d = d - vh;
                l1 += d;
                l2 += d * d;
            }
        } else if (m == NULL) {
            for (; i < end; i += OC_BN_LANES) {
                oc_v16f d, g;
                OC_V16_LOAD(d, x + i);
                OC_V16_LOAD(g, dy + i);
                d = d - vh;
                l1 += g;
                l2 += g * d;
            }
        } else {
            for (; i < end; i += OC_BN_LANES) {
                oc_v16f d, g;
                OC_V16_LOAD(d, x + i);
                OC_V16_LOAD(g, dy + i);
                oc_v16_gate(&g, m + i);
                d = d - vh;
                l1 += g;
                l2 += g * d;
            }
        }
        oc_bn_fold(F->s1, &l1);
        oc_bn_fold(F->s2, &l2);
    }
    if (i < n) {  /* tail of < 16 elements: one float32 block padded with zeros */
        oc_v16f l1 = {0}, l2 = {0};
        for (int j = 0; i < n; i++, j++) {
            float v1, v2;
            oc_bn_terms(mode, x[i], dy == NULL ? 0.0f : oc_bn_gate(m, i, dy[i]), hi, &v1, &v2);
            l1[j] = v1;
            l2[j] = v2;
        }
        oc_bn_fold(F->s1, &l1);
        oc_bn_fold(F->s2, &l2);
    }
}

/* Rows layout: rows per tile, and per-channel vectors replicated over a tile. */
static inline int64_t oc_bn_tile_rows(int64_t C) {
    int64_t k = OC_BN_TILE / (C > 0 ? C : 1);
    return k < 1 ? 1 : k;
}

/* A malloc'ed copy of v[C] repeated kr times (NULL when v is NULL or out of memory; *fail is
 * set in the second case). */
static float *oc_bn_replicate(const float *v, int64_t C, int64_t kr, int *fail) {
    if (v == NULL) return NULL;
    float *t = (float *)malloc(sizeof(float) * (size_t)(kr * C));
    if (t == NULL) { *fail = 1; return NULL; }
    for (int64_t k = 0; k < kr; k++) memcpy(t + k * C, v, sizeof(float) * (size_t)C);
    return t;
}

/* Add the float32 lanes l to the 16 float64 values at d (any alignment). */
OC_AI void oc_bn_fold_to(double *d, const oc_v16f *l) {
    oc_v8d f[2];
    memcpy(f, d, sizeof f);
    oc_bn_fold(f, l);
    memcpy(d, f, sizeof f);
}

/* Rows layout: sums over rows [r0, r1) into p1[C], p2[C] (float64). hi is replicated over a tile
 * of kr rows (T = kr*C elements); d1, d2 are float64 scratch tiles of T elements.
 *
 * Blocks of OC_BN_STREAMS / (number of inputs) whole tiles are swept 16 tile positions at a time:
 * the float32 lanes of those positions accumulate down the block's tiles in registers (one term
 * per tile, so at most 8 terms), then fold into d1, d2. Reading 8 tiles side by side keeps 8
 * memory streams in flight, which measured faster than 4 or 16. Positions past the last multiple
 * of 16, and a last partial tile (at the end of the tensor), go through scalar code with the
 * same float32-then-float64 structure. At the end, tile position k*C + c folds into channel c in
 * order of k. */
OC_AI void oc_bn_rows_item(int mode, const oc_bn_shape *sh, const float *x, const float *dy,
                           const float *m, const float *hi, int64_t kr, int64_t r0, int64_t r1,
                           double *p1, double *p2, double *d1, double *d2) {
    const int64_t C = sh->C, T = kr * C, T16 = (T / OC_BN_LANES) * OC_BN_LANES;
    const int64_t block = (mode == 0 ? OC_BN_STREAMS : OC_BN_STREAMS / 2) * kr;  /* rows */
    for (int64_t i = 0; i < T; i++) { d1[i] = 0.0; d2[i] = 0.0; }
    for (int64_t rb = r0; rb < r1; rb += block) {
        const int64_t rbe = rb + block < r1 ? rb + block : r1;
        const int64_t nfull = (rbe - rb) / kr, rem = (rbe - rb) - nfull * kr;
        const float *xb = x + rb * C, *gb = dy == NULL ? NULL : dy + rb * C;
        const float *mb = m == NULL ? NULL : m + rb * C;
        for (int64_t i = 0; i < T16; i += OC_BN_LANES) {
            oc_v16f h, l1 = {0}, l2 = {0};
            OC_V16_LOAD(h, hi + i);
            if (mode == 0) {
                for (int64_t t = 0; t < nfull; t++) {
                    oc_v16f v;
                    OC_V16_LOAD(v, xb + t * T + i);
                    v = v - h;
                    l1 += v;
                    l2 += v * v;
                }
            } else if (mb == NULL) {
                for (int64_t t = 0; t < nfull; t++) {
                    oc_v16f v, g;
                    OC_V16_LOAD(v, xb + t * T + i);
                    OC_V16_LOAD(g, gb + t * T + i);
                    v = v - h;
                    l1 += g;
                    l2 += g * v;
                }
            } else {
                for (int64_t t = 0; t < nfull; t++) {
                    oc_v16f v, g;
                    OC_V16_LOAD(v, xb + t * T + i);
                    OC_V16_LOAD(g, gb + t * T + i);
                    oc_v16_gate(&g, mb + t * T + i);
                    v = v - h;
                    l1 += g;
                    l2 += g * v;
                }
            }
            oc_bn_fold_to(d1 + i, &l1);
            oc_bn_fold_to(d2 + i, &l2);
        }
        for (int64_t i = T16; i < T; i++) {
            float s1 = 0.0f, s2 = 0.0f;
            for (int64_t t = 0; t < nfull; t++) {
                float v1, v2;
                const int64_t at = t * T + i;
                oc_bn_terms(mode, xb[at], gb == NULL ? 0.0f : oc_bn_gate(mb, at, gb[at]), hi[i],
                            &v1, &v2);
                s1 += v1;
                s2 += v2;
            }
            d1[i] += (double)s1;
            d2[i] += (double)s2;
        }
        for (int64_t i = 0; i < rem * C; i++) {  /* the tensor's last, partial tile */
            float v1, v2;
            const int64_t at = nfull * T + i;
            oc_bn_terms(mode, xb[at], gb == NULL ? 0.0f : oc_bn_gate(mb, at, gb[at]), hi[i], &v1, &v2);
            d1[i] += (double)v1;
            d2[i] += (double)v2;
        }
    }
    for (int64_t c = 0; c < C; c++) { p1[c] = 0.0; p2[c] = 0.0; }
    for (int64_t k = 0; k < kr; k++)
        for (int64_t c = 0; c < C; c++) { p1[c] += d1[k * C + c]; p2[c] += d2[k * C + c]; }
}

/* Planar layout: a plane of S elements is cut into segments of at most OC_CHUNK elements, so that
 * a few large planes still spread over the threads. Segment s of plane p (= n * C + c) starts at
 * *off and holds *len elements. */
static inline int64_t oc_bn_segments(int64_t S) { return S > OC_CHUNK ? (S + OC_CHUNK - 1) / OC_CHUNK : 1; }

OC_AI void oc_bn_unit(const oc_bn_shape *sh, int64_t segs, int64_t p, int64_t seg, int64_t *off,
                      int64_t *len) {
    const int64_t start = segs > 1 ? seg * OC_CHUNK : 0;
    const int64_t rest = sh->S - start;
    *off = p * sh->S + start;
    *len = segs > 1 && rest > OC_CHUNK ? OC_CHUNK : rest;
}

/* s1[c], s2[c] = the sums of the items' partials (item it holds part[2*it*C + c] and
 * part[(2*it + 1)*C + c]), added in item order: the fixed order that makes the result
 * independent of the thread count. */
static inline void oc_bn_combine(const double *part, int64_t items, int64_t C, double *s1,
                                 double *s2) {
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }
    for (int64_t it = 0; it < items; it++) {
        const double *p1 = part + 2 * it * C, *p2 = p1 + C;
        for (int64_t c = 0; c < C; c++) { s1[c] += p1[c]; s2[c] += p2[c]; }
    }
}

/* Per-channel sums s1[c], s2[c] (float64) of mode 0 (d, d*d) or mode 1 (dy, dy*d), with
 * d = x - hi[c]. dy and the optional mask m (dy counts only where m > 0) are only read in
 * mode 1. Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_sums_run(int mode, const oc_bn_shape *sh, const float *x, const float *dy,
                                    const float *m, const float *hi, double *s1, double *s2,
                                    const oc_exec *ex) {
    const int64_t C = sh->C, total = oc_bn_total(sh);
    if (!sh->planar) {
        const int64_t kr = oc_bn_tile_rows(C), T = kr * C;
        int64_t R = (OC_BN_ITEM / T / OC_BN_RB) * OC_BN_RB;  /* tiles per item */
        R = (R < OC_BN_RB ? OC_BN_RB : R) * kr;              /* rows per item */
        const int64_t items = (sh->rows + R - 1) / R;
        int fail = 0;
        float *H = oc_bn_replicate(hi, C, kr, &fail);
        double *part = (double *)malloc(sizeof(double) * (size_t)(2 * items * C + 1));
        if (fail || part == NULL) {
            free(H); free(part);
            return -1;
        }
        /* The float64 scratch tiles are each item's own (a few KiB, reused from the heap):
         * allocating them for all items of a call at once cost page faults on every call. */
        OC_PARALLEL_FOR(oc_team_size(ex, total), ex, it, items, {
            int64_t r0 = it * R, r1 = r0 + R < sh->rows ? r0 + R : sh->rows;
            double *d = (double *)malloc(sizeof(double) * (size_t)(2 * T));
            if (d == NULL) __atomic_store_n(&fail, 1, __ATOMIC_RELAXED);
            else oc_bn_rows_item(mode, sh, x, dy, m, H, kr, r0, r1, part + 2 * it * C,
                                 part + (2 * it + 1) * C, d, d + T);
            free(d);
        });
        free(H);
        if (fail) {
            free(part);
            return -1;
        }
        oc_bn_combine(part, items, C, s1, s2);
        free(part);
        return 0;
    }
    const int64_t S = sh->S, segs = oc_bn_segments(S);
    int64_t nb = segs > 1 ? 1 : OC_CHUNK / (S > 0 ? S : 1);  /* units (plane segments) per item */
    if (nb < 1) nb = 1;
    const int64_t units = sh->rows * C * segs;  /* in memory order */
    const int64_t items = (units + nb - 1) / nb;
    double *part = (double *)malloc(sizeof(double) * (size_t)(2 * items * C + 1));
    if (part == NULL) return -1;
    OC_PARALLEL_FOR(oc_team_size(ex, total), ex, it, items, {
        double *p1 = part + 2 * it * C, *p2 = p1 + C;
        for (int64_t c = 0; c < C; c++) { p1[c] = 0.0; p2[c] = 0.0; }
        const int64_t u1 = (it + 1) * nb < units ? (it + 1) * nb : units;
        for (int64_t u = it * nb; u < u1; u++) {
            const int64_t p = u / segs, c = p % C;
            int64_t off, len;
            oc_bn_unit(sh, segs, p, u % segs, &off, &len);
            oc_bn_lanes F = {{{0}, {0}}, {{0}, {0}}};
            oc_bn_run_sums(mode, x + off, dy == NULL ? NULL : dy + off, m == NULL ? NULL : m + off,
                           len, hi[c], &F);
            p1[c] += oc_bn_lane_sum(F.s1);
            p2[c] += oc_bn_lane_sum(F.s2);
        }
    });
    oc_bn_combine(part, items, C, s1, s2);
    free(part);
    return 0;
}

/* Training statistics: per-channel mean and biased variance (float64, variance >= 0).
 *
 * One read pass of shifted sums: with shift K (the channel's first element) and d = x - K,
 * mean = K + sum(d)/n and var = sum(d^2)/n - (sum(d)/n)^2. The float32 partials (at most 16
 * terms) carry a relative error of about 1e-6 of sum(d^2), which the subtraction amplifies by
 * 1 + ((mean - K)/std)^2; so when a channel's shift lies more than OC_BN_SHIFT_RATIO standard
 * deviations from its mean, the sums are taken again around the float nearest the mean just
 * found (a second pass, only then), which bounds the relative error of the variance by about
 * 2e-5 in the worst case. Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_stats_run(const oc_bn_shape *sh, const float *x, double *mean, double *var,
                                     const oc_exec *ex) {
    const int64_t C = sh->C;
    const double n = (double)(sh->rows * sh->S);
    float *hi = (float *)malloc(sizeof(float) * (size_t)(C + 1));
    double *s = (double *)malloc(sizeof(double) * (size_t)(2 * C + 1));
    if (hi == NULL || s == NULL) { free(hi); free(s); return -1; }
    for (int64_t c = 0; c < C; c++) hi[c] = sh->planar ? x[c * sh->S] : x[c];
    for (int pass = 0; pass < 2; pass++) {
        if (oc_bn_sums_run(0, sh, x, NULL, NULL, hi, s, s + C, ex) != 0) { free(hi); free(s); return -1; }
        int again = 0;
        for (int64_t c = 0; c < C; c++) {
            double m1 = s[c] / n, v = s[C + c] / n - m1 * m1;
            v = v < 0.0 ? 0.0 : v;  /* NaN passes */
            mean[c] = (double)hi[c] + m1;
            var[c] = v;
            if (m1 * m1 > OC_BN_SHIFT_RATIO * OC_BN_SHIFT_RATIO * v) again = 1;
        }
        if (!again) break;
        for (int64_t c = 0; c < C; c++) hi[c] = (float)mean[c];
    }
    free(hi);
    free(s);
    return 0;
}

/* ---- element-wise sweeps --------------------------------------------------------------- */

/* The output of an element-wise sweep: v, clamped at 0 when relu, and 0 where the mask m (when
 * given) is not > 0. Called with constant relu and m (NULL or not) from the dispatchers below, so
 * each inner loop is compiled branch-free for its case. */
OC_AI float oc_bn_act(float v, int relu, const float *m, int64_t i) {
    if (relu) v = v > 0.0f ? v : 0.0f;
    if (m != NULL) v = m[i] > 0.0f ? v : 0.0f;
    return v;
}

/* A run of n elements: y = act((x - h) * a + b), with h, a, b per element (rows layout tiles,
 * hs = 1) or one value each (planar, hs = 0: held in registers, as y may alias nothing the
 * compiler can prove). */
OC_AI void oc_bn_apply_k(const float *x, const float *h, const float *a, const float *b,
                         int hs, const float *m, int relu, float *y, int64_t n) {
    const float h0 = h[0], a0 = a[0], b0 = b[0];
    for (int64_t i = 0; i < n; i++)
        y[i] = oc_bn_act((x[i] - (hs ? h[i] : h0)) * (hs ? a[i] : a0) + (hs ? b[i] : b0), relu,
                         m, i);
}

OC_AI void oc_bn_apply_seg(const float *x, const float *h, const float *a, const float *b,
                           int hs, const float *m, int relu, float *y, int64_t n) {
    if (m != NULL) oc_bn_apply_k(x, h, a, b, hs, m, 0, y, n);
    else if (relu) oc_bn_apply_k(x, h, a, b, hs, NULL, 1, y, n);
    else oc_bn_apply_k(x, h, a, b, hs, NULL, 0, y, n);
}

/* A run of n elements: dx = (gate(dy) * k1 - (x - h) * k2) - k3, per element (hs = 1) or one
 * value each (hs = 0); gate(dy) is 0 where the mask m (when given) is not > 0. */
OC_AI void oc_bn_dx_k(const float *dy, const float *x, const float *h, const float *k1,
                      const float *k2, const float *k3, int hs, const float *m, float *dx,
                      int64_t n) {
    const float h0 = h[0], p0 = k1[0], q0 = k2[0], r0 = k3[0];
    for (int64_t i = 0; i < n; i++)
        dx[i] = (oc_bn_act(dy[i], 0, m, i) * (hs ? k1[i] : p0)
                 - (x[i] - (hs ? h[i] : h0)) * (hs ? k2[i] : q0)) - (hs ? k3[i] : r0);
}

OC_AI void oc_bn_dx_seg(const float *dy, const float *x, const float *h, const float *k1,
                        const float *k2, const float *k3, int hs, const float *m, float *dx,
                        int64_t n) {
    if (m != NULL) oc_bn_dx_k(dy, x, h, k1, k2, k3, hs, m, dx, n);
    else oc_bn_dx_k(dy, x, h, k1, k2, k3, hs, NULL, dx, n);
}

/* y = act((x - hi[c]) * a[c] + b[c]); hi = NULL stands for 0 (x - 0 is x exactly). act clamps
 * at 0 when relu, and gives 0 where the mask m (when not NULL) is not > 0.
 * Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_apply_run(const oc_bn_shape *sh, const float *x, const float *hi,
                                     const float *a, const float *b, const float *m, int relu,
                                     float *y, const oc_exec *ex) {
    const int64_t C = sh->C, S = sh->S, total = oc_bn_total(sh);
    float *zero = (float *)calloc((size_t)(C + 1), sizeof(float));
    if (zero == NULL) return -1;
    if (hi == NULL) hi = zero;
    if (!sh->planar) {
        const int64_t kr = oc_bn_tile_rows(C), ntiles = (sh->rows + kr - 1) / kr;
        int fail = 0;
        float *A = oc_bn_replicate(a, C, kr, &fail), *B = oc_bn_replicate(b, C, kr, &fail);
        float *H = oc_bn_replicate(hi, C, kr, &fail);
        if (!fail) {
            OC_PARALLEL_FOR(oc_team_size(ex, total), ex, t, ntiles, {
                const int64_t r0 = t * kr, n = (r0 + kr < sh->rows ? kr : sh->rows - r0) * C;
                oc_bn_apply_seg(x + r0 * C, H, A, B, 1, m == NULL ? NULL : m + r0 * C, relu,
                                y + r0 * C, n);
            });
        }
        free(A); free(B); free(H); free(zero);
        return fail ? -1 : 0;
    }
    const int64_t segs = oc_bn_segments(S);
    OC_PARALLEL_FOR(oc_team_size(ex, total), ex, u, sh->rows * C * segs, {
        const int64_t p = u / segs, c = p % C;
        int64_t off, len;
        oc_bn_unit(sh, segs, p, u % segs, &off, &len);
        oc_bn_apply_seg(x + off, hi + c, a + c, b + c, 0, m == NULL ? NULL : m + off, relu,
                        y + off, len);
    });
    free(zero);
    return 0;
}

/* Training backward, second pass: dx = dy * k1[c] - (x - hi[c]) * k2[c] - k3[c], with dy taken
 * as 0 where the mask m (when not NULL) is not > 0. Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_dx_run(const oc_bn_shape *sh, const float *dy, const float *x,
                                  const float *m, const float *hi, const float *k1,
                                  const float *k2, const float *k3, float *dx, const oc_exec *ex) {
    const int64_t C = sh->C, S = sh->S, total = oc_bn_total(sh);
    if (!sh->planar) {
        const int64_t kr = oc_bn_tile_rows(C), ntiles = (sh->rows + kr - 1) / kr;
        int fail = 0;
        float *H = oc_bn_replicate(hi, C, kr, &fail);
        float *K1 = oc_bn_replicate(k1, C, kr, &fail), *K2 = oc_bn_replicate(k2, C, kr, &fail);
        float *K3 = oc_bn_replicate(k3, C, kr, &fail);
        if (!fail) {
            OC_PARALLEL_FOR(oc_team_size(ex, total), ex, t, ntiles, {
                const int64_t r0 = t * kr, n = (r0 + kr < sh->rows ? kr : sh->rows - r0) * C;
                oc_bn_dx_seg(dy + r0 * C, x + r0 * C, H, K1, K2, K3, 1,
                             m == NULL ? NULL : m + r0 * C, dx + r0 * C, n);
            });
        }
        free(H); free(K1); free(K2); free(K3);
        return fail ? -1 : 0;
    }
    const int64_t segs = oc_bn_segments(S);
    OC_PARALLEL_FOR(oc_team_size(ex, total), ex, u, sh->rows * C * segs, {
        const int64_t p = u / segs, c = p % C;
        int64_t off, len;
        oc_bn_unit(sh, segs, p, u % segs, &off, &len);
        oc_bn_dx_seg(dy + off, x + off, hi + c, k1 + c, k2 + c, k3 + c, 0,
                     m == NULL ? NULL : m + off, dx + off, len);
    });
    return 0;
}

#endif /* OC_BATCHNORM_H */
