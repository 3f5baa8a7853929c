# cython: language_level=3
"""Low-level drivers of the fused optimizer updates (see oc_optim.h).

Each function runs one rule over a validated :class:`TensorList` (slots: param, grad,
accumulator, state...). Arguments are trusted: ``optcore.kernels`` and ``optcore.optim``
validate before calling. The GIL is released while the kernel runs.
"""
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uintptr_t

from optcore._kernels._runtime cimport (
    OC_MAX_SLOTS, TensorList, exec_begin, exec_end, oc_exec, oc_list,
)

cdef extern from "oc_optim.h" nogil:
    ctypedef struct oc_gradopts:
        float scale
        const float *tensor_scale
        float clamp
        float weight_decay
        float decay
        float l1_thresh
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
        self.c.tensor_scale = NULL
        if tensor_scale is not None:
            self.c.tensor_scale = <const float *> <uintptr_t> tensor_scale.ctypes.data


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
