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


# ---- whole passes: the kernels plus the per-channel constants (float64), in one call ----------
# (the same operations, in the same order, as the NumPy expressions they replace; so the
# results do not depend on which caller computed them)

from libc.math cimport sqrt
from libc.stdlib cimport free, malloc


cdef float *_floats(int64_t n) except NULL:
    cdef float *p = <float *>malloc(sizeof(float) * (n + 1))
    if p == NULL:
        raise MemoryError("batch-norm: out of memory for the per-channel constants")
    return p


def train_forward(const float[::1] x, int64_t rows, int64_t C, int64_t S, bint planar,
                  const float[::1] gamma, const float[::1] beta, double eps, float[::1] y,
                  bint relu, double[::1] mean, double[::1] var, double[::1] invstd):
    """Statistics into ``mean``, ``var``, ``invstd`` (float64), then ``y = (x - hi) * a + b``
    with ``a = gamma * invstd``, ``hi`` the float nearest the mean and
    ``b = beta - (mean - hi) * a`` (clamped at 0 when ``relu``)."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    cdef float *hi = _floats(3 * C)  # hi, a, b
    cdef float *a = hi + C
    cdef float *b = hi + 2 * C
    cdef int64_t c
    cdef double ac, rest
    try:
        with nogil:
            rc = oc_bn_stats_run(&sh, &x[0], &mean[0], &var[0], &ex)
            if rc == 0:
                for c in range(C):
                    invstd[c] = 1.0 / sqrt(var[c] + eps)
                    ac = invstd[c] if gamma is None else gamma[c] * invstd[c]
                    hi[c] = <float>mean[c]
                    rest = mean[c] - <double>hi[c]
                    b[c] = <float>(-rest * ac if beta is None else beta[c] - rest * ac)
                    a[c] = <float>ac
                rc = oc_bn_apply_run(&sh, &x[0], hi, a, b, NULL, relu, &y[0], &ex)
    finally:
        exec_end(ex)
        free(hi)
    if rc != 0:
        raise MemoryError("batch-norm forward: out of memory for the partial sums")


def running_update(float[::1] running_mean, float[::1] running_var, const double[::1] mean,
                   const double[::1] var, double n, double momentum):
    """torch's running update in float64, stored as float32:
    ``r = (1 - m) * r + m * batch`` with the unbiased variance ``var * (n / (n - 1))``."""
    cdef int64_t c
    cdef double keep = 1.0 - momentum, unbias = n / (n - 1.0)
    for c in range(running_mean.shape[0]):
        running_mean[c] = <float>(keep * running_mean[c] + momentum * mean[c])
        running_var[c] = <float>(keep * running_var[c] + momentum * (var[c] * unbias))


def train_backward(const float[::1] dy, const float[::1] x, const float[::1] mask, int64_t rows,
                   int64_t C, int64_t S, bint planar, const float[::1] gamma,
                   const double[::1] mean, const double[::1] invstd, float[::1] dx,
                   float[::1] dgamma, float[::1] dbeta):
    """The training backward (see ``batchnorm_backward``): sums of ``dy`` and
    ``dy * (x - mean)`` (dy taken as 0 where ``mask`` is not > 0), then ``dx`` (when given),
    ``dgamma`` and ``dbeta`` (when given)."""
    cdef oc_bn_shape sh = _shape(rows, C, S, planar)
    cdef const float *pm = _mask(mask)
    cdef oc_exec ex = exec_begin(rows * C * S)
    cdef int rc
    cdef double *s = <double *>malloc(sizeof(double) * (2 * C + 1))
    if s == NULL:
        raise MemoryError("batch-norm backward: out of memory for the sums")
    cdef float *hi = NULL
    cdef float *k1
    cdef float *k2
    cdef float *k3
    cdef int64_t c
    cdef double n = <double>(rows * S), rest, g, q
    try:
        hi = _floats(4 * C)  # hi, k1, k2, k3
        k1, k2, k3 = hi + C, hi + 2 * C, hi + 3 * C
        with nogil:
            for c in range(C):
                hi[c] = <float>mean[c]
            rc = oc_bn_sums_run(1, &sh, &x[0], &dy[0], pm, hi, s, s + C, &ex)
            if rc == 0:
                for c in range(C):
                    rest = mean[c] - <double>hi[c]
                    s[C + c] -= rest * s[c]  # sums of dy * (x - hi) -> dy * (x - mean)
                    g = invstd[c] if gamma is None else gamma[c] * invstd[c]
                    q = g * invstd[c] * invstd[c] * (s[C + c] / n)
                    k1[c] = <float>g
                    k2[c] = <float>q
                    k3[c] = <float>(g * (s[c] / n) - rest * q)
                    if dgamma is not None:
                        dgamma[c] = <float>(s[C + c] * invstd[c])
                    if dbeta is not None:
                        dbeta[c] = <float>s[c]
                if dx is not None:
                    rc = oc_bn_dx_run(&sh, &dy[0], &x[0], pm, hi, k1, k2, k3, &dx[0], &ex)
    finally:
        exec_end(ex)
        free(hi)
        free(s)
    if rc != 0:
        raise MemoryError("batch-norm backward: out of memory for the partial sums")
