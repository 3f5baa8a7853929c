# cython: language_level=3
"""Low-level drivers of the norm, clipping and accumulation passes (see oc_norms.h).

Arguments are trusted: ``optcore.clip``, ``optcore.kernels`` and ``optcore.optim`` validate
before calling. The GIL is released while a kernel runs.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t

from optcore._kernels._runtime cimport (
    OC_MAX_SLOTS, TensorList, exec_begin, exec_end, oc_exec, oc_list,
)

cdef extern from "oc_norms.h" nogil:
    enum: OC_NORM_BLOCK
    ctypedef struct oc_units:
        int64_t nunits
        const int64_t *tensor
        const int64_t *start
        const int64_t *len
    void oc_norms_run(const oc_list *L, int sa, int sb, double *csq, float *cmax,
                      double *tsq, double *tmax, const oc_exec *ex)
    enum: OC_PNORM_POW
    enum: OC_PNORM_ABS
    enum: OC_PNORM_COUNT
    enum: OC_PNORM_MIN
    void oc_pnorm_run(const oc_list *L, int s, int mode, double p, double *cpart,
                      double *tpart, const oc_exec *ex)
    void oc_scale_run(const oc_list *L, int s, float scale, const float *ts, const oc_exec *ex)
    void oc_clamp_run(const oc_list *L, int s, float limit, float *cmax, unsigned char *cnan,
                      const oc_exec *ex)
    void oc_accum_run(const oc_list *L, int src, int dst, int first, const oc_exec *ex)
    void oc_unit_sumsq_run(const oc_list *L, int s, const oc_units *U, double *out,
                           const oc_exec *ex)
    void oc_unit_scale_run(const oc_list *L, int s, const oc_units *U, const float *f,
                           const oc_exec *ex)

cdef extern from "oc_lowp.h" nogil:
    enum: OC_F32, OC_BF16, OC_F16

cdef extern from "numpy/arrayobject.h":
    enum: NPY_HALF, NPY_USERDEF  # type numbers numpy's .pxd does not declare

NORM_BLOCK = OC_NORM_BLOCK

cnp.import_array()


cdef void _need_slot(TensorList tl, int slot) except *:
    if not 0 <= slot < OC_MAX_SLOTS or tl.c.slots[slot] == NULL:
        raise ValueError(f"slot {slot} is not set")


cdef inline void *_ptr(a):
    return <void *> <uintptr_t> a.ctypes.data


def sumsq(TensorList tl, int slot=1, int slot2=-1):
    """One read pass over slot ``slot`` (read as ``slot + slot2`` when ``slot2 >= 0``).

    Returns ``(tensor_sumsq, tensor_maxabs)``: float64 arrays with one entry per tensor (the
    max is NaN where the sum is NaN). Bitwise independent of the thread count.
    """
    _need_slot(tl, slot)
    if slot2 >= 0:
        _need_slot(tl, slot2)
    nchunks = tl.c.nchunks
    csq = np.empty(max(nchunks, 1), dtype=np.float64)
    cmax = np.empty(max(nchunks, 1), dtype=np.float32)
    tsq = np.empty(tl.ntensors, dtype=np.float64)
    tmax = np.empty(tl.ntensors, dtype=np.float64)
    cdef double *pcsq = <double *> _ptr(csq)
    cdef float *pcmax = <float *> _ptr(cmax)
    cdef double *ptsq = <double *> _ptr(tsq)
    cdef double *ptmax = <double *> _ptr(tmax)
    cdef oc_exec ex = exec_begin(tl.total)
    ex.ftz = 0  # subnormal gradients count; flushing them is for the update kernels only
    with nogil:
        oc_norms_run(&tl.c, slot, slot2, pcsq, pcmax, ptsq, ptmax, &ex)
    exec_end(ex)
    return tsq, tmax


def pnorm_parts(TensorList tl, int slot, double p):
    """One read pass over slot ``slot`` for a p-norm other than 2 and inf.

    Returns one float64 per tensor: the sum of ``|x|**p`` (``p`` finite, not 0 or 2), the
    count of nonzero elements (``p == 0``) or the minimum of ``|x|`` (``p == -inf``; +inf for
    an empty tensor). NaN propagates. Bitwise independent of the thread count.
    """
    _need_slot(tl, slot)
    cdef int mode
    if p == 0.0:
        mode = OC_PNORM_COUNT
    elif p == 1.0:
        mode = OC_PNORM_ABS
    elif p == -np.inf:
        mode = OC_PNORM_MIN
    elif np.isfinite(p) and p != 2.0:
        mode = OC_PNORM_POW
    else:
        raise ValueError(f"pnorm_parts takes a finite p other than 2, or -inf; got {p}")
    cpart = np.empty(max(tl.c.nchunks, 1), dtype=np.float64)
    tpart = np.empty(max(tl.ntensors, 1), dtype=np.float64)
    cdef double *pc = <double *> _ptr(cpart)
    cdef double *pt = <double *> _ptr(tpart)
    cdef oc_exec ex = exec_begin(tl.total)
    ex.ftz = 0
    with nogil:
        oc_pnorm_run(&tl.c, slot, mode, p, pc, pt, &ex)
    exec_end(ex)
    return tpart[:tl.ntensors]


def scale(TensorList tl, int slot, double factor, tensor_scale=None):
    """``x *= factor * tensor_scale[t]`` in place (``tensor_scale``: float32, one per tensor)."""
    _need_slot(tl, slot)
    cdef const float *ts = NULL
    if tensor_scale is not None:
        ts = <const float *> _ptr(tensor_scale)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_scale_run(&tl.c, slot, <float> factor, ts, &ex)
    exec_end(ex)


def clamp(TensorList tl, int slot, double limit):
    """``x = clip(x, -limit, limit)`` in place; returns max |x| before (NaN if any NaN)."""
    _need_slot(tl, slot)
    nchunks = tl.c.nchunks
    cmax = np.zeros(max(nchunks, 1), dtype=np.float32)
    cnan = np.zeros(max(nchunks, 1), dtype=np.uint8)
    cdef float *pcmax = <float *> _ptr(cmax)
    cdef unsigned char *pcnan = <unsigned char *> _ptr(cnan)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_clamp_run(&tl.c, slot, <float> limit, pcmax, pcnan, &ex)
    exec_end(ex)
    if nchunks == 0:
        return 0.0
    if cnan[:nchunks].any():
        return float("nan")
    return float(cmax[:nchunks].max())


def accumulate(TensorList tl, int src, int dst, bint first):
    """Gradient accumulation: ``dst = src`` when ``first``, else ``dst += src``."""
    _need_slot(tl, src)
    _need_slot(tl, dst)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_accum_run(&tl.c, src, dst, first, &ex)
    exec_end(ex)


cdef oc_units _units(tensor, start, length):
    cdef oc_units U
    U.nunits = tensor.size
    U.tensor = <const int64_t *> _ptr(tensor)
    U.start = <const int64_t *> _ptr(start)
    U.len = <const int64_t *> _ptr(length)
    return U


def unit_sumsq(TensorList tl, int slot, tensor, start, length):
    """Sum of squares (float64) of every unit (int64 arrays ``tensor``, ``start``, ``length``)."""
    _need_slot(tl, slot)
    out = np.empty(max(tensor.size, 1), dtype=np.float64)
    cdef oc_units U = _units(tensor, start, length)
    cdef double *pout = <double *> _ptr(out)
    cdef oc_exec ex = exec_begin(tl.total)
    ex.ftz = 0
    with nogil:
        oc_unit_sumsq_run(&tl.c, slot, &U, pout, &ex)
    exec_end(ex)
    return out[:tensor.size]


def unit_scale(TensorList tl, int slot, tensor, start, length, factors):
    """``x *= factors[u]`` over every unit ``u`` (``factors``: float32, one per unit)."""
    _need_slot(tl, slot)
    cdef oc_units U = _units(tensor, start, length)
    cdef const float *pf = <const float *> _ptr(factors)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_unit_scale_run(&tl.c, slot, &U, pf, &ex)
    exec_end(ex)


cdef int _bf16_num = -1  # NumPy's type number of ml_dtypes.bfloat16, once one is seen


cdef inline int _format(cnp.ndarray a, bint half) except -2:
    """The kernel format of ``a``'s dtype (float32, or with ``half`` also float16 and
    bfloat16, in native byte order), or -1."""
    global _bf16_num
    cdef cnp.dtype d = a.descr
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return -1
    if d.type_num == cnp.NPY_FLOAT:
        return OC_F32
    if not half:
        return -1
    if d.type_num == NPY_HALF:
        return OC_F16
    if d.type_num == _bf16_num:
        return OC_BF16
    # A user-defined dtype (ml_dtypes registers bfloat16 at import): known by its name, as
    # optcore._checks knows it; its number is then fixed for the life of the process.
    if (_bf16_num < 0 and d.type_num >= NPY_USERDEF and d.itemsize == 2
            and (<object> d).name == "bfloat16"):
        _bf16_num = d.type_num
        return OC_BF16
    return -1


def buffers(arrays, bint writeable, bint half=False):
    """Fast check of a list of arrays through the NumPy C API (a few tens of ns each).

    Returns ``(addresses, lengths, nbytes, formats, bad)``: per array its data address
    (uint64), element count and size in bytes (int64); ``formats`` the kernel format of each
    (uint8 codes of oc_lowp.h), or None when all are float32; and the index of the first entry
    that is not an aligned, C-contiguous ndarray of float32 (or, with ``half``, bfloat16 or
    float16) in native byte order, writeable when asked, or -1. The arrays before ``bad`` are
    filled in. The caller re-checks ``arrays[bad]`` with ``optcore._checks`` to raise the
    precise error.
    """
    cdef Py_ssize_t i, n = len(arrays)
    cdef cnp.ndarray a
    cdef int kind
    cdef bint any_half = False
    addr = np.zeros(n, dtype=np.uint64)
    length = np.zeros(n, dtype=np.int64)
    size = np.zeros(n, dtype=np.int64)
    kinds = np.zeros(n, dtype=np.uint8)
    cdef uint64_t[::1] av = addr
    cdef int64_t[::1] lv = length
    cdef int64_t[::1] sv = size
    cdef uint8_t[::1] kv = kinds
    for i in range(n):
        x = arrays[i]
        if not cnp.PyArray_Check(x):
            return addr, length, size, kinds if any_half else None, i
        a = <cnp.ndarray> x
        kind = _format(a, half)
        if (kind < 0 or not cnp.PyArray_IS_C_CONTIGUOUS(a)
                or (writeable and not cnp.PyArray_ISWRITEABLE(a)) or not cnp.PyArray_ISALIGNED(a)):
            return addr, length, size, kinds if any_half else None, i
        av[i] = <uint64_t> <uintptr_t> cnp.PyArray_DATA(a)
        lv[i] = cnp.PyArray_SIZE(a)
        sv[i] = cnp.PyArray_NBYTES(a)
        kv[i] = kind
        any_half |= kind != OC_F32
    return addr, length, size, kinds if any_half else None, -1
