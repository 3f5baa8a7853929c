# cython: language_level=3
"""Low-level drivers of the batch-normalization kernels (see oc_batchnorm.h).

Arguments are trusted: ``optcore.kernels`` validates shapes, dtypes, contiguity and aliasing
before calling. Tensors are passed flat (C-contiguous float32), per-channel vectors as 1-D
arrays; ``rows, C, S, planar`` describe the layout: ``(rows, C)`` channels-last when
``planar`` is false (S = 1), ``(rows, C, S)`` NCHW when it is true. The GIL is released while
a kernel runs. An optional ``mask`` (the output of a fused batch norm + ReLU, shaped like ``x``)
zeroes ``dy`` where it is not > 0, inside the backward sums and sweeps.
"""
from libc.stdint cimport int64_t

from optcore._kernels._runtime cimport exec_begin, exec_end, oc_exec

cdef extern from "oc_batchnorm.h" nogil:
    ctypedef struct oc_bn_shape:
        int64_t rows
        int64_t C
        int64_t S
        int planar
    int oc_bn_stats_run(const oc_bn_shape *sh, const float *x, double *mean, double *var,
                        const oc_exec *ex)
    int oc_bn_sums_run(int mode, const oc_bn_shape *sh, const float *x, const float *dy,
                       const float *m, const float *hi, double *s1, double *s2,
                       const oc_exec *ex)
    int oc_bn_apply_run(const oc_bn_shape *sh, const float *x, const float *hi, const float *a,
                        const float *b, const float *m, int relu, float *y, const oc_exec *ex)
    int oc_bn_dx_run(const oc_bn_shape *sh, const float *dy, const float *x, const float *m,
                     const float *hi, const float *k1, const float *k2, const float *k3,
                     float *dx, const oc_exec *ex)


cdef inline oc_bn_shape _shape(int64_t rows, int64_t C, int64_t S, bint planar):
    cdef oc_bn_shape sh
    sh.rows = rows
    sh.C = C
    sh.S = S
    sh.planar = planar
    return sh


cdef inline const float *_mask(const float[::1] mask):
    if mask is None:
        return NULL
    return &mask[0]


def stats(const float[::1] x, int64_t rows, int64_t C, int64_t S, bint planar,
          double[::1] mean, double[::1] var):
    """Per-channel mean and biased variance of ``x`` into ``mean`` and ``var`` (float64)."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    with nogil:
        rc = oc_bn_stats_run(&sh, &x[0], &mean[0], &var[0], &ex)
    exec_end(ex)
    if rc != 0:
        raise MemoryError("batch-norm statistics: out of memory for the partial sums")


def backward_sums(const float[::1] dy, const float[::1] x, int64_t rows, int64_t C, int64_t S,
                  bint planar, const float[::1] hi, double[::1] sum_dy, double[::1] sum_dy_xmu,
                  const float[::1] mask=None):
    """``sum(dy)`` and ``sum(dy * (x - hi))`` per channel, in one read pass (dy counted only
    where ``mask`` > 0 when it is given)."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef const float *pm = _mask(mask)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    with nogil:
        rc = oc_bn_sums_run(1, &sh, &x[0], &dy[0], pm, &hi[0], &sum_dy[0], &sum_dy_xmu[0], &ex)
    exec_end(ex)
    if rc != 0:
        raise MemoryError("batch-norm backward: out of memory for the partial sums")


def apply(const float[::1] x, int64_t rows, int64_t C, int64_t S, bint planar,
          const float[::1] hi, const float[::1] a, const float[::1] b, float[::1] y,
          bint relu=False, const float[::1] mask=None):
    """``y = (x - hi) * a + b`` per channel, or ``y = x * a + b`` when hi is None; clamped at 0
    when ``relu``, and 0 where ``mask`` (when given) is not > 0."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef const float *ph = NULL
    if hi is not None:
        ph = &hi[0]
    cdef const float *pm = _mask(mask)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    with nogil:
        rc = oc_bn_apply_run(&sh, &x[0], ph, &a[0], &b[0], pm, relu, &y[0], &ex)
    exec_end(ex)
    if rc != 0:
        raise MemoryError("batch-norm: out of memory for the per-channel coefficient tiles")


def dx(const float[::1] dy, const float[::1] x, int64_t rows, int64_t C, int64_t S, bint planar,
       const float[::1] hi, const float[::1] k1, const float[::1] k2, const float[::1] k3,
       float[::1] out, const float[::1] mask=None):
    """``dx = dy * k1 - (x - hi) * k2 - k3`` per channel (dy taken as 0 where ``mask`` is not
    > 0)."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef const float *pm = _mask(mask)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    with nogil:
        rc = oc_bn_dx_run(&sh, &dy[0], &x[0], pm, &hi[0], &k1[0], &k2[0], &k3[0], &out[0], &ex)
    exec_end(ex)
    if rc != 0:
        raise MemoryError("batch-norm backward: out of memory for the per-channel coefficient tiles")
