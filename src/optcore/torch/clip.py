r"""``torch.nn.utils`` gradient clipping on optcore's kernels: one call over all tensors.

:func:`clip_grad_norm_`, :func:`clip_grad_value_`, :func:`get_total_norm` and
:func:`clip_grads_with_norm_` take torch's arguments and return what torch returns, but read
(and scale or clamp) every gradient in one multi-tensor kernel call instead of one torch op
per tensor, accumulate in float64 and give bitwise the same result for any thread count.

Differences from torch, all on purpose:

- The norm is accumulated in float64 (torch sums each tensor in float32, then combines the
  per-tensor norms), so the two differ by float32 rounding, a few units in the last place.
- Only dense float32, bfloat16 or float16 CPU tensors are accepted (contiguous,
  channels_last or any permutation of dimensions); another dtype, a sparse or non-dense
  tensor, or two gradients that share memory raise TypeError/ValueError naming the tensor,
  before anything is written. 16-bit gradients are read widened exactly to float32 (the
  norm of a bfloat16 gradient is accumulated in float64 from its exact values, then rounded
  once to the returned dtype, where torch rounds each tensor's norm first), and scaled or
  clamped in float32 and rounded back to nearest even, as torch's own ``mul_`` and
  ``clamp_`` on those dtypes do. So does a
  NaN or negative ``max_norm`` or ``clip_value``, or a NaN ``norm_type``, which torch would
  apply (scaling the gradients by a NaN or negative factor).
- ``foreach`` is accepted and ignored: there is only one path.

What makes the Python part cheap: the kernel table (addresses and lengths of the gradients)
is cached and reused while the same gradient objects sit at the same addresses; it is
rebuilt, with every check, when any of them is new, was freed or moved.
"""
import math
import operator
import types
import warnings
import weakref

import numpy as np
import torch

from optcore import _checks as ck
from optcore import _lowp
from optcore import clip as _clip
from optcore._kernels import _norms
from optcore._kernels._runtime import TensorList
from optcore.torch import _tensors as tt

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]

_grad = operator.attrgetter("grad")
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_increment_version = torch.autograd.graph.increment_version
_F32 = torch.float32
_STRIDED = torch.strided
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FORMAT = {torch.float32: _lowp.FORMATS["float32"], torch.bfloat16: _lowp.FORMATS["bfloat16"],
           torch.float16: _lowp.FORMATS["float16"]}
_CACHE_SIZE = 8


class _Table:
    """The kernel table over one list of gradients, with what proves it still applies: the
    ids of the gradient objects, their addresses, and weak references whose callback records
    the death of any of them (so an id cannot have been reused by a new object). It holds no
    strong reference to the gradients: a cached table never keeps freed gradient memory
    alive."""

    __slots__ = ("ids", "ptrs", "table", "has_empty", "dtype", "_dead", "_refs")

    def __init__(self, grads, writeable, label):
        n = len(grads)
        half = False
        for i, g in enumerate(grads):
            # The common case in a few attribute reads; anything else gets the full check,
            # which words the error (or accepts e.g. a channels_last or 16-bit gradient).
            if not (isinstance(g, torch.Tensor) and g.dtype is _F32 and g.layout is _STRIDED
                    and g.is_cpu and _is_contiguous(g)):
                half |= tt.check_tensor(label(i), g, dtypes=_DTYPES).dtype is not _F32
        self.ids = list(map(id, grads))
        self.ptrs = list(map(_data_ptr, grads))
        lengths = np.fromiter(map(_numel, grads), dtype=np.int64, count=n)
        addr = np.array(self.ptrs, dtype=np.uint64)
        kinds = np.fromiter((_FORMAT[g.dtype] for g in grads), np.uint8, n) if half else None
        # the dtype of the total norm: the promotion of the gradients' dtypes, as torch's
        self.dtype = _F32
        if half:
            dtypes = {g.dtype for g in grads}
            self.dtype = dtypes.pop() if len(dtypes) == 1 else _F32
        if writeable:
            nbytes = lengths * np.where(kinds == _FORMAT[_F32], 4, 2) if half else 4 * lengths
            try:
                ck.no_overlap_at(["grads"], [addr], [nbytes])
            except ValueError:
                tt.no_overlap([label(i) for i in range(n)], grads)
                raise
        self.has_empty = bool(n) and int(lengths.min()) == 0
        # The table is used only while the caller holds ``grads``, proven to be these very
        # objects at these addresses (see ``matches``): it needs no reference of its own.
        self.table = TensorList.from_addresses(lengths, [addr], None)
        if half:
            self.table.set_slot_format(0, kinds)
        # One shared callback (a bound builtin): a lambda per tensor costs GC pauses of up to
        # ~0.1 s every few rebuilds in a process holding torch's many objects (measured).
        self._dead = []
        self._refs = list(map(weakref.ref, grads, [self._dead.append] * n))

    @property
    def alive(self):
        """Whether every gradient of the table still exists (so no id was reused)."""
        return not self._dead

    def matches(self, grads):
        """Whether ``grads`` are the objects this table was built for, at the same addresses."""
        return (not self._dead and list(map(id, grads)) == self.ids
                and list(map(_data_ptr, grads)) == self.ptrs)


_TABLES = {}


def _table(grads, writeable, label):
    """The cached kernel table over ``grads`` (a non-empty list), rebuilt when needed."""
    key = (writeable, len(grads), id(grads[0]))
    hit = _TABLES.get(key)
    if hit is not None and hit.matches(grads):
        return hit
    entry = _Table(grads, writeable, label)
    for k in [k for k, v in _TABLES.items() if not v.alive]:
        del _TABLES[k]
    _TABLES.pop(key, None)
    while len(_TABLES) >= _CACHE_SIZE:
        del _TABLES[next(iter(_TABLES))]
    _TABLES[key] = entry
    return entry


def _scalar(name, value):
    """``value`` (a real number or a one-element real tensor) as a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype is torch.bool:
            raise TypeError(f"{name} must be a real number, got {tt.describe(value)}")
        return float(value)
    return ck.real(name, value)


def _norm_type(norm_type):
    """torch's ``float(norm_type)`` (``'inf'`` allowed), refusing NaN."""
    try:
        p = float(norm_type) if isinstance(norm_type, str) else _scalar("norm_type", norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError("norm_type must not be NaN")
    return p


def _foreach(foreach):
    if foreach is not None:
        ck.boolean("foreach", foreach)


def _param_grads(parameters, *, warn_empty_generator=False):
    """The non-None gradients of a Tensor or an iterable of tensors, and a function naming
    the k-th of them for error messages."""
    if isinstance(parameters, torch.Tensor):
        params = [parameters]
        single = True
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
        single = False
        if warn_empty_generator and is_generator and not params:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    grads = [g for g in map(_grad, params) if g is not None]
    index = []  # filled on the first error message only

    def label(k):
        if single:
            return "parameters.grad"
        if not index:
            index.extend(i for i, p in enumerate(params) if p.grad is not None)
        return f"parameters[{index[k]}].grad"

    return grads, label


def _total(entry, p):
    """The p-norm of all tensors of ``entry``'s table taken together, as torch defines it
    (the p-norm of the per-tensor p-norms), from one kernel pass, in float64."""
    if entry.has_empty and (p < 0 or p == math.inf):
        raise RuntimeError(f"cannot compute the {p} norm of an empty tensor: its norm is "
                           "undefined (torch raises the same)")
    if p == 2.0 or p == math.inf:
        tsq, tmax = _norms.sumsq(entry.table, 0)
        return _clip.combine(tsq, tmax, p)
    parts = _norms.pnorm_parts(entry.table, 0, p)
    if p == 0.0:
        return float(np.count_nonzero(parts))
    if p == -math.inf:
        return float(np.min(parts))
    return float(np.sum(parts)) ** (1.0 / p)


def _nonfinite_error(p):
    return RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`")


def _norm(grads, label, p, error_if_nonfinite, writeable):
    """(total norm as a 0-d tensor of the gradients' promoted dtype, table entry or None)."""
    if not grads:
        return torch.scalar_tensor(0.0), None
    entry = _table(grads, writeable, label)
    total = torch.scalar_tensor(_total(entry, p), dtype=entry.dtype)
    if error_if_nonfinite and not math.isfinite(total.item()):
        raise _nonfinite_error(p)
    return total, entry


def _scale(grads, entry, max_norm, total_norm):
    """Multiply ``grads`` in place by torch's ``clamp(max_norm / (total_norm + 1e-6), max=1)``,
    computed with torch's own tensor arithmetic (so the factor is bitwise torch's); a factor
    of exactly 1 changes nothing and is skipped."""
    coef = torch.clamp(max_norm / (total_norm + _clip.EPS), max=1.0).item()
    if coef != 1.0:
        _norms.scale(entry.table, 0, coef)
        _increment_version(grads)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    r"""The norm of all ``tensors`` taken together, in one read pass.

    .. math::
        \lVert g \rVert_p = \Big(\sum_t \lVert g_t \rVert_p^p\Big)^{1/p}
        = \Big(\sum_t \sum_i |g_{t,i}|^p\Big)^{1/p}

    with the limits :math:`p = \pm\infty` (largest / smallest :math:`|g_{t,i}|`) and, as in
    torch, :math:`p = 0`: the number of tensors with a nonzero element.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensor
        Dense float32, bfloat16 or float16 CPU tensors (read only); usually gradients.
    norm_type : float or 'inf'
        :math:`p`, any real number or ``inf``/``-inf`` (not NaN).
    error_if_nonfinite : bool
        Raise RuntimeError (torch's message) if the norm is NaN or infinite.
    foreach : bool or None
        Accepted for compatibility and ignored: there is one kernel path.

    Returns
    -------
    Tensor
        A 0-d tensor of the tensors' promoted dtype (float32; bfloat16 or float16 when all
        are), as torch's. Accumulated in float64: within a few units in the last place of
        torch's result (which sums in float32), and bitwise the same for any number of
        threads.

    Raises
    ------
    TypeError, ValueError
        A tensor that is not a dense float32, bfloat16 or float16 CPU tensor (named ``tensors[i]``), a NaN
        ``norm_type``.
    RuntimeError
        An empty tensor with :math:`p < 0` or :math:`p = \infty`, as torch.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> optcore.torch.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)

    References
    ----------
    ``torch.nn.utils.get_total_norm`` (torch 2.13).
    """
    p = _norm_type(norm_type)
    ck.boolean("error_if_nonfinite", error_if_nonfinite)
    _foreach(foreach)
    if isinstance(tensors, torch.Tensor):
        ts = [tensors]
        label = lambda k: "tensors"  # noqa: E731
    else:
        ts = list(tensors)
        label = lambda k: f"tensors[{k}]"  # noqa: E731
    return _norm(ts, label, p, error_if_nonfinite, writeable=False)[0]


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    r"""Scale the gradients of ``parameters`` in place, given their total norm.

    .. math::
        g \leftarrow g \cdot \min\left(\frac{c}{\lVert g \rVert + 10^{-6}},\ 1\right)

    with :math:`c` = ``max_norm`` and :math:`\lVert g \rVert` = ``total_norm``, in one kernel
    call over all gradients (none when the factor is 1).

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Tensors whose ``.grad`` (dense float32, bfloat16 or float16 CPU, not sharing memory) is scaled; those whose
        grad is None are skipped.
    max_norm : float
        :math:`c \ge 0` (NaN or negative raises ValueError).
    total_norm : Tensor or float
        The norm to clip by, e.g. from :func:`get_total_norm`. The factor is computed with
        torch's tensor arithmetic in its dtype, so it is bitwise torch's.
    foreach : bool or None
        Ignored (one kernel path).

    Returns
    -------
    None

    References
    ----------
    ``torch.nn.utils.clip_grads_with_norm_`` (torch 2.13).
    """
    max_norm = ck.nonnegative("max_norm", _scalar("max_norm", max_norm))
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_scalar("total_norm", total_norm))
    else:
        _scalar("total_norm", total_norm)
    _foreach(foreach)
    grads, label = _param_grads(parameters)
    if grads:
        _scale(grads, _table(grads, True, label), max_norm, total_norm)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    r"""Clip the gradients of ``parameters`` in place to a total norm of at most ``max_norm``.

    .. math::
        g \leftarrow g \cdot \min\left(\frac{c}{\lVert g \rVert_p + 10^{-6}},\ 1\right)

    :func:`get_total_norm` of the gradients followed by :func:`clip_grads_with_norm_`: one
    read pass over all gradients, then one scaling pass (skipped when nothing must change).

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Tensors whose ``.grad`` is clipped (dense float32, bfloat16 or float16 CPU, not sharing memory); grads that
        are None are skipped. An empty generator warns, as torch.
    max_norm : float
        :math:`c \ge 0` (NaN or negative raises ValueError before anything is written).
    norm_type : float or 'inf'
        :math:`p`, as :func:`get_total_norm`.
    error_if_nonfinite : bool
        Raise RuntimeError (torch's message) instead of scaling by a NaN or zero factor when
        the norm is NaN or infinite; nothing is changed then.
    foreach : bool or None
        Ignored (one kernel path).

    Returns
    -------
    Tensor
        The total norm before clipping, a 0-d tensor (float32, or the gradients' 16-bit
        dtype when all share it; accumulated in float64; see :func:`get_total_norm`).

    Notes
    -----
    The factor is torch's, computed from the returned norm with torch's arithmetic; the
    scaling is the same float32 product as torch's ``mul_`` (rounded back to nearest even
    for 16-bit gradients). Results are bitwise the same
    for 1 or N threads. The table of gradient addresses is cached while the same gradient
    objects stay at the same addresses (``zero_grad(set_to_none=False)``, or gradients
    written in place); new gradients (``set_to_none=True``) are checked and tabled afresh.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> w = torch.zeros(2, requires_grad=True)
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> optcore.torch.clip_grad_norm_([w], max_norm=1.0)
    tensor(5.)
    >>> w.grad
    tensor([0.6000, 0.8000])

    References
    ----------
    ``torch.nn.utils.clip_grad_norm_`` (torch 2.13); Pascanu, Mikolov, Bengio, "On the
    difficulty of training recurrent neural networks", ICML 2013.
    """
    max_norm = ck.nonnegative("max_norm", _scalar("max_norm", max_norm))
    p = _norm_type(norm_type)
    ck.boolean("error_if_nonfinite", error_if_nonfinite)
    _foreach(foreach)
    grads, label = _param_grads(parameters, warn_empty_generator=True)
    total, entry = _norm(grads, label, p, error_if_nonfinite, writeable=True)
    if entry is not None:
        _scale(grads, entry, max_norm, total)
    return total


def clip_grad_value_(parameters, clip_value, foreach=None):
    r"""Clamp every gradient element of ``parameters`` in place to
    :math:`[-\ell, \ell]`, in one kernel call over all gradients.

    .. math::
        g_i \leftarrow \min(\max(g_i, -\ell), \ell)

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Tensors whose ``.grad`` (dense float32, bfloat16 or float16 CPU, not sharing memory) is clamped; grads that
        are None are skipped.
    clip_value : float
        :math:`\ell \ge 0` (NaN or negative raises ValueError before anything is written).
    foreach : bool or None
        Ignored (one kernel path).

    Returns
    -------
    None

    Notes
    -----
    NaN elements stay NaN, as torch's ``clamp``.

    References
    ----------
    ``torch.nn.utils.clip_grad_value_`` (torch 2.13).
    """
    clip_value = ck.nonnegative("clip_value", _scalar("clip_value", clip_value))
    _foreach(foreach)
    grads, label = _param_grads(parameters)
    if grads:
        _norms.clamp(_table(grads, True, label).table, 0, clip_value)
        _increment_version(grads)

