r"""Gradient norms and clipping: global, per tensor, by value, and adaptive (unit-wise).

Every function takes the gradients as a float32 C-contiguous ndarray, a list of them, or an
arena (``params.grads`` of a :class:`~optcore.Parameters`). The norm and clipping functions
(all but :func:`adaptive_clip_`) also take bfloat16 (``ml_dtypes.bfloat16``) and float16
arrays, alone or mixed with float32 ones: they are read widened exactly to float32, so a norm
is the norm of the widened values, and the clipping functions round their float32 result
back to nearest even in place, as NumPy's and torch's conversions do. Norms come from one read pass of a
multi-tensor kernel (float32 lanes over short blocks folded into float64, overflow-safe,
bitwise independent of the thread count); the clipping functions then rescale in place with
one more pass, only when something must change, and return the norm(s) *before* clipping.

The policy classes :class:`GlobalNorm`, :class:`PerTensorNorm`, :class:`Value` and
:class:`Adaptive` are what an optimizer takes as ``clip=``: the optimizer then computes the
norm in its first pass and applies the factor on the fly in its update pass, without
rewriting the gradient (see :meth:`optcore.Optimizer.step`).

The clip factor is the one of ``torch.nn.utils.clip_grad_norm_``:

.. math::
    f = \min\left(1, \frac{c}{\lVert g \rVert + 10^{-6}}\right), \qquad g \leftarrow f\,g .
"""
import math
import weakref

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _norms
from optcore._kernels._runtime import TensorList
from optcore.params import Arena

__all__ = [
    "global_norm",
    "tensor_norms",
    "clip_by_global_norm_",
    "clip_by_norm_",
    "clip_by_value_",
    "adaptive_clip_",
    "ClipPolicy",
    "GlobalNorm",
    "PerTensorNorm",
    "Value",
    "Adaptive",
]

EPS = 1e-6
"""Added to the norm in the clip factor, as ``torch.nn.utils.clip_grad_norm_`` does."""


def norm_type_arg(norm_type):
    """Return ``norm_type`` as 2.0 or inf, or raise naming the argument."""
    if isinstance(norm_type, str):
        if norm_type.lower() == "inf":
            return math.inf
        raise ValueError(f"norm_type must be 2 or inf, got {norm_type!r}")
    v = ck.real("norm_type", norm_type)
    if v != 2.0 and v != math.inf:
        raise ValueError(f"norm_type must be 2 or inf, got {norm_type!r}")
    return v


def _label(name, x, i):
    """How tensor ``i`` of argument ``name`` is called in error messages."""
    if isinstance(x, Arena):
        return f"{name}[{x.layout.names[i]!r}]"
    return name if isinstance(x, np.ndarray) else f"{name}[{i}]"


def _tensors(name, x, *, writeable):
    """Return the list of checked float32 arrays of an ndarray, a list of arrays or an arena,
    with their addresses, element counts and sizes in bytes."""
    if isinstance(x, Arena):
        ck.float32_buffer(f"{name}.flat", x.flat, writeable=writeable)
        arrays = [x[n] for n in x]
        addr, lengths, nbytes, _, _ = _norms.buffers(arrays, False)
        return arrays, addr, lengths, nbytes
    return ck.array_table(name, x, writeable=writeable)[:4]


# An arena's tensors never move: its table is built once (keyed by id, dropped with the arena).
_ARENA_TABLES = {}


def _arena_table(x):
    key = id(x)
    hit = _ARENA_TABLES.get(key)
    if hit is not None and hit[0]() is x:
        return hit[1]
    tl = TensorList([[x[n] for n in x]])
    _ARENA_TABLES[key] = (weakref.ref(x), tl)
    weakref.finalize(x, _ARENA_TABLES.pop, key, None)
    return tl


def _table(name, x, *, writeable):
    """A one-slot tensor table over the checked gradients (slot 0): float32 arrays, or
    bfloat16/float16 ones (read widened, written back rounded to nearest even)."""
    if isinstance(x, Arena):
        ck.float32_buffer(f"{name}.flat", x.flat, writeable=writeable)
        return _arena_table(x)
    arrays, addr, lengths, nbytes, kinds = ck.array_table(name, x, writeable=writeable, half=True)
    if writeable:
        ck.no_overlap_at([name], [addr], [nbytes])
    tl = TensorList.from_addresses(lengths, [addr], arrays)
    if kinds is not None:
        tl.set_slot_format(0, kinds)
    return tl


def combine(tsq, tmax, norm_type):
    """Global norm from per-tensor sums of squares / max-abs (summed in tensor order)."""
    if norm_type == 2.0:
        return math.sqrt(float(np.sum(tsq))) if tsq.size else 0.0
    return float(np.max(tmax)) if tmax.size else 0.0


def factor(norm, max_norm):
    """``min(1, max_norm / (norm + 1e-6))``; NaN stays NaN (as torch.clamp)."""
    f = max_norm / (norm + EPS)
    return f if not f >= 1.0 else 1.0


def first_nonfinite(tsq):
    """Index of the first tensor whose sum of squares is not finite, or -1."""
    bad = np.flatnonzero(~np.isfinite(tsq))
    return int(bad[0]) if bad.size else -1


def _raise_nonfinite(name, x, tsq):
    label = _label(name, x, first_nonfinite(tsq))
    raise FloatingPointError(f"{label} has a non-finite value (NaN or inf)")


def global_norm(grads, norm_type=2):
    r"""The norm of all gradients taken together, in one read pass.

    .. math::
        \lVert g \rVert_2 = \Big(\sum_t \sum_i g_{t,i}^2\Big)^{1/2}, \qquad
        \lVert g \rVert_\infty = \max_{t,i} |g_{t,i}|

    Parameters
    ----------
    grads : ndarray, list of ndarray, or Arena
        float32 (or bfloat16, float16) C-contiguous gradients (read only).
    norm_type : {2, inf}
        The norm.

    Returns
    -------
    float
        The norm, computed in float64 from float32 data: within 1e-6 relative of an exact
        float64 computation for any finite input (values near the float32 limit included);
        NaN if any element is NaN, inf if any is infinite and none is NaN.

    See Also
    --------
    tensor_norms, clip_by_global_norm_

    Examples
    --------
    >>> import numpy as np, optcore
    >>> optcore.clip.global_norm([np.array([3.0], np.float32), np.array([4.0], np.float32)])
    5.0

    References
    ----------
    ``torch.nn.utils.get_total_norm``; ``optax.global_norm``; ``tf.linalg.global_norm``.
    """
    nt = norm_type_arg(norm_type)
    tl = _table("grads", grads, writeable=False)
    tsq, tmax = _norms.sumsq(tl, 0)
    return combine(tsq, tmax, nt)


def tensor_norms(grads, norm_type=2):
    r"""The norm of each gradient tensor, in one read pass over all of them.

    .. math::
        n_t = \Big(\sum_i g_{t,i}^2\Big)^{1/2} \quad\text{or}\quad n_t = \max_i |g_{t,i}|

    Parameters
    ----------
    grads : ndarray, list of ndarray, or Arena
        float32 (or bfloat16, float16) C-contiguous gradients (read only).
    norm_type : {2, inf}

    Returns
    -------
    ndarray of float64
        One norm per tensor, in order.
    """
    nt = norm_type_arg(norm_type)
    tl = _table("grads", grads, writeable=False)
    tsq, tmax = _norms.sumsq(tl, 0)
    return np.sqrt(tsq) if nt == 2.0 else tmax


def clip_by_global_norm_(grads, max_norm, norm_type=2, error_if_nonfinite=False):
    r"""Scale all gradients in place so that their global norm is at most ``max_norm``.

    .. math::
        f = \min\left(1, \frac{c}{\lVert g \rVert + 10^{-6}}\right), \qquad g \leftarrow f\,g

    with :math:`c` = ``max_norm``: the direction of the whole gradient is kept. Two passes:
    the norm, then the scaling (skipped when :math:`f = 1`).

    Parameters
    ----------
    grads : ndarray, list of ndarray, or Arena
        float32 (or bfloat16, float16) C-contiguous, writeable gradients, modified in place.
    max_norm : float
        :math:`c \ge 0`.
    norm_type : {2, inf}
    error_if_nonfinite : bool
        Raise FloatingPointError (naming the first tensor with a NaN or inf) instead of
        scaling by a NaN or zero factor, as torch's argument of the same name; nothing is
        changed then.

    Returns
    -------
    float
        The global norm before clipping.

    Notes
    -----
    Same result as ``torch.nn.utils.clip_grad_norm_`` (eps :math:`10^{-6}` added to the norm)
    and, up to that eps, ``tf.clip_by_global_norm`` / ``optax.clip_by_global_norm``. A
    non-finite norm propagates as in torch: the factor is NaN (or 0 for an infinite norm).

    Examples
    --------
    >>> import numpy as np, optcore
    >>> g = [np.array([3.0], np.float32), np.array([4.0], np.float32)]
    >>> optcore.clip.clip_by_global_norm_(g, 1.0)
    5.0
    >>> [round(float(a[0]), 6) for a in g]  # 3 and 4 times 1 / (5 + 1e-6)
    [0.6, 0.8]

    References
    ----------
    Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks",
    ICML 2013.
    """
    nt = norm_type_arg(norm_type)
    max_norm = ck.nonnegative("max_norm", max_norm)
    ck.boolean("error_if_nonfinite", error_if_nonfinite)
    tl = _table("grads", grads, writeable=True)
    tsq, tmax = _norms.sumsq(tl, 0)
    total = combine(tsq, tmax, nt)
    if error_if_nonfinite and not math.isfinite(total):
        _raise_nonfinite("grads", grads, tsq)
    f = factor(total, max_norm)
    if f != 1.0:
        _norms.scale(tl, 0, f)
    return total


def clip_by_norm_(grads, max_norm, norm_type=2):
    r"""Scale each gradient tensor in place so that its own norm is at most ``max_norm``.

    .. math::
        f_t = \min\left(1, \frac{c}{\lVert g_t \rVert + 10^{-6}}\right), \qquad
        g_t \leftarrow f_t\,g_t

    One read pass for all the norms and one scaling pass (skipped when every
    :math:`f_t = 1`).

    Parameters
    ----------
    grads : ndarray, list of ndarray, or Arena
        float32 (or bfloat16, float16) C-contiguous, writeable gradients, modified in place.
    max_norm : float
        :math:`c \ge 0`.
    norm_type : {2, inf}

    Returns
    -------
    ndarray of float64
        The norm of each tensor before clipping.

    Notes
    -----
    This is ``tf.clip_by_norm`` applied to every tensor (Keras' ``clipnorm``), except that
    TensorFlow uses :math:`c / \max(\lVert g_t \rVert, c)` without the eps. Per-tensor clipping
    changes the direction of the whole gradient; global clipping does not.
    """
    nt = norm_type_arg(norm_type)
    max_norm = ck.nonnegative("max_norm", max_norm)
    tl = _table("grads", grads, writeable=True)
    tsq, tmax = _norms.sumsq(tl, 0)
    norms = np.sqrt(tsq) if nt == 2.0 else tmax
    f = max_norm / (norms + EPS)
    f = np.where(f >= 1.0, 1.0, f).astype(np.float32)
    if not np.all(f == 1.0):
        _norms.scale(tl, 0, 1.0, f)
    return norms


def clip_by_value_(grads, limit):
    r"""Clamp every gradient element in place to :math:`[-\ell, \ell]`, in one pass.

    .. math::
        g_i \leftarrow \min(\max(g_i, -\ell), \ell)

    Parameters
    ----------
    grads : ndarray, list of ndarray, or Arena
        float32 (or bfloat16, float16) C-contiguous, writeable gradients, modified in place.
    limit : float
        :math:`\ell \ge 0`.

    Returns
    -------
    float
        The largest :math:`|g_i|` before clipping (NaN if any element is NaN), read in the same
        pass.

    Notes
    -----
    As ``torch.nn.utils.clip_grad_value_``, ``tf.clip_by_value``, Keras' ``clipvalue`` and
    ``optax.clip``; NaN elements stay NaN.
    """
    limit = ck.nonnegative("limit", limit)
    tl = _table("grads", grads, writeable=True)
    return _norms.clamp(tl, 0, limit)


def _units(arrays):
    """Unit table of the tensors: axis 0 splits a tensor of 2+ dimensions into units (rows of
    a ``(out, in)`` weight, output channels of an ``(out, in, kh, kw)`` kernel); a 0-d or 1-d
    tensor is one unit."""
    counts = np.array([a.shape[0] if a.ndim >= 2 else 1 for a in arrays], dtype=np.int64)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    ulen = np.where(counts > 0, sizes // np.maximum(counts, 1), 0)
    tensor = np.repeat(np.arange(len(arrays), dtype=np.int64), counts)
    length = np.repeat(ulen, counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(arrays) else counts
    start = (np.arange(tensor.size, dtype=np.int64) - np.repeat(first, counts)) * length
    return tensor, start, length, counts


def _agc_factors(pn, gn, clipping, eps):
    max_norm = clipping * np.maximum(pn, eps)
    f = np.where(gn > max_norm, max_norm / np.maximum(gn, EPS), 1.0)
    return f.astype(np.float32)


def adaptive_clip_(params, grads, clipping=0.01, eps=1e-3):
    r"""Unit-wise adaptive gradient clipping (AGC), in place.

    For every unit :math:`i` (a row of a weight matrix, an output channel of a convolution
    kernel; a bias or gain vector is one unit):

    .. math::
        c_i = \lambda \max(\lVert W_i \rVert_2, \epsilon), \qquad
        G_i \leftarrow \begin{cases}
            c_i\, G_i / \max(\lVert G_i \rVert_2, 10^{-6}) & \lVert G_i \rVert_2 > c_i \\
            G_i & \text{otherwise}
        \end{cases}

    with :math:`\lambda` = ``clipping`` and :math:`\epsilon` = ``eps``.

    Parameters
    ----------
    params : ndarray, list of ndarray, or Arena
        float32 C-contiguous weights (read only), in the PyTorch layout: output units along
        axis 0.
    grads : ndarray, list of ndarray, or Arena
        Their gradients, same shapes, modified in place.
    clipping : float
        :math:`\lambda > 0`.
    eps : float
        :math:`\epsilon \ge 0`, keeps zero-initialised units from freezing.

    Returns
    -------
    list of ndarray of float64
        Per tensor, the unit-wise gradient norms before clipping (shape ``(shape[0],)``, or
        ``()`` for a 0-d/1-d tensor).

    Notes
    -----
    Same as ``timm.utils.agc.adaptive_clip_grad`` and ``optax.adaptive_grad_clip`` (which
    take the units of JAX's HWIO/IO layouts). Two read passes (weights, gradients) and one
    scaling pass over the gradients.

    References
    ----------
    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021, section 4.1.
    """
    clipping = ck.in_range("clipping", clipping, 0.0, math.inf, lo_open=True)
    eps = ck.nonnegative("eps", eps)
    ps, paddr, plen, psize = _tensors("params", params, writeable=False)
    gs, gaddr, _, gsize = _tensors("grads", grads, writeable=True)
    ck.same_sizes("params", ps, "grads", gs)
    for i, (p, g) in enumerate(zip(ps, gs)):
        if p.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {g.shape} but params[{i}] has shape {p.shape}")
    ck.no_overlap_at(["params", "grads"], [paddr, gaddr], [psize, gsize])
    tl = TensorList.from_addresses(plen, [paddr, gaddr], (ps, gs))
    tensor, start, length, counts = _units(gs)
    pn = np.sqrt(_norms.unit_sumsq(tl, 0, tensor, start, length))
    gn = np.sqrt(_norms.unit_sumsq(tl, 1, tensor, start, length))
    f = _agc_factors(pn, gn, clipping, eps)
    if not np.all(f == 1.0):
        _norms.unit_scale(tl, 1, tensor, start, length, f)
    out = np.split(gn, np.cumsum(counts)[:-1]) if len(gs) else []
    return [o.reshape(()) if g.ndim < 2 else o for o, g in zip(out, gs)]


class ClipPolicy:
    """Base of the clipping policies an optimizer takes as ``clip=``."""

    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self), self._key()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in zip(self.__slots__, self._key()))
        return f"{type(self).__name__}({args})"

    def _key(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __reduce__(self):
        # immutable: pickle and deepcopy rebuild through the constructor
        return type(self), self._key()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **kw):
        for k, v in kw.items():
            object.__setattr__(self, k, v)


class GlobalNorm(ClipPolicy):
    r"""Clip by the global norm of all gradients: :func:`clip_by_global_norm_`.

    Parameters
    ----------
    max_norm : float
        :math:`c \ge 0`.
    norm_type : {2, inf}
    """

    __slots__ = ("max_norm", "norm_type")

    def __init__(self, max_norm, norm_type=2):
        self._set(max_norm=ck.nonnegative("max_norm", max_norm), norm_type=norm_type_arg(norm_type))

    def clip_(self, grads, params=None):
        """Apply to ``grads`` in place; return the norm before clipping."""
        return clip_by_global_norm_(grads, self.max_norm, self.norm_type)


class PerTensorNorm(ClipPolicy):
    r"""Clip each tensor by its own norm: :func:`clip_by_norm_` (Keras' ``clipnorm``).

    Parameters
    ----------
    max_norm : float
        :math:`c \ge 0`.
    norm_type : {2, inf}
    """

    __slots__ = ("max_norm", "norm_type")

    def __init__(self, max_norm, norm_type=2):
        self._set(max_norm=ck.nonnegative("max_norm", max_norm), norm_type=norm_type_arg(norm_type))

    def clip_(self, grads, params=None):
        """Apply to ``grads`` in place; return the per-tensor norms before clipping."""
        return clip_by_norm_(grads, self.max_norm, self.norm_type)


class Value(ClipPolicy):
    r"""Clamp every element to :math:`[-\ell, \ell]`: :func:`clip_by_value_` (``clipvalue``).

    Parameters
    ----------
    limit : float
        :math:`\ell \ge 0`.
    """

    __slots__ = ("limit",)

    def __init__(self, limit):
        self._set(limit=ck.nonnegative("limit", limit))

    def clip_(self, grads, params=None):
        """Apply to ``grads`` in place; return the max ``|g|`` before clipping."""
        return clip_by_value_(grads, self.limit)


class Adaptive(ClipPolicy):
    r"""Unit-wise adaptive gradient clipping: :func:`adaptive_clip_`.

    Parameters
    ----------
    clipping : float
        :math:`\lambda > 0`.
    eps : float
        :math:`\epsilon \ge 0`.
    """

    __slots__ = ("clipping", "eps")

    def __init__(self, clipping=0.01, eps=1e-3):
        self._set(clipping=ck.in_range("clipping", clipping, 0.0, math.inf, lo_open=True),
                  eps=ck.nonnegative("eps", eps))

    def clip_(self, grads, params=None):
        """Apply to ``grads`` in place (``params`` required); return the unit-wise norms."""
        if params is None:
            raise TypeError("Adaptive clipping needs params (the weights) as well as grads")
        return adaptive_clip_(params, grads, self.clipping, self.eps)
