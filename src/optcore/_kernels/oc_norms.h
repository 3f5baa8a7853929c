/* Gradient norms and the in-place passes that clipping and accumulation need.
 *
 * Norms: one read pass over slot `a` of a tensor table (optionally reading x = a + b, the
 * gradient plus the accumulator, in float32 exactly as the update kernel forms it) gives per
 * chunk the sum of squares (float64) and the max |x|. Within a chunk, blocks of OC_NORM_BLOCK
 * elements are summed in OC_LANES float32 lanes (fixed lane assignment, so every instruction
 * set computes the same bits); each block is folded into float64. A block whose float32 sum is
 * not trustworthy -- overflow (|x| above ~1e19), NaN/inf, or so small that squares underflow --
 * is summed again in float64 from L1, so any finite input gives a finite, accurate norm.
 * Chunk partials are then combined serially in index order: per tensor, the sum of its chunks
 * in order; overall, the sum of the tensors in order. Results do not depend on the thread
 * count.
 *
 * Units (adaptive clipping): the same block sums over "units" -- contiguous runs of a tensor
 * such as the rows of a weight matrix -- each unit summed by one thread, in order.
 *
 * 16-bit gradients: a slot whose format (oc_list.kinds) is bfloat16 or float16 is widened
 * exactly into float32, block by block in L1, and then summed, scaled or accumulated by the
 * same float32 code: a norm of a 16-bit slot is bitwise the norm of its float32 widening.
 * The in-place passes (scale, clamp) round their float32 result back to nearest even.
 */
#ifndef OC_NORMS_H
#define OC_NORMS_H

#include <float.h>
#include "oc_common.h"
#include "oc_lowp.h"

#define OC_NORM_BLOCK 4096
#define OC_LANES 32
/* A float32 block sum is used only inside [OC_SQ_LO, OC_SQ_HI]. Below 2^-64, squares of the
 * block's elements may be subnormal or flushed (absolute error up to 4096 * 2^-126, i.e. a
 * relative error above 2^-50 of such a sum); above FLT_MAX a lane overflowed. */
#define OC_SQ_LO 5.421010862427522e-20
#define OC_SQ_HI ((double)FLT_MAX)

/* The format of slot s of tensor t: float32 unless the table gives formats. */
static inline int oc_kind(const oc_list *L, int s, int64_t t) {
    return L->kinds[s] != NULL ? L->kinds[s][t] : OC_F32;
}

/* Slot s of chunk c, for a 16-bit slot. */
static inline uint16_t *oc_slot16(const oc_list *L, int s, int64_t c) {
    return (uint16_t *)L->slots[s][L->chunk_tensor[c]] + L->chunk_start[c];
}

/* n 16-bit values of format `kind` widened into dst (exact), or float32 rounded back. */
static inline __attribute__((always_inline)) void
oc_widen(float *OC_RESTRICT dst, const uint16_t *OC_RESTRICT src, int kind, int64_t n) {
    if (kind == OC_BF16) oc_bf16_load(dst, src, n);
    else oc_f16_load(dst, src, n);
}

static inline __attribute__((always_inline)) void
oc_narrow(uint16_t *OC_RESTRICT dst, const float *OC_RESTRICT src, int kind, int64_t n) {
    if (kind == OC_BF16) oc_bf16_store_rne(dst, src, n);
    else oc_f16_store_rne(dst, src, n);
}

/* x[i], or x[i] + y[i] (float32, as the update kernel reads grad + acc). */
static inline __attribute__((always_inline)) float
oc_val(const float *x, const float *y, int64_t i, int two) {
    return two ? x[i] + y[i] : x[i];
}

/* Sum of squares in float64 (exact products, lanes in fixed order). */
static inline __attribute__((always_inline)) double
oc_block_sumsq64(const float *x, const float *y, int two, int64_t n) {
    double acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            double v = (double)oc_val(x, y, i + j, two);
            acc[j] += v * v;
        }
    for (int j = 0; i + j < n; j++) {
        double v = (double)oc_val(x, y, i + j, two);
        acc[j] += v * v;
    }
    double s = 0.0;
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* Sum of squares (float64) and max |x| of one block of n <= OC_NORM_BLOCK elements.
 * NaN is not propagated into *amax here; the caller marks a NaN sum instead. */
static inline __attribute__((always_inline)) void
oc_block_sumsq(const float *x, const float *y, int two, int64_t n, double *sum, float *amax) {
    float acc[OC_LANES] = {0}, mx[OC_LANES] = {0};
    int64_t i = 0;
    for (; i + OC_LANES <= n; i += OC_LANES)
        for (int j = 0; j < OC_LANES; j++) {
            float v = oc_val(x, y, i + j, two);
            float a = fabsf(v);
            acc[j] += v * v;
            mx[j] = a > mx[j] ? a : mx[j];
        }
    for (int j = 0; i + j < n; j++) {
        float v = oc_val(x, y, i + j, two);
        float a = fabsf(v);
        acc[j] += v * v;
        mx[j] = a > mx[j] ? a : mx[j];
    }
    double s = 0.0;
    float m = 0.0f;
    for (int j = 0; j < OC_LANES; j++) {
        s += (double)acc[j];
        m = mx[j] > m ? mx[j] : m;
    }
    if (!(s >= OC_SQ_LO && s <= OC_SQ_HI) && m != 0.0f) s = oc_block_sumsq64(x, y, two, n);
    *sum = s;
    *amax = m;
}

/* Sum of squares and max |x| of n consecutive elements, block by block, in order: float32
 * elements at x, or (kind bfloat16/float16) 16-bit ones at h, widened a block at a time. */
static inline __attribute__((always_inline)) void
oc_run_sumsq(const float *x, const uint16_t *h, int kind, const float *y, int two, int64_t n,
             double *sum, float *amax) {
    float buf[OC_NORM_BLOCK] __attribute__((aligned(64)));
    double s = 0.0;
    float m = 0.0f;
    for (int64_t i = 0; i < n; i += OC_NORM_BLOCK) {
        const int64_t b = n - i < OC_NORM_BLOCK ? n - i : OC_NORM_BLOCK;
        double bs;
        float bm;
        const float *xb = x + i;
        if (kind != OC_F32) {
            oc_widen(buf, h + i, kind, b);
            xb = buf;
        }
        oc_block_sumsq(xb, two ? y + i : NULL, two, b, &bs, &bm);
        s += bs;
        m = bm > m ? bm : m;
    }
    *sum = s;
    *amax = m;
}

static inline __attribute__((always_inline)) void
oc_norms_chunk(const oc_list *L, int sa, int sb, double *csq, float *cmax, int64_t c) {
    const int kind = oc_kind(L, sa, L->chunk_tensor[c]);
    const float *x = kind == OC_F32 ? oc_slot(L, sa, c) : NULL;
    const uint16_t *h = kind == OC_F32 ? NULL : oc_slot16(L, sa, c);
    const float *y = sb >= 0 ? oc_slot(L, sb, c) : NULL;
    const int64_t n = oc_chunk_len(L, c);
    if (kind == OC_F32) {
        if (y != NULL) oc_run_sumsq(x, NULL, OC_F32, y, 1, n, &csq[c], &cmax[c]);
        else oc_run_sumsq(x, NULL, OC_F32, NULL, 0, n, &csq[c], &cmax[c]);
    } else {
        if (y != NULL) oc_run_sumsq(NULL, h, kind, y, 1, n, &csq[c], &cmax[c]);
        else oc_run_sumsq(NULL, h, kind, NULL, 0, n, &csq[c], &cmax[c]);
    }
}

/* Per-chunk partials of slot sa (plus slot sb when sb >= 0) into csq/cmax (nchunks entries),
 * then per tensor into tsq/tmax (ntensors entries; tmax is NaN where tsq is NaN). */
OC_CLONES static void oc_norms_run(const oc_list *L, int sa, int sb, double *csq, float *cmax,
                                   double *tsq, double *tmax, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_norms_chunk(L, sa, sb, csq, cmax, c));
    for (int64_t t = 0; t < L->ntensors; t++) { tsq[t] = 0.0; tmax[t] = 0.0; }
    for (int64_t c = 0; c < L->nchunks; c++) {
        const int64_t t = L->chunk_tensor[c];
        tsq[t] += csq[c];
        tmax[t] = (double)cmax[c] > tmax[t] ? (double)cmax[c] : tmax[t];
    }
    for (int64_t t = 0; t < L->ntensors; t++)
        if (tsq[t] != tsq[t]) tmax[t] = NAN;
}

/* ---- p-norms other than 2 and inf ------------------------------------------------------ */

/* What one pass sums per chunk, in float64: |x|^p (any p other than 0, 1, 2, +-inf), |x|
 * (p = 1), the count of x != 0 (p = 0, NaN counts), or the minimum of |x| (p = -inf, NaN if
 * any element is NaN). The mode is chosen outside the element loop. */
enum { OC_PNORM_POW = 0, OC_PNORM_ABS = 1, OC_PNORM_COUNT = 2, OC_PNORM_MIN = 3 };

/* Adds n elements of x to the running partial *acc of the mode (*nan: a NaN seen, for the
 * minimum), element by element in order. */
static inline __attribute__((always_inline)) void
oc_pnorm_elems(const float *x, int64_t n, int mode, double p, double *acc, int *nan) {
    double a = *acc;
    if (mode == OC_PNORM_ABS) {
        for (int64_t i = 0; i < n; i++) a += fabs((double)x[i]);
    } else if (mode == OC_PNORM_COUNT) {
        for (int64_t i = 0; i < n; i++) a += x[i] != 0.0f ? 1.0 : 0.0;
    } else if (mode == OC_PNORM_MIN) {
        int seen = 0;
        for (int64_t i = 0; i < n; i++) {
            const double v = fabs((double)x[i]);
            seen |= v != v;
            a = v < a ? v : a;
        }
        *nan |= seen;
    } else {
        for (int64_t i = 0; i < n; i++) a += pow(fabs((double)x[i]), p);
    }
    *acc = a;
}

static inline __attribute__((always_inline)) void
oc_pnorm_chunk(const oc_list *L, int s, int mode, double p, double *cpart, int64_t c) {
    const int kind = oc_kind(L, s, L->chunk_tensor[c]);
    const int64_t n = oc_chunk_len(L, c);
    double acc = mode == OC_PNORM_MIN ? INFINITY : 0.0;
    int nan = 0;
    if (kind == OC_F32) {
        oc_pnorm_elems(oc_slot(L, s, c), n, mode, p, &acc, &nan);
    } else {
        float buf[OC_TILE] __attribute__((aligned(64)));
        const uint16_t *h = oc_slot16(L, s, c);
        for (int64_t i = 0; i < n; i += OC_TILE) {
            const int64_t m = n - i < OC_TILE ? n - i : OC_TILE;
            oc_widen(buf, h + i, kind, m);
            oc_pnorm_elems(buf, m, mode, p, &acc, &nan);
        }
    }
    cpart[c] = nan ? NAN : acc;
}

/* Per-chunk partials of slot s (see OC_PNORM_*) into cpart, then per tensor into tpart: the
 * sum of its chunks in index order, or for OC_PNORM_MIN their minimum (NaN propagates; an
 * empty tensor gives +inf). Bitwise independent of the thread count. */
OC_CLONES static void oc_pnorm_run(const oc_list *L, int s, int mode, double p, double *cpart,
                                   double *tpart, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_pnorm_chunk(L, s, mode, p, cpart, c));
    const double init = mode == OC_PNORM_MIN ? INFINITY : 0.0;
    for (int64_t t = 0; t < L->ntensors; t++) tpart[t] = init;
    for (int64_t c = 0; c < L->nchunks; c++) {
        const int64_t t = L->chunk_tensor[c];
        const double v = cpart[c];
        if (mode != OC_PNORM_MIN) tpart[t] += v;
        else if (v != v || tpart[t] != tpart[t]) tpart[t] = NAN;
        else tpart[t] = v < tpart[t] ? v : tpart[t];
    }
}

/* ---- in-place passes ---------------------------------------------------------------- */

static inline __attribute__((always_inline)) void oc_scale_elems(float *x, int64_t n, float f) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * f;
}

/* x *= scale * tensor_scale[t] (tensor_scale may be NULL). */
static inline __attribute__((always_inline)) void
oc_scale_chunk(const oc_list *L, int s, float scale, const float *ts, int64_t c) {
    const int kind = oc_kind(L, s, L->chunk_tensor[c]);
    const float f = ts != NULL ? scale * ts[L->chunk_tensor[c]] : scale;
    const int64_t n = oc_chunk_len(L, c);
    if (kind == OC_F32) {
        oc_scale_elems(oc_slot(L, s, c), n, f);
        return;
    }
    float buf[OC_TILE] __attribute__((aligned(64)));
    uint16_t *h = oc_slot16(L, s, c);
    for (int64_t i = 0; i < n; i += OC_TILE) {
        const int64_t m = n - i < OC_TILE ? n - i : OC_TILE;
        oc_widen(buf, h + i, kind, m);
        oc_scale_elems(buf, m, f);
        oc_narrow(h + i, buf, kind, m);
    }
}

OC_CLONES static void oc_scale_run(const oc_list *L, int s, float scale, const float *ts,
                                   const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_scale_chunk(L, s, scale, ts, c));
}

/* x = clamp(x, -limit, limit) over n elements (NaN passes through, as torch.clamp); *m and
 * *nan gather max |x| before and whether a NaN was seen. */
static inline __attribute__((always_inline)) void
oc_clamp_elems(float *x, int64_t n, float limit, float *m, int *nan) {
    float mx = *m;
    int seen = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float a = fabsf(v);
        mx = a > mx ? a : mx;
        seen |= v != v;
        x[i] = v > limit ? limit : (v < -limit ? -limit : v);
    }
    *m = mx;
    *nan |= seen;
}

/* Clamp one chunk in place; records max |x| before, per chunk, with NaN marked by cnan[c]. */
static inline __attribute__((always_inline)) void
oc_clamp_chunk(const oc_list *L, int s, float limit, float *cmax, unsigned char *cnan, int64_t c) {
    const int kind = oc_kind(L, s, L->chunk_tensor[c]);
    const int64_t n = oc_chunk_len(L, c);
    float m = 0.0f;
    int nan = 0;
    if (kind == OC_F32) {
        oc_clamp_elems(oc_slot(L, s, c), n, limit, &m, &nan);
    } else {
        float buf[OC_TILE] __attribute__((aligned(64)));
        uint16_t *h = oc_slot16(L, s, c);
        for (int64_t i = 0; i < n; i += OC_TILE) {
            const int64_t k = n - i < OC_TILE ? n - i : OC_TILE;
            oc_widen(buf, h + i, kind, k);
            oc_clamp_elems(buf, k, limit, &m, &nan);
            oc_narrow(h + i, buf, kind, k);
        }
    }
    cmax[c] = m;
    cnan[c] = (unsigned char)nan;
}

OC_CLONES static void oc_clamp_run(const oc_list *L, int s, float limit, float *cmax,
                                   unsigned char *cnan, const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_clamp_chunk(L, s, limit, cmax, cnan, c));
}

static inline __attribute__((always_inline)) void
oc_accum_elems(float *OC_RESTRICT a, const float *OC_RESTRICT g, int64_t n, int first) {
    if (first)
        for (int64_t i = 0; i < n; i++) a[i] = g[i];
    else
        for (int64_t i = 0; i < n; i++) a[i] = a[i] + g[i];
}

/* Gradient accumulation into a float32 dst: dst = src on the first micro-step, else
 * dst += src (a 16-bit src is widened exactly). */
static inline __attribute__((always_inline)) void
oc_accum_chunk(const oc_list *L, int src, int dst, int first, int64_t c) {
    const int kind = oc_kind(L, src, L->chunk_tensor[c]);
    float *a = oc_slot(L, dst, c);
    const int64_t n = oc_chunk_len(L, c);
    if (kind == OC_F32) {
        oc_accum_elems(a, oc_slot(L, src, c), n, first);
        return;
    }
    float buf[OC_TILE] __attribute__((aligned(64)));
    const uint16_t *h = oc_slot16(L, src, c);
    for (int64_t i = 0; i < n; i += OC_TILE) {
        const int64_t m = n - i < OC_TILE ? n - i : OC_TILE;
        oc_widen(buf, h + i, kind, m);
        oc_accum_elems(a + i, buf, m, first);
    }
}

OC_CLONES static void oc_accum_run(const oc_list *L, int src, int dst, int first,
                                   const oc_exec *ex) {
    OC_FOR_EACH_CHUNK(L, ex, c, oc_accum_chunk(L, src, dst, first, c));
}

/* ---- units: contiguous runs (rows / output channels) of the tensors ------------------ */

/* A table of units: unit u is elements [start[u], start[u] + len[u]) of tensor tensor[u]. */
typedef struct {
    int64_t nunits;
    const int64_t *tensor;
    const int64_t *start;
    const int64_t *len;
} oc_units;


static inline __attribute__((always_inline)) void
oc_unit_sumsq_one(const oc_list *L, int s, const oc_units *U, double *out, int64_t u) {
    const float *x = (const float *)L->slots[s][U->tensor[u]] + U->start[u];
    float m;
    oc_run_sumsq(x, NULL, OC_F32, NULL, 0, U->len[u], &out[u], &m);
}

OC_CLONES static void oc_unit_sumsq_run(const oc_list *L, int s, const oc_units *U, double *out,
                                        const oc_exec *ex) {
    OC_PARALLEL_FOR(oc_team_size(ex, L->total), ex, u, U->nunits, oc_unit_sumsq_one(L, s, U, out, u));
}

static inline __attribute__((always_inline)) void
oc_unit_scale_one(const oc_list *L, int s, const oc_units *U, const float *f, int64_t u) {
    float *x = (float *)L->slots[s][U->tensor[u]] + U->start[u];
    const float k = f[u];
    const int64_t n = U->len[u];
    if (k != 1.0f)
        for (int64_t i = 0; i < n; i++) x[i] = x[i] * k;
}

OC_CLONES static void oc_unit_scale_run(const oc_list *L, int s, const oc_units *U,
                                        const float *f, const oc_exec *ex) {
    OC_PARALLEL_FOR(oc_team_size(ex, L->total), ex, u, U->nunits, oc_unit_scale_one(L, s, U, f, u));
}

#endif /* OC_NORMS_H */
