/* Kernels of the quasi-Newton methods (optcore.quasinewton).
 *
 * Vector kernels walk an oc_list of float32 tensors in the fixed chunks of oc_common.h. Every
 * element is computed in float64 from the float32 inputs and rounded once to float32; dot
 * products of float32 vectors are exact products summed in float64 over OC_QN_LANES lanes
 * with a fixed lane assignment, one partial per chunk, and the chunk partials are combined in
 * chunk order. Results are therefore bitwise independent of the thread count and of the
 * instruction set.
 *
 * The dense kernel works on the lower triangle of a symmetric float64 matrix stored packed by
 * rows (row i holds H[i][0..i] at offset i(i+1)/2). Rows are cut into blocks fixed by n alone;
 * a block is processed by one thread and keeps its column contributions in its own scratch
 * vector, and these are added in block order: the results do not depend on the thread count
 * either.
 */
#ifndef OC_QN_H
#define OC_QN_H

#include "oc_common.h"

#define OC_QN_LANES 16

static inline double oc_qn_fold(const double *acc) {
    double s = 0.0;
    for (int j = 0; j < OC_QN_LANES; j++) s += acc[j];
    return s;
}

/* sum of (double)a[i] * (double)b[i] over n elements, lanes in fixed order */
static inline __attribute__((always_inline)) double
oc_qn_dot_f32(const float *a, const float *b, int64_t n) {
    double acc[OC_QN_LANES] = {0};
    int64_t i = 0;
    for (; i + OC_QN_LANES <= n; i += OC_QN_LANES)
        for (int j = 0; j < OC_QN_LANES; j++) acc[j] += (double)a[i + j] * (double)b[i + j];
    for (int j = 0; i + j < n; j++) acc[j] += (double)a[i + j] * (double)b[i + j];
    return oc_qn_fold(acc);
}

/* The same for float64 vectors. */
static inline __attribute__((always_inline)) double
oc_qn_dot_f64(const double *a, const double *b, int64_t n) {
    double acc[OC_QN_LANES] = {0};
    int64_t i = 0;
    for (; i + OC_QN_LANES <= n; i += OC_QN_LANES)
        for (int j = 0; j < OC_QN_LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i + j < n; j++) acc[j] += a[i + j] * b[i + j];
    return oc_qn_fold(acc);
}

/* Sum of the per-chunk partials in chunk order. */
static inline double oc_qn_combine(const double *cpart, int64_t nchunks) {
    double s = 0.0;
    for (int64_t c = 0; c < nchunks; c++) s += cpart[c];
    return s;
}

/* ---- dot: a . b ------------------------------------------------------------------------ */

OC_CLONES static double oc_qn_dot_run(const oc_list *L, int a, int b, double *cpart,
                                      const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, cpart[c] = oc_qn_dot_f32(oc_slot(L, a, c), oc_slot(L, b, c),
                                                          oc_chunk_len(L, c)));
    return oc_qn_combine(cpart, L->nchunks);
}

/* ---- axpby + dot: x = alpha x + beta z (alpha == 0: x = beta z), then e . x -------------- */

static inline __attribute__((always_inline)) double
oc_qn_axpby_chunk(const oc_list *L, int xs, double alpha, int zs, double beta, int es, int64_t c) {
    float *x = oc_slot(L, xs, c);
    const float *z = zs >= 0 ? oc_slot(L, zs, c) : NULL;
    const float *e = es >= 0 ? oc_slot(L, es, c) : NULL;
    const int64_t n = oc_chunk_len(L, c);
    if (z == NULL)
        for (int64_t i = 0; i < n; i++) x[i] = (float)(alpha * (double)x[i]);
    else if (alpha == 0.0)
        for (int64_t i = 0; i < n; i++) x[i] = (float)(beta * (double)z[i]);
    else if (alpha == 1.0)
        for (int64_t i = 0; i < n; i++) x[i] = (float)((double)x[i] + beta * (double)z[i]);
    else
        for (int64_t i = 0; i < n; i++) x[i] = (float)(alpha * (double)x[i] + beta * (double)z[i]);
    return e != NULL ? oc_qn_dot_f32(e, x, n) : 0.0;
}

OC_CLONES static double oc_qn_axpby_run(const oc_list *L, int xs, double alpha, int zs, double beta,
                                        int es, double *cpart, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, cpart[c] = oc_qn_axpby_chunk(L, xs, alpha, zs, beta, es, c));
    return oc_qn_combine(cpart, L->nchunks);
}

/* ---- trial point: x = x0 + t d ----------------------------------------------------------- */

static inline __attribute__((always_inline)) void
oc_qn_point_chunk(const oc_list *L, int xs, int x0s, int ds, double t, int64_t c) {
    float *x = oc_slot(L, xs, c);
    const float *x0 = oc_slot(L, x0s, c);
    const float *d = oc_slot(L, ds, c);
    const int64_t n = oc_chunk_len(L, c);
    for (int64_t i = 0; i < n; i++) x[i] = (float)((double)x0[i] + t * (double)d[i]);
}

OC_CLONES static void oc_qn_point_run(const oc_list *L, int xs, int x0s, int ds, double t,
                                      const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_qn_point_chunk(L, xs, x0s, ds, t, c));
}

/* ---- curvature pair (slots 0..5 = x, g, x0, g0, s, y):
 *      s = x - x0, y = g - g0 (float32), x0 = x, g0 = g; per chunk: s.y, y.y, g.g, max|g| ---- */

static inline __attribute__((always_inline)) void
oc_qn_pair_chunk(const oc_list *L, double *part, float *cmax, int64_t c) {
    const float *x = oc_slot(L, 0, c);
    const float *g = oc_slot(L, 1, c);
    float *x0 = oc_slot(L, 2, c);
    float *g0 = oc_slot(L, 3, c);
    float *s = oc_slot(L, 4, c);
    float *y = oc_slot(L, 5, c);
    const int64_t n = oc_chunk_len(L, c);
    double sy[OC_QN_LANES] = {0}, yy[OC_QN_LANES] = {0}, gg[OC_QN_LANES] = {0};
    float mx[OC_QN_LANES] = {0};
    for (int64_t b = 0; b < n; b += OC_QN_LANES) {
        const int m = n - b < OC_QN_LANES ? (int)(n - b) : OC_QN_LANES;
        for (int j = 0; j < m; j++) {
            const int64_t i = b + j;
            const float si = x[i] - x0[i], yi = g[i] - g0[i], gi = g[i];
            const float a = fabsf(gi);
            s[i] = si;
            y[i] = yi;
            x0[i] = x[i];
            g0[i] = gi;
            sy[j] += (double)si * (double)yi;
            yy[j] += (double)yi * (double)yi;
            gg[j] += (double)gi * (double)gi;
            mx[j] = a > mx[j] ? a : mx[j];
        }
    }
    float m = 0.0f;
    for (int j = 0; j < OC_QN_LANES; j++) m = mx[j] > m ? mx[j] : m;
    part[3 * c] = oc_qn_fold(sy);
    part[3 * c + 1] = oc_qn_fold(yy);
    part[3 * c + 2] = oc_qn_fold(gg);
    cmax[c] = m;
}

/* out[0..4) = s.y, y.y, g.g, max|g| (NaN when g.g is NaN) */
OC_CLONES static void oc_qn_pair_run(const oc_list *L, double *part, float *cmax, double *out,
                                     const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_qn_pair_chunk(L, part, cmax, c));
    out[0] = out[1] = out[2] = out[3] = 0.0;
    for (int64_t c = 0; c < L->nchunks; c++) {
        out[0] += part[3 * c];
        out[1] += part[3 * c + 1];
        out[2] += part[3 * c + 2];
        out[3] = (double)cmax[c] > out[3] ? (double)cmax[c] : out[3];
    }
    if (out[2] != out[2]) out[3] = NAN;
}

/* ---- float32 table <-> flat float64 vector (tensor t starts at off[t] in the vector) ----- */

static inline __attribute__((always_inline)) void
oc_qn_gather_chunk(const oc_list *L, int s, const int64_t *off, double *out, int64_t c) {
    const float *x = oc_slot(L, s, c);
    double *o = out + off[L->chunk_tensor[c]] + L->chunk_start[c];
    const int64_t n = oc_chunk_len(L, c);
    for (int64_t i = 0; i < n; i++) o[i] = (double)x[i];
}

OC_CLONES static void oc_qn_gather_run(const oc_list *L, int s, const int64_t *off, double *out,
                                       const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_qn_gather_chunk(L, s, off, out, c));
}

static inline __attribute__((always_inline)) void
oc_qn_scatter_chunk(const oc_list *L, int s, const int64_t *off, const double *in, double scale,
                    int64_t c) {
    float *x = oc_slot(L, s, c);
    const double *v = in + off[L->chunk_tensor[c]] + L->chunk_start[c];
    const int64_t n = oc_chunk_len(L, c);
    for (int64_t i = 0; i < n; i++) x[i] = (float)(scale * v[i]);
}

OC_CLONES static void oc_qn_scatter_run(const oc_list *L, int s, const int64_t *off,
                                        const double *in, double scale, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_qn_scatter_chunk(L, s, off, in, scale, c));
}

/* ---- dense BFGS pass over the packed lower triangle P of a symmetric n x n matrix ---------
 * With u != NULL first the symmetric rank-two update  P += u v^T + v u^T, then with g != NULL
 * the product w = P g. Block b covers rows [bstart[b], bstart[b+1]); its column contributions
 * go to scratch + b * n. One sweep over the triangle (read and write). */

static inline __attribute__((always_inline)) void
oc_bfgs_row(double *p, int64_t i, const double *u, const double *v, const double *g,
            double *w, double *col) {
    if (u != NULL) {
        const double ui = u[i], vi = v[i];
        for (int64_t j = 0; j <= i; j++) p[j] = p[j] + ui * v[j] + vi * u[j];
    }
    if (g != NULL) {
        const double gi = g[i];
        w[i] = oc_qn_dot_f64(p, g, i) + p[i] * gi;
        for (int64_t j = 0; j < i; j++) col[j] += p[j] * gi;
    }
}

static inline __attribute__((always_inline)) void
oc_bfgs_block(double *P, const int64_t *bstart, int64_t n, const double *u, const double *v,
              const double *g, double *w, double *scratch, int64_t b) {
    const int64_t r0 = bstart[b], r1 = bstart[b + 1];
    double *col = scratch + b * n;
    if (g != NULL)
        for (int64_t j = 0; j < r1; j++) col[j] = 0.0;
    for (int64_t i = r0; i < r1; i++) oc_bfgs_row(P + i * (i + 1) / 2, i, u, v, g, w, col);
}

OC_CLONES static void oc_bfgs_pass(double *P, int64_t n, const int64_t *bstart, int64_t nblocks,
                                   const double *u, const double *v, const double *g, double *w,
                                   double *scratch, const oc_exec *ex) {
    const int64_t tri = n * (n + 1) / 2;
    const int nt = (OC_HAVE_OPENMP && ex->nthreads > 1 && tri >= OC_SERIAL_BELOW) ? ex->nthreads : 1;
    OC_PARALLEL_FOR(nt, ex, b, nblocks, oc_bfgs_block(P, bstart, n, u, v, g, w, scratch, b));
    if (g == NULL) return;
    /* w[j] += the column contributions of the blocks below row j, in block order */
    for (int64_t b = 0; b < nblocks; b++) {
        const double *col = scratch + b * n;
        const int64_t r1 = bstart[b + 1] < n ? bstart[b + 1] : n;
        for (int64_t j = 0; j < r1; j++) w[j] += col[j];
    }
}

#endif /* OC_QN_H */
