"""Weight constraints applied after each optimizer step (``Optimizer(..., constraints=...)``).

A constraint is a callable ``c(weight)`` that projects ``weight`` in place; it may define
``check(weight, name)``, which the optimizer calls once at construction so that a constraint
that cannot apply to a weight (wrong number of dimensions, ...) raises there, not mid-training.
"""
import math

import numpy as np

from optcore import _checks as ck
from optcore import kernels

__all__ = ["MaxNorm"]


class MaxNorm:
    r"""Max-norm constraint: keep every unit's incoming weight vector within an L2 ball.

    After each step, ``kernels.max_norm_(w, max_value, axis)`` rescales every unit whose norm
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
            kernels._max_norm_layout(weight.shape, self.axis)
        except (TypeError, ValueError) as e:
            raise type(e)(f"MaxNorm on {name} (shape {weight.shape}): {e}") from None

    def __call__(self, weight):
        kernels.max_norm_(weight, self.max_value, self.axis)

    def __repr__(self):
        return f"MaxNorm(max_value={self.max_value!r}, axis={self.axis!r})"

