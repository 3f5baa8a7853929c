# Declarations shared by the kernel families: the C conventions of oc_common.h, the execution
# settings handed to every kernel, and the tensor table that multi-tensor kernels walk.
from libc.stdint cimport int64_t, uint8_t

cdef extern from "oc_common.h" nogil:
    enum: OC_CHUNK
    enum: OC_MAX_SLOTS
    ctypedef struct oc_exec:
        int nthreads
        int ftz
    ctypedef struct oc_list:
        int64_t ntensors
        int64_t nchunks
        int64_t total
        const int64_t *lengths
        const int64_t *chunk_tensor
        const int64_t *chunk_start
        void **slots[OC_MAX_SLOTS]
        const uint8_t *kinds[OC_MAX_SLOTS]
        float **absmax[OC_MAX_SLOTS]


cdef oc_exec exec_begin(int64_t total) noexcept nogil
cdef void exec_end(oc_exec ex) noexcept nogil


cdef class TensorList:
    cdef oc_list c
    cdef readonly int64_t ntensors
    cdef readonly int64_t total
    cdef readonly object lengths
    cdef object _chunk_tensor
    cdef object _chunk_start
    cdef list _tables
    cdef list _formats
    cdef list _refs
    cdef _layout(self, lengths)
    cdef _set(self, Py_ssize_t s, arrays)
