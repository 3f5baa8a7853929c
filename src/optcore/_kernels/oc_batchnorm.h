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
 *   - rows: an item is a block of OC_BN_ITEM / C rows (at least OC_BN_RB); inside it, blocks of
 *     OC_BN_RB rows accumulate per channel in float32 (channel tiles of OC_BN_CT on the stack),
 *     then fold into the item's float64 partials.
 *   - planar: an item is one channel over a block of planes (about OC_CHUNK elements); inside
 *     it, 16 float32 lanes accumulate blocks of OC_BN_BLOCK elements, then fold into 16 float64
 *     lanes, summed in lane order at the end of the item.
 * Every float32 partial therefore sums at most 16 terms before it reaches float64.
 *
 * Centering: a value is centered as d = (x - hi) - lo with hi + lo a float64 shift split into two
 * floats, so that x - mean keeps its accuracy when |mean| >> std (x - hi is exact near hi).
 *
 * Element-wise sweeps run in parallel over rows (rows layout) or planes (planar layout).
 * Every parallel driver is compiled for AVX-512, AVX2 and baseline x86-64 (OC_CLONES).
 */
#ifndef OC_BATCHNORM_H
#define OC_BATCHNORM_H

#include <stdlib.h>
#include "oc_common.h"

#define OC_BN_LANES 16
#define OC_BN_BLOCK 256     /* elements a float32 lane block holds before folding (16 per lane) */
#define OC_BN_RB 16         /* rows per float32 block in the rows layout */
#define OC_BN_CT 256        /* channels per stack tile in the rows layout */
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

/* Run the body (the variadic part) for i in [0, n), statically split over the team when the call is large enough. */
#define OC_BN_FOR(ex, total, i, n, ...)                                           \
    do {                                                                          \
        int oc_nt_ = oc_team_size((ex), (total));                                 \
        if (oc_nt_ > 1) {                                                         \
            _Pragma("omp parallel num_threads(oc_nt_)")                           \
            {                                                                     \
                unsigned int oc_csr_ = oc_ftz_enter((ex)->ftz);                   \
                _Pragma("omp for schedule(static)")                               \
                for (int64_t i = 0; i < (n); i++) { __VA_ARGS__; }                \
                oc_ftz_leave(oc_csr_);                                            \
            }                                                                     \
        } else {                                                                  \
            unsigned int oc_csr_ = oc_ftz_enter((ex)->ftz);                       \
            for (int64_t i = 0; i < (n); i++) { __VA_ARGS__; }                    \
            oc_ftz_leave(oc_csr_);                                                \
        }                                                                         \
    } while (0)

/* ---- per-element math ------------------------------------------------------------------ */

OC_AI float oc_bn_center(float x, float hi, float lo) { return (x - hi) - lo; }

/* The two sums of a reduction: mode 0 (statistics) d and d*d; mode 1 (backward) dy and dy*d. */
OC_AI void oc_bn_terms(int mode, float x, float dy, float hi, float lo, float *v1, float *v2) {
    float d = oc_bn_center(x, hi, lo);
    if (mode == 0) { *v1 = d; *v2 = d * d; }
    else { *v1 = dy; *v2 = dy * d; }
}

/* ---- reductions ------------------------------------------------------------------------ */

/* Add the sums of one contiguous run of n elements (one channel) to 16 float64 lanes. */
OC_AI void oc_bn_run_sums(int mode, const float *x, const float *dy, int64_t n, float hi, float lo,
                          double *f1, double *f2) {
    int64_t i = 0;
    while (i + OC_BN_LANES <= n) {
        float l1[OC_BN_LANES], l2[OC_BN_LANES];
        for (int j = 0; j < OC_BN_LANES; j++) { l1[j] = 0.0f; l2[j] = 0.0f; }
        int64_t end = i + OC_BN_BLOCK;
        if (end > n) end = i + ((n - i) / OC_BN_LANES) * OC_BN_LANES;
        if (mode == 0) {
            for (; i < end; i += OC_BN_LANES)
                for (int j = 0; j < OC_BN_LANES; j++) {
                    float d = oc_bn_center(x[i + j], hi, lo);
                    l1[j] += d;
                    l2[j] += d * d;
                }
        } else {
            for (; i < end; i += OC_BN_LANES)
                for (int j = 0; j < OC_BN_LANES; j++) {
                    float d = oc_bn_center(x[i + j], hi, lo);
                    l1[j] += dy[i + j];
                    l2[j] += dy[i + j] * d;
                }
        }
        for (int j = 0; j < OC_BN_LANES; j++) { f1[j] += (double)l1[j]; f2[j] += (double)l2[j]; }
    }
    for (int j = 0; i < n; i++, j++) {
        float v1, v2;
        oc_bn_terms(mode, x[i], dy == NULL ? 0.0f : dy[i], hi, lo, &v1, &v2);
        f1[j] += (double)v1;
        f2[j] += (double)v2;
    }
}

/* Rows layout: sums over rows [r0, r1) into p1[C], p2[C] (float64, zeroed here). */
OC_AI void oc_bn_rows_item(int mode, const oc_bn_shape *sh, const float *x, const float *dy,
                           const float *hi, const float *lo, int64_t r0, int64_t r1,
                           double *p1, double *p2) {
    const int64_t C = sh->C;
    for (int64_t c = 0; c < C; c++) { p1[c] = 0.0; p2[c] = 0.0; }
    for (int64_t rb = r0; rb < r1; rb += OC_BN_RB) {
        int64_t rbe = rb + OC_BN_RB < r1 ? rb + OC_BN_RB : r1;
        for (int64_t ct = 0; ct < C; ct += OC_BN_CT) {
            int64_t w = C - ct < OC_BN_CT ? C - ct : OC_BN_CT;
            float a1[OC_BN_CT], a2[OC_BN_CT];
            for (int64_t j = 0; j < w; j++) { a1[j] = 0.0f; a2[j] = 0.0f; }
            const float *h = hi + ct, *l = lo + ct;
            if (mode == 0) {
                for (int64_t r = rb; r < rbe; r++) {
                    const float *xr = x + r * C + ct;
                    for (int64_t j = 0; j < w; j++) {
                        float d = oc_bn_center(xr[j], h[j], l[j]);
                        a1[j] += d;
                        a2[j] += d * d;
                    }
                }
            } else {
                for (int64_t r = rb; r < rbe; r++) {
                    const float *xr = x + r * C + ct, *gr = dy + r * C + ct;
                    for (int64_t j = 0; j < w; j++) {
                        float d = oc_bn_center(xr[j], h[j], l[j]);
                        a1[j] += gr[j];
                        a2[j] += gr[j] * d;
                    }
                }
            }
            for (int64_t j = 0; j < w; j++) { p1[ct + j] += (double)a1[j]; p2[ct + j] += (double)a2[j]; }
        }
    }
}

/* Per-channel sums s1[c], s2[c] (float64) of mode 0 (d, d*d) or mode 1 (dy, dy*d), with
 * d = (x - hi[c]) - lo[c]. dy is only read in mode 1. Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_sums_run(int mode, const oc_bn_shape *sh, const float *x, const float *dy,
                                    const float *hi, const float *lo, double *s1, double *s2,
                                    const oc_exec *ex) {
    const int64_t C = sh->C, total = oc_bn_total(sh);
    if (!sh->planar) {
        int64_t R = OC_BN_ITEM / (C > 0 ? C : 1);
        R = R < OC_BN_RB ? OC_BN_RB : (R / OC_BN_RB) * OC_BN_RB;
        const int64_t items = (sh->rows + R - 1) / R;
        double *part = (double *)malloc(sizeof(double) * (size_t)(2 * items * C + 1));
        if (part == NULL) return -1;
        OC_BN_FOR(ex, total, it, items, {
            int64_t r0 = it * R, r1 = r0 + R < sh->rows ? r0 + R : sh->rows;
            oc_bn_rows_item(mode, sh, x, dy, hi, lo, r0, r1, part + 2 * it * C, part + (2 * it + 1) * C);
        });
        for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }
        for (int64_t it = 0; it < items; it++) {
            const double *p1 = part + 2 * it * C, *p2 = p1 + C;
            for (int64_t c = 0; c < C; c++) { s1[c] += p1[c]; s2[c] += p2[c]; }
        }
        free(part);
        return 0;
    }
    const int64_t S = sh->S, N = sh->rows;
    int64_t nb = OC_CHUNK / (S > 0 ? S : 1);
    if (nb < 1) nb = 1;
    const int64_t per_c = (N + nb - 1) / nb;
    const int64_t items = per_c * C;
    double *part = (double *)malloc(sizeof(double) * (size_t)(2 * items + 1));
    if (part == NULL) return -1;
    OC_BN_FOR(ex, total, it, items, {
        const int64_t c = it / per_c, k = it % per_c;
        const int64_t n0 = k * nb, n1 = n0 + nb < N ? n0 + nb : N;
        double f1[OC_BN_LANES], f2[OC_BN_LANES];
        for (int j = 0; j < OC_BN_LANES; j++) { f1[j] = 0.0; f2[j] = 0.0; }
        for (int64_t n = n0; n < n1; n++) {
            const int64_t off = (n * C + c) * S;
            oc_bn_run_sums(mode, x + off, dy == NULL ? NULL : dy + off, S, hi[c], lo[c], f1, f2);
        }
        double t1 = 0.0, t2 = 0.0;
        for (int j = 0; j < OC_BN_LANES; j++) { t1 += f1[j]; t2 += f2[j]; }
        part[2 * it] = t1;
        part[2 * it + 1] = t2;
    });
    for (int64_t c = 0; c < C; c++) {
        double t1 = 0.0, t2 = 0.0;
        for (int64_t k = 0; k < per_c; k++) { t1 += part[2 * (c * per_c + k)]; t2 += part[2 * (c * per_c + k) + 1]; }
        s1[c] = t1;
        s2[c] = t2;
    }
    free(part);
    return 0;
}

/* Split a float64 value into hi + lo floats (hi the nearest float, lo the rest rounded). */
static inline void oc_bn_split(double v, float *hi, float *lo) {
    float h = (float)v;
    *hi = h;
    *lo = (float)(v - (double)h);
}

/* Training statistics: per-channel mean and biased variance (float64, variance >= 0).
 *
 * One read pass of shifted sums: with shift K (the channel's first element) and d = x - K,
 * mean = K + sum(d)/n and var = sum(d^2)/n - (sum(d)/n)^2. The float32 partials (at most 16
 * terms) carry a relative error of about 1e-6 of sum(d^2), which the subtraction amplifies by
 * 1 + ((mean - K)/std)^2; so when a channel's shift lies more than OC_BN_SHIFT_RATIO standard
 * deviations from its mean, the sums are taken again around the mean just found (a second pass,
 * only then), which bounds the relative error of the variance by about 2e-5 in the worst case.
 * Returns 0, or -1 when out of memory. */
OC_CLONES static int oc_bn_stats_run(const oc_bn_shape *sh, const float *x, double *mean, double *var,
                                     const oc_exec *ex) {
    const int64_t C = sh->C;
    const double n = (double)(sh->rows * sh->S);
    float *shift = (float *)malloc(sizeof(float) * (size_t)(2 * C + 1));
    double *s = (double *)malloc(sizeof(double) * (size_t)(2 * C + 1));
    if (shift == NULL || s == NULL) { free(shift); free(s); return -1; }
    float *hi = shift, *lo = shift + C;
    for (int64_t c = 0; c < C; c++) {
        hi[c] = sh->planar ? x[c * sh->S] : x[c];
        lo[c] = 0.0f;
    }
    for (int pass = 0; pass < 2; pass++) {
        if (oc_bn_sums_run(0, sh, x, NULL, hi, lo, s, s + C, ex) != 0) { free(shift); free(s); return -1; }
        int again = 0;
        for (int64_t c = 0; c < C; c++) {
            double m1 = s[c] / n, v = s[C + c] / n - m1 * m1;
            v = v < 0.0 ? 0.0 : v;  /* NaN passes */
            mean[c] = ((double)hi[c] + (double)lo[c]) + m1;
            var[c] = v;
            if (m1 * m1 > OC_BN_SHIFT_RATIO * OC_BN_SHIFT_RATIO * v) again = 1;
        }
        if (!again) break;
        for (int64_t c = 0; c < C; c++) oc_bn_split(mean[c], &hi[c], &lo[c]);
    }
    free(shift);
    free(s);
    return 0;
}

/* ---- element-wise sweeps --------------------------------------------------------------- */

/* y = ((x - hi[c]) - lo[c]) * a[c] + b[c]; with hi = lo = NULL, y = x * a[c] + b[c]. */
OC_CLONES static void oc_bn_apply_run(const oc_bn_shape *sh, const float *x, const float *hi,
                                      const float *lo, const float *a, const float *b, float *y,
                                      const oc_exec *ex) {
    const int64_t C = sh->C, S = sh->S, total = oc_bn_total(sh);
    if (!sh->planar) {
        if (hi == NULL) {
            OC_BN_FOR(ex, total, r, sh->rows, {
                const float *xr = x + r * C;
                float *yr = y + r * C;
                for (int64_t j = 0; j < C; j++) yr[j] = xr[j] * a[j] + b[j];
            });
        } else {
            OC_BN_FOR(ex, total, r, sh->rows, {
                const float *xr = x + r * C;
                float *yr = y + r * C;
                for (int64_t j = 0; j < C; j++) yr[j] = oc_bn_center(xr[j], hi[j], lo[j]) * a[j] + b[j];
            });
        }
        return;
    }
    if (hi == NULL) {
        OC_BN_FOR(ex, total, p, sh->rows * C, {
            const int64_t c = p % C;
            const float ac = a[c], bc = b[c];
            const float *xp = x + p * S;
            float *yp = y + p * S;
            for (int64_t i = 0; i < S; i++) yp[i] = xp[i] * ac + bc;
        });
    } else {
        OC_BN_FOR(ex, total, p, sh->rows * C, {
            const int64_t c = p % C;
            const float hc = hi[c], lc = lo[c], ac = a[c], bc = b[c];
            const float *xp = x + p * S;
            float *yp = y + p * S;
            for (int64_t i = 0; i < S; i++) yp[i] = oc_bn_center(xp[i], hc, lc) * ac + bc;
        });
    }
}

/* Training backward, second pass: dx = dy * k1[c] - ((x - hi[c]) - lo[c]) * k2[c] - k3[c]. */
OC_CLONES static void oc_bn_dx_run(const oc_bn_shape *sh, const float *dy, const float *x,
                                   const float *hi, const float *lo, const float *k1,
                                   const float *k2, const float *k3, float *dx, const oc_exec *ex) {
    const int64_t C = sh->C, S = sh->S, total = oc_bn_total(sh);
    if (!sh->planar) {
        OC_BN_FOR(ex, total, r, sh->rows, {
            const float *xr = x + r * C, *gr = dy + r * C;
            float *dr = dx + r * C;
            for (int64_t j = 0; j < C; j++)
                dr[j] = (gr[j] * k1[j] - oc_bn_center(xr[j], hi[j], lo[j]) * k2[j]) - k3[j];
        });
        return;
    }
    OC_BN_FOR(ex, total, p, sh->rows * C, {
        const int64_t c = p % C;
        const float hc = hi[c], lc = lo[c], a = k1[c], b = k2[c], e = k3[c];
        const float *xp = x + p * S, *gp = dy + p * S;
        float *dp = dx + p * S;
        for (int64_t i = 0; i < S; i++) dp[i] = (gp[i] * a - oc_bn_center(xp[i], hc, lc) * b) - e;
    });
}

#endif /* OC_BATCHNORM_H */
