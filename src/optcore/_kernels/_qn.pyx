# cython: language_level=3
"""Low-level drivers of the quasi-Newton kernels (see oc_qn.h).

Arguments are trusted: ``optcore.quasinewton`` validates and allocates before calling (slots
set, float64 vectors C-contiguous of the right sizes). The GIL is released while a kernel runs.
"""
import numpy as np

from libc.stdint cimport int64_t, uintptr_t

from optcore._kernels._runtime cimport TensorList, exec_begin, exec_end, oc_exec, oc_list

cdef extern from "oc_qn.h" nogil:
    double oc_qn_dot_run(const oc_list *L, int a, int b, double *cpart, const oc_exec *ex)
    double oc_qn_axpby_run(const oc_list *L, int xs, double alpha, int zs, double beta, int es,
                           double *cpart, const oc_exec *ex)
    void oc_qn_point_run(const oc_list *L, int xs, int x0s, int ds, double t, const oc_exec *ex)
    void oc_qn_pair_run(const oc_list *L, double *part, float *cmax, double *out,
                        const oc_exec *ex)
    void oc_qn_gather_run(const oc_list *L, int s, const int64_t *off, double *out,
                          const oc_exec *ex)
    void oc_qn_scatter_run(const oc_list *L, int s, const int64_t *off, const double *inp,
                           double scale, const oc_exec *ex)
    double oc_qn_dot_f64(const double *a, const double *b, int64_t n)
    void oc_bfgs_pass(double *P, int64_t n, const int64_t *bstart, int64_t nblocks,
                      const double *u, const double *v, const double *g, double *w,
                      double *scratch, const oc_exec *ex)


cdef inline void *_ptr(a):
    return <void *> <uintptr_t> a.ctypes.data


cdef class Scratch:
    """Per-chunk partial sums for one table (allocated once, reused by every call)."""
    cdef object part
    cdef object cmax
    cdef double *p
    cdef float *m

    def __init__(self, TensorList tl):
        n = max(tl.c.nchunks, 1)
        self.part = np.zeros(3 * n, dtype=np.float64)
        self.cmax = np.zeros(n, dtype=np.float32)
        self.p = <double *> _ptr(self.part)
        self.m = <float *> _ptr(self.cmax)


def dot(TensorList tl, Scratch sc, int a, int b):
    """``sum_i a_i b_i`` of slots ``a`` and ``b`` (float64 accumulation)."""
    cdef oc_exec ex = exec_begin(tl.total)
    cdef double r
    with nogil:
        r = oc_qn_dot_run(&tl.c, a, b, sc.p, &ex)
    exec_end(ex)
    return r


def axpby(TensorList tl, Scratch sc, int x, double alpha, int z, double beta, int e):
    """``x = alpha x + beta z`` (``x = beta z`` when alpha is 0; ``x = alpha x`` when z < 0),
    computed in float64 and rounded once; returns ``e . x`` afterwards (0 when e < 0)."""
    cdef oc_exec ex = exec_begin(tl.total)
    cdef double r
    with nogil:
        r = oc_qn_axpby_run(&tl.c, x, alpha, z, beta, e, sc.p, &ex)
    exec_end(ex)
    return r


def point(TensorList tl, int x, int x0, int d, double t):
    """``x = x0 + t d`` (float64 arithmetic, rounded once)."""
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_qn_point_run(&tl.c, x, x0, d, t, &ex)
    exec_end(ex)


def pair(TensorList tl, Scratch sc):
    """Slots (x, g, x0, g0, s, y): ``s = x - x0``, ``y = g - g0``, then ``x0 = x``,
    ``g0 = g``. Returns ``(s.y, y.y, g.g, max|g|)``."""
    cdef double out[4]
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_qn_pair_run(&tl.c, sc.p, sc.m, out, &ex)
    exec_end(ex)
    return out[0], out[1], out[2], out[3]


def gather(TensorList tl, int s, offsets, out):
    """Copy slot ``s`` into the float64 vector ``out`` (tensor t at ``offsets[t]``)."""
    cdef const int64_t *off = <const int64_t *> _ptr(offsets)
    cdef double *o = <double *> _ptr(out)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_qn_gather_run(&tl.c, s, off, o, &ex)
    exec_end(ex)


def scatter(TensorList tl, int s, offsets, vec, double scale):
    """Slot ``s`` = float32(``scale * vec``) (tensor t from ``offsets[t]`` of ``vec``)."""
    cdef const int64_t *off = <const int64_t *> _ptr(offsets)
    cdef const double *v = <const double *> _ptr(vec)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_qn_scatter_run(&tl.c, s, off, v, scale, &ex)
    exec_end(ex)


def dot64(a, b):
    """``sum_i a_i b_i`` of two float64 vectors (serial, fixed lanes: deterministic)."""
    cdef const double *pa = <const double *> _ptr(a)
    cdef const double *pb = <const double *> _ptr(b)
    cdef int64_t n = a.size
    cdef double r
    with nogil:
        r = oc_qn_dot_f64(pa, pb, n)
    return r


def bfgs_pass(P, int64_t n, bstart, u, v, g, w, scratch):
    """On the packed lower triangle ``P`` (float64, n(n+1)/2): ``P += u v^T + v u^T`` when
    ``u`` is not None, then ``w = P g`` when ``g`` is not None. ``bstart``: int64 row-block
    starts (nblocks + 1 entries, fixed by n); ``scratch``: nblocks * n float64."""
    cdef double *pP = <double *> _ptr(P)
    cdef const int64_t *pb = <const int64_t *> _ptr(bstart)
    cdef int64_t nblocks = bstart.size - 1
    cdef const double *pu = NULL
    cdef const double *pv = NULL
    cdef const double *pg = NULL
    cdef double *pw = NULL
    cdef double *ps = <double *> _ptr(scratch)
    if u is not None:
        pu = <const double *> _ptr(u)
        pv = <const double *> _ptr(v)
    if g is not None:
        pg = <const double *> _ptr(g)
        pw = <double *> _ptr(w)
    cdef oc_exec ex = exec_begin(n * (n + 1) // 2)
    with nogil:
        oc_bfgs_pass(pP, n, pb, nblocks, pu, pv, pg, pw, ps, &ex)
    exec_end(ex)
