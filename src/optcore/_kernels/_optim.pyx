# cython: language_level=3
"""Low-level drivers of the fused optimizer updates (see oc_optim.h).

Each function runs one rule over a validated :class:`TensorList` (slots: param, grad,
accumulator, state...). Arguments are trusted: ``optcore.kernels`` and ``optcore.optim``
validate before calling. The GIL is released while the kernel runs.
"""
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uintptr_t

import numpy as np

from optcore._kernels._runtime cimport (
    OC_MAX_SLOTS, TensorList, exec_begin, exec_end, oc_exec, oc_list,
)

cdef extern from "oc_optim.h" nogil:
    int oc_bf16_pairs_on
    ctypedef struct oc_gradopts:
        float scale
        const float *tensor_scale
        float clamp
        float weight_decay
        float decay
        float l1_thresh
        uint32_t rng_key
        int param_sr
    ctypedef struct oc_sgd_h:
        float lr, momentum, dampening_c
        int nesterov, first
    ctypedef struct oc_adagrad_h:
        float clr, eps
    ctypedef struct oc_rmsprop_h:
        float lr, alpha, alpha_c, eps, momentum
        int centered
    ctypedef struct oc_adam_h:
        float step_size, beta1, beta1_c, beta2, beta2_c, bc2_sqrt, eps
    ctypedef struct oc_adamax_h:
        float clr, beta1, beta1_c, beta2, eps
    ctypedef struct oc_nadam_h:
        float coef_g, coef_m, beta1, beta1_c, beta2, beta2_c, bc2, eps
    void oc_sgd_run(const oc_list *L, const oc_gradopts *o, const oc_sgd_h *h, const oc_exec *ex)
    void oc_adagrad_run(const oc_list *L, const oc_gradopts *o, const oc_adagrad_h *h, const oc_exec *ex)
    void oc_rmsprop_run(const oc_list *L, const oc_gradopts *o, const oc_rmsprop_h *h, const oc_exec *ex)
    void oc_adam_run(const oc_list *L, const oc_gradopts *o, const oc_adam_h *h, const oc_exec *ex)
    void oc_adamax_run(const oc_list *L, const oc_gradopts *o, const oc_adamax_h *h, const oc_exec *ex)
    void oc_nadam_run(const oc_list *L, const oc_gradopts *o, const oc_nadam_h *h, const oc_exec *ex)
    void oc_fill_run(const oc_list *L, int s, float value, const oc_exec *ex)


cdef extern from "oc_lowp.h" nogil:
    enum: OC_F32, OC_BF16, OC_Q8S, OC_Q8U, OC_F16, OC_Q8_BLOCK
    ctypedef struct oc_q8_code:
        float value[256]
    oc_q8_code oc_q8_codes[2]
    void oc_q8_init()
    int oc_q8_simd
    uint32_t oc_rng_key(uint32_t seed, uint32_t step)
    uint32_t oc_rng_base(uint32_t key, int64_t tensor, int slot)
    ctypedef struct oc_lp_slot:
        void *data
        float *absmax
        int kind
        uint32_t base
    void oc_lp_store(const oc_lp_slot *s, const float *src, int64_t off, int64_t n,
                     const uint32_t *r, int shift)
    void oc_lp_store_sr(const oc_lp_slot *s, const float *src, int64_t off, int64_t n,
                        int64_t first)
    void oc_lp_load(float *dst, const oc_lp_slot *s, int64_t off, int64_t n)

oc_q8_init()
_Q8_SIMD_CPU = bool(oc_q8_simd)

# Element formats of a slot (TensorList.set_slot_format).
F32, BF16, Q8S, Q8U, F16 = OC_F32, OC_BF16, OC_Q8S, OC_Q8U, OC_F16
Q8_BLOCK = OC_Q8_BLOCK


def q8_simd(enabled=None):
    """Whether the 8-bit loops run their AVX-512 versions (full blocks, on CPUs with
    AVX-512F); ``enabled`` switches them (off: the portable loops, same results), for tests."""
    global oc_q8_simd
    was = bool(oc_q8_simd)
    if enabled is not None:
        oc_q8_simd = 1 if enabled and _Q8_SIMD_CPU else 0
    return was


def bf16_pairs(enabled=None):
    """Whether Adam on bfloat16 parameters, gradients and state runs two elements per 32-bit
    word (oc_adam_bf16_pairs); ``enabled`` switches it (off: the one-element loop, same
    results), for tests."""
    global oc_bf16_pairs_on
    was = bool(oc_bf16_pairs_on)
    if enabled is not None:
        oc_bf16_pairs_on = 1 if enabled else 0
    return was


def q8_code(bint signed):
    """The 256 values of the 8-bit dynamic code (float32), indexed by the stored byte."""
    return np.array([oc_q8_codes[1 if signed else 0].value[b] for b in range(256)], dtype=np.float32)


cdef oc_lp_slot _slot(const void *data, const float *absmax, int kind) noexcept nogil:
    """A slot of format ``kind`` over one flat buffer (read-only ones are only read)."""
    cdef oc_lp_slot sl
    sl.data = <void *> data
    sl.absmax = <float *> absmax
    sl.kind = kind
    sl.base = 0
    return sl


cdef oc_lp_slot _q8_slot(const uint8_t[::1] codes, const float[::1] absmax, bint signed) noexcept:
    return _slot(&codes[0] if codes.shape[0] else NULL,
                 &absmax[0] if absmax.shape[0] else NULL, OC_Q8S if signed else OC_Q8U)


def q8_quantize(const float[::1] x, uint8_t[::1] codes, float[::1] absmax, bint signed):
    """Quantize ``x`` block-wise into ``codes`` (one byte per element) and ``absmax`` (one
    float32 per block of Q8_BLOCK elements), with the update kernels' own encoder; sizes are
    the caller's job."""
    cdef oc_lp_slot sl = _q8_slot(codes, absmax, signed)
    if x.shape[0]:
        with nogil:
            oc_lp_store(&sl, &x[0], 0, x.shape[0], NULL, 0)


def q8_dequantize(const uint8_t[::1] codes, const float[::1] absmax, float[::1] out, bint signed):
    """The inverse of :func:`q8_quantize`: ``out[i] = code[codes[i]] * absmax[block]``."""
    cdef oc_lp_slot sl = _q8_slot(codes, absmax, signed)
    if out.shape[0]:
        with nogil:
            oc_lp_load(&out[0], &sl, 0, out.shape[0])


def half_decode(const uint16_t[::1] bits, float[::1] out, int kind):
    """16-bit floats (``kind`` BF16 or F16, as uint16 bits) to float32, exactly, with the
    kernels' own conversion."""
    cdef oc_lp_slot sl = _slot(&bits[0] if bits.shape[0] else NULL, NULL, _half_kind(kind))
    if out.shape[0]:
        with nogil:
            oc_lp_load(&out[0], &sl, 0, out.shape[0])


def half_encode(const float[::1] x, uint16_t[::1] bits, int kind, seed=None):
    """float32 to 16-bit floats (``kind`` BF16 or F16, as uint16 bits) with the kernels' own
    conversion: rounded to nearest even, or, given ``seed``, stochastically with the random
    bits the update kernels draw for tensor 0, slot 0 at step 0 of that seed."""
    cdef oc_lp_slot sl = _slot(&bits[0] if bits.shape[0] else NULL, NULL, _half_kind(kind))
    cdef int stochastic = seed is not None
    if stochastic:
        sl.base = oc_rng_base(oc_rng_key(<uint32_t> (seed & 0xffffffff), 0), 0, 0)
    if x.shape[0] and stochastic:
        with nogil:
            oc_lp_store_sr(&sl, &x[0], 0, x.shape[0], 0)
    elif x.shape[0]:
        with nogil:
            oc_lp_store(&sl, &x[0], 0, x.shape[0], NULL, 0)


cdef int _half_kind(int kind) except -1:
    if kind != OC_BF16 and kind != OC_F16:
        raise ValueError(f"kind must be BF16 ({OC_BF16}) or F16 ({OC_F16}), got {kind}")
    return kind


cdef class GradOpts:
    """How the gradient is read by an update: ``g = clamp((grad + acc) * scale * tensor_scale,
    +-clamp) + weight_decay * p``; then ``p *= decay``; after the rule, L1 soft threshold."""
    cdef oc_gradopts c
    cdef object _tensor_scale

    def __init__(self, double scale=1.0, tensor_scale=None, double clamp=INFINITY,
                 double weight_decay=0.0, double decay=1.0, double l1_thresh=0.0):
        self.c.scale = <float> scale
        self.c.clamp = <float> clamp
        self.c.weight_decay = <float> weight_decay
        self.c.decay = <float> decay
        self.c.l1_thresh = <float> l1_thresh
        self._tensor_scale = tensor_scale
        self.c.rng_key = 0
        self.c.param_sr = 0
        self.c.tensor_scale = NULL
        if tensor_scale is not None:
            self.c.tensor_scale = <const float *> <uintptr_t> tensor_scale.ctypes.data

    def set_rounding(self, seed, step, bint param_sr):
        """Key the stochastic rounding of this update by ``(seed, step)`` (taken mod 2**32);
        ``param_sr``: round a bfloat16 parameter stochastically rather than to nearest."""
        self.c.rng_key = oc_rng_key(<uint32_t> (seed & 0xffffffff), <uint32_t> (step & 0xffffffff))
        self.c.param_sr = param_sr


def sgd(TensorList tl, GradOpts go, double lr, double momentum, double dampening,
        bint nesterov, bint first):
    cdef oc_sgd_h h
    h.lr = <float> lr
    h.momentum = <float> momentum
    h.dampening_c = <float> (1.0 - dampening)
    h.nesterov = nesterov
    h.first = first
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_sgd_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def adagrad(TensorList tl, GradOpts go, double clr, double eps):
    cdef oc_adagrad_h h
    h.clr = <float> clr
    h.eps = <float> eps
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_adagrad_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def rmsprop(TensorList tl, GradOpts go, double lr, double alpha, double eps, double momentum,
            bint centered):
    cdef oc_rmsprop_h h
    h.lr = <float> lr
    h.alpha = <float> alpha
    h.alpha_c = <float> (1.0 - alpha)
    h.eps = <float> eps
    h.momentum = <float> momentum
    h.centered = centered
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_rmsprop_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def adam(TensorList tl, GradOpts go, double step_size, double beta1, double beta2,
         double bc2_sqrt, double eps):
    cdef oc_adam_h h
    h.step_size = <float> step_size
    h.beta1 = <float> beta1
    h.beta1_c = <float> (1.0 - beta1)
    h.beta2 = <float> beta2
    h.beta2_c = <float> (1.0 - beta2)
    h.bc2_sqrt = <float> bc2_sqrt
    h.eps = <float> eps
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_adam_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def adamax(TensorList tl, GradOpts go, double clr, double beta1, double beta2, double eps):
    cdef oc_adamax_h h
    h.clr = <float> clr
    h.beta1 = <float> beta1
    h.beta1_c = <float> (1.0 - beta1)
    h.beta2 = <float> beta2
    h.eps = <float> eps
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_adamax_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def nadam(TensorList tl, GradOpts go, double coef_g, double coef_m, double beta1, double beta2,
          double bc2, double eps):
    cdef oc_nadam_h h
    h.coef_g = <float> coef_g
    h.coef_m = <float> coef_m
    h.beta1 = <float> beta1
    h.beta1_c = <float> (1.0 - beta1)
    h.beta2 = <float> beta2
    h.beta2_c = <float> (1.0 - beta2)
    h.bc2 = <float> bc2
    h.eps = <float> eps
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_nadam_run(&tl.c, &go.c, &h, &ex)
    exec_end(ex)


def fill(TensorList tl, int slot, double value):
    """Set slot ``slot`` of every tensor in ``tl`` to ``value``."""
    if not 0 <= slot < OC_MAX_SLOTS or tl.c.slots[slot] == NULL:
        raise ValueError(f"slot {slot} is not set")
    cdef oc_exec ex = exec_begin(tl.total)
    with nogil:
        oc_fill_run(&tl.c, slot, <float> value, &ex)
    exec_end(ex)
