"""Weight constraints applied after each optimizer step (``Optimizer(..., constraints=...)``).

A constraint is a callable ``c(weight)`` that projects ``weight`` in place; it may define
``check(weight, name)``, which the optimizer calls once at construction so that a constraint
that cannot apply to a weight (wrong number of dimensions, ...) raises there, not mid-training.
"""
import math

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _transforms

__all__ = ["MaxNorm", "max_norm_"]


def _max_norm_layout(shape, axis):
    """How :func:`max_norm_` sees a tensor of ``shape`` normed over ``axis``.

    Returns ``(units, k, rows)``: ``units`` vectors of ``k`` elements, stored as rows of a
    ``(units, k)`` matrix when ``rows`` else as columns of a ``(k, units)`` matrix. Raises
    ValueError when the axes are not a leading or trailing block of the dimensions.
    """
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("weight must have at least one dimension")
    axes = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    if not isinstance(axes, (tuple, list)) or not axes or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
    norm = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a weight with {ndim} dimensions")
        norm.append(int(a) % ndim)
    norm = sorted(set(norm))
    if len(norm) != len(axes):
        raise ValueError(f"axis has repeated entries: {axis!r}")
    j = len(norm)
    size = lambda dims: math.prod(int(d) for d in dims)
    if norm == list(range(ndim - j, ndim)):
        return size(shape[: ndim - j]), size(shape[ndim - j :]), True
    if norm == list(range(j)):
        return size(shape[j:]), size(shape[:j]), False
    raise ValueError(
        f"axis {axis!r} must be a leading block (0, 1, ...) or a trailing block (..., ndim-1) "
        f"of the {ndim} dimensions"
    )


def max_norm_(weight, max_value, axis=0):
    r"""Max-norm constraint, in place: rescale every unit whose incoming weight vector has an
    L2 norm above ``max_value``.

    For each unit :math:`u` with incoming weights :math:`w_u` (the entries of ``weight`` along
    ``axis``),

    .. math::
        w_u \leftarrow \begin{cases}
            w_u \,\dfrac{c}{\lVert w_u \rVert_2 + 10^{-7}} & \lVert w_u \rVert_2 > c \\
            w_u & \text{otherwise}
        \end{cases}

    with :math:`c` = ``max_value``: the factor of ``torch.renorm(w, 2, dim, c)``; units within
    the bound are untouched (bitwise). Norms are summed in float64 in a fixed order (bitwise
    identical for any thread count); the factor is applied in float32.

    ``axis`` names the axes the norm runs over (the *incoming* axes), as in Keras
    ``MaxNorm(max_value, axis)``:

    - dense weights ``(in, out)`` (``x @ w``): ``axis=0`` (the default), one norm per output
      unit;
    - conv weights ``(out, in, kh, kw)`` (torch layout): ``axis=(1, 2, 3)``;
    - torch ``Linear`` weights ``(out, in)``: ``axis=1``;
    - Keras conv kernels ``(kh, kw, in, out)``: ``axis=(0, 1, 2)``.

    The axes must be a leading or a trailing block of the dimensions.

    Parameters
    ----------
    weight : ndarray
        C-contiguous float32, updated in place.
    max_value : float
        :math:`c > 0`.
    axis : int or tuple of int, default 0

    References
    ----------
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 2014, section 5.1; Keras ``keras.constraints.MaxNorm``; ``torch.renorm``.

    Examples
    --------
    >>> import numpy as np, optcore
    >>> w = np.array([[3.0, 0.3], [4.0, 0.4]], np.float32)   # (in=2, out=2)
    >>> optcore.kernels.max_norm_(w, 1.0, axis=0)
    >>> np.linalg.norm(w, axis=0).round(5)
    array([1. , 0.5], dtype=float32)
    """
    weight = ck.float32_buffer("weight", weight)
    max_value = ck.in_range("max_value", max_value, 0.0, math.inf, lo_open=True, hi_open=True)
    units, k, rows = _max_norm_layout(weight.shape, axis)
    if weight.size:
        _transforms.max_norm(weight, units, k, rows, max_value)


class MaxNorm:
    r"""Max-norm constraint: keep every unit's incoming weight vector within an L2 ball.

    After each step, ``max_norm_(w, max_value, axis)`` rescales every unit whose norm
    exceeds ``max_value`` (see :func:`optcore.kernels.max_norm_` for the formula and the
    ``axis`` convention: ``axis=0`` for dense ``(in, out)`` weights, ``axis=(1, 2, 3)`` for
    conv ``(out, in, kh, kw)`` weights).

    Parameters
    ----------
    max_value : float, default 2.0
        The bound, > 0 (Keras's default; Srivastava et al. use 3 to 4 with dropout).
    axis : int or tuple of int, default 0
        The incoming axes, as Keras ``MaxNorm(max_value, axis)``.

    Examples
    --------
    >>> import optcore
    >>> params = optcore.Parameters({"w1": (784, 300), "b1": (300,)})
    >>> opt = optcore.SGD(params, lr=0.01, constraints={"w1": optcore.MaxNorm(3.0)})

    References
    ----------
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 2014; Keras ``keras.constraints.MaxNorm``.
    """

    def __init__(self, max_value=2.0, axis=0):
        self.max_value = ck.in_range("max_value", max_value, 0.0, math.inf, lo_open=True,
                                     hi_open=True)
        if isinstance(axis, list):
            axis = tuple(axis)
        ints = (axis,) if not isinstance(axis, tuple) else axis
        if not ints or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                               for a in ints):
            raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
        if len(set(int(a) for a in ints)) != len(ints):
            raise ValueError(f"axis has repeated entries: {axis!r}")
        self.axis = axis

    def check(self, weight, name="weight"):
        """Raise if this constraint cannot apply to ``weight``."""
        ck.float32_buffer(name, weight)
        try:
            _max_norm_layout(weight.shape, self.axis)
        except (TypeError, ValueError) as e:
            raise type(e)(f"MaxNorm on {name} (shape {weight.shape}): {e}") from None

    def __call__(self, weight):
        max_norm_(weight, self.max_value, self.axis)

    def __repr__(self):
        return f"MaxNorm(max_value={self.max_value!r}, axis={self.axis!r})"

