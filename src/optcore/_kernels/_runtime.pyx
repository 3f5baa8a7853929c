# cython: language_level=3
"""Thread control, run-time configuration and the tensor table shared by all kernel families."""
import os

import numpy as np

from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint64_t, uintptr_t

cdef extern from "oc_runtime.h" nogil:
    int oc_openmp_enabled()
    int oc_openmp_version()
    int oc_omp_max_threads()
    int oc_num_procs()
    int oc_ftz_supported()
    const char *oc_isa()
    int oc_isa_dispatch()

    int oc_requested_threads
    int oc_flush_denormal
    int oc_thread_budget()
    oc_exec oc_exec_begin(int64_t total)
    void oc_exec_end(oc_exec ex)
    int oc_claimed_now()


cdef oc_exec exec_begin(int64_t total) noexcept nogil:
    """Claim threads (and the flush-to-zero mode) for one kernel call over ``total`` elements."""
    return oc_exec_begin(total)


cdef void exec_end(oc_exec ex) noexcept nogil:
    """Give back the threads claimed by :func:`exec_begin`."""
    oc_exec_end(ex)


def set_num_threads(n):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int or None
        A positive count, or ``None`` to follow the OpenMP runtime again (``OMP_NUM_THREADS``,
        or a limit set through threadpoolctl).

    Notes
    -----
    Results do not depend on this setting: work is cut into fixed chunks and reductions are
    combined in a fixed order, so 1 and N threads give bitwise identical results.
    """
    global oc_requested_threads
    if n is None:
        oc_requested_threads = 0
        return
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be a positive int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    oc_requested_threads = int(n)


def get_num_threads():
    """Return the number of threads a large kernel call will use (1 without OpenMP)."""
    if not oc_openmp_enabled():
        return 1
    return oc_thread_budget()


def set_flush_denormal(enabled):
    """Flush denormal floats to zero inside the kernels (default off).

    With vanishing gradients, optimizer state such as Adam's second moment decays into
    denormal numbers, which the CPU handles up to ~30x slower. When enabled, each kernel thread
    sets flush-to-zero and denormals-are-zero for the duration of the kernel and restores its
    previous mode afterwards; the rest of the process is unaffected.

    Parameters
    ----------
    enabled : bool

    Returns
    -------
    bool
        Whether the CPU supports it (x86-64); on other CPUs the call changes nothing and
        returns False, as ``torch.set_flush_denormal`` does.
    """
    global oc_flush_denormal
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if not oc_ftz_supported():
        oc_flush_denormal = 0
        return False
    oc_flush_denormal = 1 if enabled else 0
    return True


def _claimed_threads():
    """Threads held by kernels running right now (0 when none runs); for tests."""
    return int(oc_claimed_now())


def get_flush_denormal():
    """Return whether the kernels flush denormals to zero."""
    return bool(oc_flush_denormal)


def build_info():
    """Return a dict describing the compiled kernels and the machine they run on."""
    return {
        "openmp": bool(oc_openmp_enabled()),
        "openmp_version": int(oc_openmp_version()),
        "isa": oc_isa().decode(),
        "isa_dispatch": bool(oc_isa_dispatch()),
        "num_threads": get_num_threads(),
        "num_procs": int(oc_num_procs()) if oc_openmp_enabled() else (os.cpu_count() or 1),
        "flush_denormal": bool(oc_flush_denormal),
        "chunk": int(OC_CHUNK),
    }


cdef class TensorList:
    """A table of tensors for the multi-tensor kernels (built once, used every step).

    ``slots`` is a sequence of up to OC_MAX_SLOTS entries; each entry is a sequence of
    float32 C-contiguous arrays (one per tensor, all slots with the same sizes) or None for an
    unused optional buffer. Validation is the caller's job (``optcore._checks``): this class
    only records addresses and keeps the arrays alive.
    """

    def __init__(self, slots):
        cdef Py_ssize_t s, nslots = len(slots)
        if nslots > OC_MAX_SLOTS:
            raise ValueError(f"at most {OC_MAX_SLOTS} slots, got {nslots}")
        self._layout(np.array([a.size for a in slots[0]], dtype=np.int64))
        self._refs = [list(x) if x is not None else None for x in slots]
        for s in range(nslots):
            self._set(s, slots[s])

    @classmethod
    def from_addresses(cls, lengths, addresses, refs):
        """A table over raw addresses (e.g. ``torch.Tensor.data_ptr()``), built without the
        buffer protocol.

        ``lengths`` holds the element count of every tensor; ``addresses`` is a sequence of up
        to OC_MAX_SLOTS entries, each a uint64 array of one address per tensor or None.
        ``refs`` is kept alive as long as the table: it must own every addressed buffer.
        Validation (dtype float32, dense, same layout in every slot) is the caller's job.
        """
        cdef TensorList self = cls.__new__(cls)
        cdef Py_ssize_t s, nslots = len(addresses)
        if nslots > OC_MAX_SLOTS:
            raise ValueError(f"at most {OC_MAX_SLOTS} slots, got {nslots}")
        self._layout(np.ascontiguousarray(lengths, dtype=np.int64))
        self._refs = [refs]
        for s in range(nslots):
            self.set_slot_addresses(s, addresses[s], None)
        return self

    cdef _layout(self, lengths):
        """Record the tensor lengths and cut them into fixed chunks; every slot starts unset."""
        self._tables = [None] * OC_MAX_SLOTS
        self._formats = [None] * OC_MAX_SLOTS
        self.ntensors = lengths.size
        self.lengths = lengths
        self.total = int(lengths.sum()) if self.ntensors else 0
        nchunks_per = (lengths + (OC_CHUNK - 1)) // OC_CHUNK
        chunk_tensor = np.repeat(np.arange(self.ntensors, dtype=np.int64), nchunks_per)
        first_chunk = np.cumsum(nchunks_per) - nchunks_per
        chunk_start = (np.arange(chunk_tensor.size, dtype=np.int64)
                       - np.repeat(first_chunk, nchunks_per)) * OC_CHUNK
        self._chunk_tensor = chunk_tensor
        self._chunk_start = chunk_start
        self.c.ntensors = self.ntensors
        self.c.nchunks = chunk_tensor.size
        self.c.total = self.total
        self.c.lengths = _int64_ptr(lengths)
        self.c.chunk_tensor = _int64_ptr(chunk_tensor)
        self.c.chunk_start = _int64_ptr(chunk_start)
        for s in range(OC_MAX_SLOTS):
            self.c.slots[s] = NULL
            self.c.kinds[s] = NULL
            self.c.absmax[s] = NULL

    cdef _set(self, Py_ssize_t s, arrays):
        if arrays is None:
            self.c.slots[s] = NULL
            return
        # The buffer protocol gives each address in ~0.1 us (ndarray.ctypes.data takes ~3 us,
        # which dominated building a table of 1000 small tensors).
        cdef Py_ssize_t i, n = len(arrays)
        cdef Py_buffer view
        table = np.zeros(max(n, 1), dtype=np.uint64)
        cdef uint64_t[::1] tv = table
        for i in range(n):
            PyObject_GetBuffer(arrays[i], &view, PyBUF_ANY_CONTIGUOUS)
            tv[i] = <uint64_t> <uintptr_t> view.buf
            PyBuffer_Release(&view)
        self._tables[s] = table
        self.c.slots[s] = <void **> <uintptr_t> table.ctypes.data

    def set_slot(self, Py_ssize_t s, arrays):
        """Point slot ``s`` at ``arrays`` (validated by the caller), or clear it with None."""
        if not 0 <= s < OC_MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {OC_MAX_SLOTS}), got {s}")
        self._refs.extend([None] * (s + 1 - len(self._refs)))
        self._refs[s] = list(arrays) if arrays is not None else None
        self._set(s, arrays)

    def set_slot_addresses(self, Py_ssize_t s, addresses, refs):
        """Point slot ``s`` at raw addresses: a uint64 array with one address per tensor
        (validated by the caller), or None to clear it. ``refs`` must own those buffers; it is
        kept alive as long as the slot points at them."""
        if not 0 <= s < OC_MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {OC_MAX_SLOTS}), got {s}")
        self._refs.extend([None] * (s + 1 - len(self._refs)))
        self._refs[s] = refs
        if addresses is None:
            self.c.slots[s] = NULL
            return
        table = np.ascontiguousarray(addresses, dtype=np.uint64)
        if table.shape != (self.ntensors,):
            raise ValueError(f"slot {s} needs {self.ntensors} addresses, got shape {table.shape}")
        if self.ntensors == 0:
            table = np.zeros(1, dtype=np.uint64)
        self._tables[s] = table
        self.c.slots[s] = <void **> <uintptr_t> table.ctypes.data

    def set_slot_format(self, Py_ssize_t s, kinds, absmax=None):
        """Give slot ``s`` per-tensor element formats (``kinds``: uint8, one per tensor, codes
        of oc_lowp.h; None: all float32) and, for 8-bit formats, the per-block absmax arrays
        (float32, ``ceil(length / 256)`` each; None for the other tensors). The slot's arrays
        must be of those formats (the caller validates)."""
        if not 0 <= s < OC_MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {OC_MAX_SLOTS}), got {s}")
        if kinds is None:
            self.c.kinds[s] = NULL
            self.c.absmax[s] = NULL
            self._formats[s] = None
            return
        k = np.ascontiguousarray(kinds, dtype=np.uint8)
        if k.shape != (self.ntensors,):
            raise ValueError(f"slot {s} needs {self.ntensors} formats, got shape {k.shape}")
        k = k if self.ntensors else np.zeros(1, dtype=np.uint8)
        cdef Py_ssize_t i
        cdef Py_buffer view
        table = np.zeros(max(self.ntensors, 1), dtype=np.uint64)
        cdef uint64_t[::1] tv = table
        if absmax is not None:
            for i in range(self.ntensors):
                if absmax[i] is not None:
                    PyObject_GetBuffer(absmax[i], &view, PyBUF_ANY_CONTIGUOUS)
                    tv[i] = <uint64_t> <uintptr_t> view.buf
                    PyBuffer_Release(&view)
        self._formats[s] = (k, table, absmax)
        self.c.kinds[s] = <const uint8_t *> <uintptr_t> k.ctypes.data
        self.c.absmax[s] = <float **> <uintptr_t> table.ctypes.data

    @property
    def nchunks(self):
        return int(self.c.nchunks)


cdef const int64_t *_int64_ptr(a):
    return <const int64_t *> <uintptr_t> a.ctypes.data
