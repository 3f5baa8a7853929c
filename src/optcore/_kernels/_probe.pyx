# cython: language_level=3
"""Roofline probe: STREAM-style sweeps measuring the machine's memory bandwidth (oc_probe.h).

Each sweep runs on the same chunked, OpenMP, multi-ISA path as the optcore kernels (thread
count from :func:`optcore.set_num_threads`), with the least arithmetic that keeps its memory
traffic, so its speed is the bandwidth limit of its access pattern. ``BYTES_PER_ELEMENT``
gives the bytes each sweep moves per element (loads + stores: 4 bytes per float32 element, 2
per bfloat16, 1 per 8-bit code, plus the 8-bit pattern's absmax per block). The ``adam_*``
sweeps are the access patterns of the Adam kernels with low-precision state, parameters,
gradients or a model copy (oc_probe.h).

Every function checks its arguments (C-contiguous ndarrays of the documented dtypes and equal
size, written arrays writeable, no two sharing memory) before anything is written, and releases the GIL
while it runs.
"""
import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint16_t, uintptr_t

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
    void oc_probe_adam_bf16(float *p, const float *g, uint16_t *m, uint16_t *v,
                            const oc_probe_adam_h *h, int64_t n, const oc_exec *ex)
    void oc_probe_adam_int8(float *p, const float *g, uint8_t *m, uint8_t *v, float *am, float *av,
                            float lr, int64_t n, const oc_exec *ex)
    void oc_probe_adam_bf16all(uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v,
                               const oc_probe_adam_h *h, int64_t n, const oc_exec *ex)
    void oc_probe_adam_copy(float *p, const uint16_t *g, float *m, float *v, uint16_t *copy,
                            const oc_probe_adam_h *h, int64_t n, const oc_exec *ex)
    enum: OC_PROBE_Q8
    enum: OC_CHUNK

BYTES_PER_ELEMENT = {"copy": 8, "triad": 12, "sumsq": 4, "sgd": 20, "adam": 28,
                     "adam_bf16": 20, "adam_int8": 16 + 16.0 / OC_PROBE_Q8, "adam_bf16all": 14,
                     "adam_copy": 28}

#: Elements per absmax entry of the int8 pattern.
Q8_BLOCK = OC_PROBE_Q8


cdef float *_ptr(a):
    return <float *> <uintptr_t> a.ctypes.data


def _typed(name, a, dtype, writeable):
    """A C-contiguous ndarray of ``dtype`` (float32 arrays through the project's check)."""
    if dtype == np.float32:
        return ck.float32_buffer(name, a, writeable=writeable)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {np.dtype(dtype)}, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place and must be writeable")
    return a


def _check(written, read, dtypes=None, sized=None):
    """Validate the named arrays (float32 unless ``dtypes`` names another dtype); return the
    common size of those in ``sized`` (default: all)."""
    dtypes = dtypes or {}
    arrays = {}
    for name, a in written:
        arrays[name] = [_typed(name, a, dtypes.get(name, np.float32), True)]
    for name, a in read:
        arrays[name] = [_typed(name, a, dtypes.get(name, np.float32), False)]
    names = list(arrays) if sized is None else list(sized)
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


cdef oc_probe_adam_h _adam_h(beta1, beta2, lr) except *:
    cdef oc_probe_adam_h h
    cdef double b1 = ck.finite("beta1", beta1)
    cdef double b2 = ck.finite("beta2", beta2)
    h.a = <float> b1
    h.a_c = <float> (1.0 - b1)
    h.b = <float> b2
    h.b_c = <float> (1.0 - b2)
    h.lr = <float> ck.finite("lr", lr)
    return h


def adam_sweep(p, g, m, v, beta1=0.9, beta2=0.999, lr=1e-3):
    """Adam access pattern without its division and square root.

    ``m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2; p = p - lr (m + v)``, all in
    float32 (the coefficients ``1 - beta`` rounded from float64). 4 loads and 3 stores per
    element (28 bytes), as the Adam, AdamW, AdaMax and NAdam kernels.
    """
    cdef oc_probe_adam_h h = _adam_h(beta1, beta2, lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v)], [("g", g)])
    cdef float *pp = _ptr(p)
    cdef const float *pg = _ptr(g)
    cdef float *pm = _ptr(m)
    cdef float *pv = _ptr(v)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam(pp, pg, pm, pv, &h, n, &ex)
    exec_end(ex)


cdef void *_addr(a):
    return <void *> <uintptr_t> a.ctypes.data


def adam_bf16_sweep(p, g, m, v, beta1=0.9, beta2=0.999, lr=1e-3):
    """Access pattern of Adam with bfloat16 state (``m``, ``v``: uint16 arrays of bf16 bits).

    As :func:`adam_sweep` with ``m``, ``v`` widened exactly (a shift) and stored truncated to
    their top 16 bits; ``p`` and ``g`` float32. 20 bytes per element.
    """
    cdef oc_probe_adam_h h = _adam_h(beta1, beta2, lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v)], [("g", g)],
                            {"m": np.uint16, "v": np.uint16})
    cdef float *pp = _ptr(p)
    cdef const float *pg = _ptr(g)
    cdef uint16_t *pm = <uint16_t *> _addr(m)
    cdef uint16_t *pv = <uint16_t *> _addr(v)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam_bf16(pp, pg, pm, pv, &h, n, &ex)
    exec_end(ex)


def adam_int8_sweep(p, g, m, v, m_absmax, v_absmax, lr=1e-3):
    """Access pattern of Adam with 8-bit block-wise state.

    ``p = p - lr (g + m_absmax[b] m + v_absmax[b] v)``, then ``m += 1``, ``v += 1`` (uint8,
    wrapping) and each absmax halved, ``b`` the block of ``Q8_BLOCK`` elements. ``m``, ``v``
    uint8, one float32 absmax per block. 16 + 16 / Q8_BLOCK bytes per element.
    """
    cdef float flr = <float> ck.finite("lr", lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v), ("m_absmax", m_absmax),
                             ("v_absmax", v_absmax)], [("g", g)],
                            {"m": np.uint8, "v": np.uint8}, sized=("p", "m", "v", "g"))
    cdef int64_t nb = (n + OC_PROBE_Q8 - 1) // OC_PROBE_Q8
    for name, a in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if a.size != nb:
            raise ValueError(f"{name} has {a.size} elements, expected {nb} (one per block of "
                             f"{OC_PROBE_Q8})")
    cdef float *pp = _ptr(p)
    cdef const float *pg = _ptr(g)
    cdef uint8_t *pm = <uint8_t *> _addr(m)
    cdef uint8_t *pv = <uint8_t *> _addr(v)
    cdef float *am = _ptr(m_absmax)
    cdef float *av = _ptr(v_absmax)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam_int8(pp, pg, pm, pv, am, av, flr, n, &ex)
    exec_end(ex)


def adam_bf16all_sweep(p, g, m, v, beta1=0.9, beta2=0.999, lr=1e-3):
    """Access pattern of Adam with bfloat16 parameters, gradients and state (all uint16 arrays
    of bf16 bits): as :func:`adam_bf16_sweep` with ``p`` and ``g`` widened and ``p`` stored
    truncated too. 14 bytes per element.
    """
    cdef oc_probe_adam_h h = _adam_h(beta1, beta2, lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v)], [("g", g)],
                            {"p": np.uint16, "g": np.uint16, "m": np.uint16, "v": np.uint16})
    cdef uint16_t *pp = <uint16_t *> _addr(p)
    cdef const uint16_t *pg = <const uint16_t *> _addr(g)
    cdef uint16_t *pm = <uint16_t *> _addr(m)
    cdef uint16_t *pv = <uint16_t *> _addr(v)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam_bf16all(pp, pg, pm, pv, &h, n, &ex)
    exec_end(ex)


def adam_copy_sweep(p, g, m, v, copy, beta1=0.9, beta2=0.999, lr=1e-3):
    """Access pattern of Adam on float32 master weights with bfloat16 gradients and a bfloat16
    model copy: as :func:`adam_sweep` with ``g`` widened from bf16 bits (uint16) and the new
    ``p`` also written truncated into ``copy`` (uint16). 28 bytes per element.
    """
    cdef oc_probe_adam_h h = _adam_h(beta1, beta2, lr)
    cdef int64_t n = _check([("p", p), ("m", m), ("v", v), ("copy", copy)], [("g", g)],
                            {"g": np.uint16, "copy": np.uint16})
    cdef float *pp = _ptr(p)
    cdef const uint16_t *pg = <const uint16_t *> _addr(g)
    cdef float *pm = _ptr(m)
    cdef float *pv = _ptr(v)
    cdef uint16_t *pc = <uint16_t *> _addr(copy)
    cdef oc_exec ex = exec_begin(n)
    with nogil:
        oc_probe_adam_copy(pp, pg, pm, pv, pc, &h, n, &ex)
    exec_end(ex)
