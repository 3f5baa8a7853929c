# cython: language_level=3
"""Low-level drivers of the parameter transforms (see oc_transforms.h): the exponential moving
average of the parameters, the in-place exchange of two buffers, the max-norm constraint.

Arguments are trusted: ``optcore.kernels``, ``optcore.ema`` and ``optcore.constraints``
validate before calling. The GIL is released while the kernel runs.
"""
from libc.stdint cimport int64_t

import numpy as np

from optcore._kernels._runtime cimport TensorList, exec_begin, exec_end, oc_exec, oc_list

cdef extern from "oc_transforms.h" nogil:
    void oc_ema_run(const oc_list *L, float d, float dc, const oc_exec *ex)
    void oc_swap_run(const oc_list *L, const oc_exec *ex)
    void oc_maxnorm_rows(float *w, int64_t units, int64_t k, double max_value, const oc_exec *ex)
    void oc_maxnorm_cols(float *w, int64_t k, int64_t units, double max_value, double *scratch,
                         const oc_exec *ex)


def ema(TensorList tl, double decay):
    """Slot 0 (average) = decay * slot 0 + (1 - decay) * slot 1 (parameter), in float32 with
    ``1 - decay`` computed in float64."""
    cdef float d = <float> decay
    cdef float dc = <float> (1.0 - decay)
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_ema_run(&tl.c, d, dc, &ex)
    exec_end(ex)


def swap(TensorList tl):
    """Exchange the contents of slots 0 and 1, element by element."""
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_swap_run(&tl.c, &ex)
    exec_end(ex)


def max_norm(w, int64_t units, int64_t k, bint rows, double max_value):
    """Rescale the units of ``w`` (C-contiguous float32, ``units * k`` elements) whose L2 norm
    exceeds ``max_value``. ``rows``: w is (units, k); else w is (k, units)."""
    cdef float[::1] flat = w.reshape(-1)
    cdef double[::1] scratch
    cdef float *ptr = &flat[0]
    cdef double *sp = NULL
    if not rows:
        scratch = np.empty(units, dtype=np.float64)
        sp = &scratch[0]
    cdef oc_exec ex = exec_begin(units * k)
    with nogil:
        if rows:
            oc_maxnorm_rows(ptr, units, k, max_value, &ex)
        else:
            oc_maxnorm_cols(ptr, k, units, max_value, sp, &ex)
    exec_end(ex)
