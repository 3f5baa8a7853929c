# cython: language_level=3
"""Roofline probe: STREAM-style sweeps measuring the machine's memory bandwidth (oc_probe.h).

Each sweep runs on the same chunked, OpenMP, multi-ISA path as the optcore kernels (thread
count from :func:`optcore.set_num_threads`), with the least arithmetic that keeps its memory
traffic, so its speed is the bandwidth limit of its access pattern. ``BYTES_PER_ELEMENT``
gives the bytes each sweep moves per element (loads + stores, 4 bytes each).

Every function checks its arguments (C-contiguous float32 ndarrays of equal size, written
arrays writeable, no two sharing memory) before anything is written, and releases the GIL
while it runs.
"""
import numpy as np

from libc.stdint cimport int64_t, uintptr_t

from optcore import _checks as ck
from optcore._kernels._runtime cimport exec_begin, exec_end, oc_exec

cdef extern from "oc_probe.h" nogil:
    ctypedef struct oc_probe_adam_h:
        float a, a_c, b, b_c, lr
    void oc_probe_copy(float *a, const float *b, int64_t n, const oc_exec *ex)
    void oc_probe_triad(float *a, const float *b, const float *c, float s, int64_t n,
                        const oc_exec *ex)
    void oc_probe_sumsq(const float *x, double *partial, int64_t n, const oc_exec *ex)
    void oc_probe_sgd(float *p, const float *g, float *b, float mu, float lr, int64_t n,
                      const oc_exec *ex)
    void oc_probe_adam(float *p, const float *g, float *m, float *v, const oc_probe_adam_h *h,
                       int64_t n, const oc_exec *ex)
    enum: OC_CHUNK

BYTES_PER_ELEMENT = {"copy": 8, "triad": 12, "sumsq": 4, "sgd": 20, "adam": 28}


cdef float *_ptr(a):
    return <float *> <uintptr_t> a.ctypes.data


def _check(written, read):
    """Validate the named arrays; return their common size."""
    arrays = {}
    for name, a in written:
        arrays[name] = [ck.float32_buffer(name, a)]
    for name, a in read:
        arrays[name] = [ck.float32_buffer(name, a, writeable=False)]
    names = list(arrays)
    first = names[0]
    for name in names[1:]:
        if arrays[name][0].size != arrays[first][0].size:
            raise ValueError(f"{name} has {arrays[name][0].size} elements but {first} has "
                             f"{arrays[first][0].size}")
    ck.no_overlap(arrays)
    return arrays[first][0].size


def copy(dst, src):
    """Copy ``src`` into ``dst`` (8 bytes moved per element)."""
    cdef int64_t n = _check([("dst", dst)], [("src", src)])
    cdef float *a = _ptr(dst)
    cdef const float *b = _ptr(src)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_copy(a, b, n, &ex)
    exec_end(ex)


def triad(a, b, c, scalar):
    """STREAM triad ``a = b + scalar * c`` in float32 (12 bytes moved per element)."""
    cdef float s = <float> ck.finite("scalar", scalar)
    cdef int64_t n = _check([("a", a)], [("b", b), ("c", c)])
    cdef float *pa = _ptr(a)
    cdef const float *pb = _ptr(b)
    cdef const float *pc = _ptr(c)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_triad(pa, pb, pc, s, n, &ex)
    exec_end(ex)


def sumsq(x):
    """Return the sum of squares of ``x`` as a float (4 bytes read per element).

    Float32 lanes over blocks of 1024 elements, each block added into a float64 partial per
    chunk, partials summed in chunk order: bitwise identical for any thread count.
    """
    cdef int64_t n = _check([], [("x", x)])
    cdef int64_t nchunks = (n + OC_CHUNK - 1) // OC_CHUNK
    partial = np.zeros(max(nchunks, 1), dtype=np.float64)
    cdef double *pp = <double *> <uintptr_t> partial.ctypes.data
    cdef const float *px = _ptr(x)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_sumsq(px, pp, n, &ex)
    exec_end(ex)
    cdef double total = 0.0
    cdef int64_t i
    for i in range(nchunks):
        total += pp[i]
    return total


def sgd_sweep(p, g, buf, momentum=0.9, lr=1e-3):
    """SGD-momentum access pattern: ``buf = momentum * buf + g; p = p - lr * buf``.

    3 loads and 2 stores per element (20 bytes), as the SGD-momentum, AdaGrad and RMSProp
    kernels.
    """
    cdef float mu = <float> ck.finite("momentum", momentum)
    cdef float flr = <float> ck.finite("lr", lr)
    cdef int64_t n = _check([("p", p), ("buf", buf)], [("g", g)])
    cdef float *pp = _ptr(p)
    cdef const float *pg = _ptr(g)
    cdef float *pb = _ptr(buf)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_sgd(pp, pg, pb, mu, flr, n, &ex)
    exec_end(ex)


def adam_sweep(p, g, m, v, beta1=0.9, beta2=0.999, lr=1e-3):
    """Adam access pattern without its division and square root.

    ``m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2; p = p - lr (m + v)``, all in
    float32 (the coefficients ``1 - beta`` rounded from float64). 4 loads and 3 stores per
    element (28 bytes), as the Adam, AdamW, AdaMax and NAdam kernels.
    """
    cdef oc_probe_adam_h h
    cdef double b1 = ck.finite("beta1", beta1)
    cdef double b2 = ck.finite("beta2", beta2)
    h.a = <float> b1
    h.a_c = <float> (1.0 - b1)
    h.b = <float> b2
    h.b_c = <float> (1.0 - b2)
    h.lr = <float> ck.finite("lr", lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v)], [("g", g)])
    cdef float *pp = _ptr(p)
    cdef const float *pg = _ptr(g)
    cdef float *pm = _ptr(m)
    cdef float *pv = _ptr(v)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam(pp, pg, pm, pv, &h, n, &ex)
    exec_end(ex)
