/* In-place parameter transforms applied outside the update rule: the exponential moving
 * average of the parameters, the exchange of two buffers, and the max-norm constraint.
 *
 * ema / swap walk an oc_list (slot 0: average, slot 1: parameter) in the fixed chunks of
 * oc_common.h; both are element-wise, so their results never depend on the thread count.
 *
 * max-norm works on one tensor seen as a matrix in one of two layouts:
 *   rows: (units, k)   each unit's incoming vector is a contiguous row (conv (out, in, kh, kw)
 *                      with the norm over axes (1, 2, 3); torch's Linear (out, in) with axis 1)
 *   cols: (k, units)   each unit's incoming vector is a column (dense (in, out) with axis 0,
 *                      Keras conv (kh, kw, in, out) with axes (0, 1, 2))
 * A unit's squared norm is always summed in the same order (float32 lanes over short blocks,
 * each block folded into float64), whichever thread computes it: bitwise identical for 1 or N
 * threads.
 */
#ifndef OC_TRANSFORMS_H
#define OC_TRANSFORMS_H

#include "oc_common.h"

#define OC_TF_LANES 16     /* float32 partial sums per block (one AVX-512 register) */
#define OC_BLOCK 1024   /* elements per float32 block before folding into float64 */

/* ---- exponential moving average: a = d * a + (1 - d) * p ------------------------------ */

static inline __attribute__((always_inline)) void
oc_ema_chunk(const oc_list *L, float d, float dc, int64_t c) {
    float *OC_RESTRICT a = oc_slot(L, 0, c);
    const float *OC_RESTRICT p = oc_slot(L, 1, c);
    const int64_t n = oc_chunk_len(L, c);
    for (int64_t i = 0; i < n; i++) a[i] = d * a[i] + dc * p[i];
}

OC_CLONES static void oc_ema_run(const oc_list *L, float d, float dc, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_ema_chunk(L, d, dc, c));
}

/* ---- exchange slots 0 and 1 element by element (no temporary buffer) ------------------- */

static inline __attribute__((always_inline)) void
oc_swap_chunk(const oc_list *L, int64_t c) {
    float *OC_RESTRICT a = oc_slot(L, 0, c);
    float *OC_RESTRICT b = oc_slot(L, 1, c);
    const int64_t n = oc_chunk_len(L, c);
    for (int64_t i = 0; i < n; i++) { float t = a[i]; a[i] = b[i]; b[i] = t; }
}

OC_CLONES static void oc_swap_run(const oc_list *L, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_swap_chunk(L, c));
}

/* ---- max-norm ------------------------------------------------------------------------- */

/* Sum of squares of x[0..n) in float64: float32 lanes over blocks of OC_BLOCK, each block
 * folded into float64 in a fixed order. A block whose float32 sum overflows (|x| above
 * ~1e19) is summed again in float64. */
static inline __attribute__((always_inline)) double oc_sumsq_f64(const float *OC_RESTRICT x, int64_t n) {
    double total = 0.0;
    for (int64_t b = 0; b < n; b += OC_BLOCK) {
        const int64_t m = n - b < OC_BLOCK ? n - b : OC_BLOCK;
        const float *xb = x + b;
        float lanes[OC_TF_LANES] = {0};
        int64_t i = 0;
        for (; i + OC_TF_LANES <= m; i += OC_TF_LANES)
            for (int j = 0; j < OC_TF_LANES; j++) lanes[j] += xb[i + j] * xb[i + j];
        float block = 0.0f;
        for (int j = 0; j < OC_TF_LANES; j++) block += lanes[j];
        double s = (double)block;
        for (; i < m; i++) s += (double)xb[i] * (double)xb[i];
        if (!isfinite(block)) {
            s = 0.0;
            for (i = 0; i < m; i++) s += (double)xb[i] * (double)xb[i];
        }
        total += s;
    }
    return total;
}

/* The factor for a unit of squared norm `sq`: max_value / (norm + 1e-7) when the norm exceeds
 * max_value (torch.renorm's formula), else exactly 1. NaN norms leave the unit unchanged. */
static inline double oc_maxnorm_factor(double sq, double max_value) {
    const double norm = sqrt(sq);
    return norm > max_value ? max_value / (norm + 1e-7) : 1.0;
}


static inline int oc_parallel_pays(const oc_exec *ex, int64_t elements, int64_t items) {
    return OC_HAVE_OPENMP && ex->nthreads > 1 && elements >= OC_SERIAL_BELOW && items > 1;
}

static inline __attribute__((always_inline)) void
oc_maxnorm_row(float *OC_RESTRICT row, int64_t k, double max_value) {
    const double f = oc_maxnorm_factor(oc_sumsq_f64(row, k), max_value);
    if (f != 1.0) {
        const float s = (float)f;
        for (int64_t i = 0; i < k; i++) row[i] = row[i] * s;
    }
}

OC_CLONES static void oc_maxnorm_rows(float *w, int64_t units, int64_t k, double max_value,
                                      const oc_exec *ex) {
    const int par = oc_parallel_pays(ex, units * k, units);
    OC_PARALLEL_FOR(par ? ex->nthreads : 1, ex, u, units, oc_maxnorm_row(w + u * k, k, max_value));
}

/* Columns are handled in blocks of OC_COLS: one thread owns a block of columns and walks all
 * k rows of it (each row segment contiguous), accumulating a float64 sum per column in row
 * order, then rescales the block. `scratch` holds `units` doubles. */
#define OC_COLS 256

static inline __attribute__((always_inline)) void
oc_maxnorm_colblock(float *w, int64_t k, int64_t units, double max_value, double *scratch,
                    int64_t blk) {
    const int64_t u0 = blk * OC_COLS;
    const int64_t nu = units - u0 < OC_COLS ? units - u0 : OC_COLS;
    double *OC_RESTRICT acc = scratch + u0;
    for (int64_t j = 0; j < nu; j++) acc[j] = 0.0;
    for (int64_t r = 0; r < k; r++) {
        const float *OC_RESTRICT x = w + r * units + u0;
        for (int64_t j = 0; j < nu; j++) acc[j] += (double)x[j] * (double)x[j];
    }
    int any = 0;
    float sc[OC_COLS];
    for (int64_t j = 0; j < nu; j++) {
        const double f = oc_maxnorm_factor(acc[j], max_value);
        sc[j] = (float)f;
        any |= f != 1.0;
    }
    if (any) {
        for (int64_t r = 0; r < k; r++) {
            float *OC_RESTRICT x = w + r * units + u0;
            for (int64_t j = 0; j < nu; j++) x[j] = x[j] * sc[j];
        }
    }
}

OC_CLONES static void oc_maxnorm_cols(float *w, int64_t k, int64_t units, double max_value,
                                      double *scratch, const oc_exec *ex) {
    const int64_t nblocks = (units + OC_COLS - 1) / OC_COLS;
    const int par = oc_parallel_pays(ex, units * k, nblocks);
    OC_PARALLEL_FOR(par ? ex->nthreads : 1, ex, b, nblocks, oc_maxnorm_colblock(w, k, units, max_value, scratch, b));
}

#endif /* OC_TRANSFORMS_H */
