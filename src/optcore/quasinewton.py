r"""Quasi-Newton methods for full-batch training: :class:`BFGS` and :class:`LBFGS`.

Both minimize :math:`f(x)` over a :class:`~optcore.Parameters` arena or a list of
``(param, grad)`` float32 array pairs, with ``step(closure)`` as ``torch.optim.LBFGS``: the
closure recomputes the loss at the current parameters, writes the gradient into the gradient
buffers in place and returns the loss. Iteration :math:`k` computes a search direction
:math:`d_k = -H_k g_k` from an approximation :math:`H_k` of the inverse Hessian, finds a step
:math:`\alpha_k` along it that satisfies the strong Wolfe conditions

.. math::

    f(x_k + \alpha_k d_k) \le f(x_k) + c_1 \alpha_k g_k^\top d_k, \qquad
    |g(x_k + \alpha_k d_k)^\top d_k| \le c_2 |g_k^\top d_k|

(line search: Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006, algorithms 3.5 and
3.6, with the cubic interpolation of eq. 3.59), and updates :math:`H` with the pair
:math:`s_k = x_{k+1} - x_k`, :math:`y_k = g_{k+1} - g_k` by the BFGS formula (ibid. eq. 6.17)

.. math::

    H_{k+1} = (I - \rho_k s_k y_k^\top) H_k (I - \rho_k y_k s_k^\top) + \rho_k s_k s_k^\top,
    \qquad \rho_k = 1 / (y_k^\top s_k),

starting from :math:`H_0 = \gamma I`, :math:`\gamma = s_0^\top y_0 / y_0^\top y_0`
(eq. 6.20; the first direction is :math:`-g_0`). A pair with
:math:`s^\top y \le \epsilon\, y^\top y` (:math:`\epsilon` the float64 machine epsilon) is
skipped, as L-BFGS-B does.

* :class:`BFGS` keeps :math:`H` as a dense symmetric float64 matrix (its lower triangle,
  packed: :math:`n(n+1)/2` numbers). Written :math:`H_{k+1} = H_k + s v^\top + v s^\top` with
  :math:`u = H_k y`, :math:`v = -\rho u + \tfrac12(\rho^2 y^\top u + \rho) s`, the update is
  rank two, and :math:`u = H_k g_{k+1} - H_k g_k` needs one matrix-vector product per
  iteration, whose sweep over the triangle also applies the previous update: one read and
  one write of the triangle per iteration, :math:`O(n^2)` work and no :math:`n \times n`
  temporary (SciPy's BFGS forms matrix-matrix products, :math:`O(n^3)`).
* :class:`LBFGS` keeps the last ``m`` pairs in float32 and applies :math:`H_k` by the
  two-loop recursion (ibid. algorithm 7.4) with :math:`H_k^0 = \gamma_k I`,
  :math:`\gamma_k = s_{k-1}^\top y_{k-1} / y_{k-1}^\top y_{k-1}` (eq. 7.20): each loop step
  is one fused kernel pass (an axpy and the next dot product, float64 accumulation), so an
  iteration costs :math:`2h + 1` passes over memory for :math:`h \le m` stored pairs.

Stopping rules are SciPy's (``scipy.optimize.minimize(method="L-BFGS-B")``): ``gtol`` on the
largest gradient component :math:`\|g\|_\infty`, ``ftol`` on the relative decrease
:math:`(f_k - f_{k+1}) / \max(|f_k|, |f_{k+1}|, 1)` (``factr * eps`` of L-BFGS-B),
``maxiter`` iterations and ``maxfun`` evaluations (checked between iterations: a line search
may overrun it by at most ``maxls - 1`` evaluations).

When a line search fails (no acceptable step within ``maxls`` evaluations), the parameters
and gradients are restored to the last iterate; with a non-empty memory it is cleared and the
iteration retried along :math:`-g` (L-BFGS-B's restart); otherwise :meth:`step` stops with
``status`` :data:`STATUS_LINE_SEARCH`.
"""
import math
import time
from collections import deque

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _norms, _qn
from optcore._kernels._runtime import TensorList
from optcore.optim import _pairs
from optcore.params import Arena, Layout, Parameters

__all__ = ["BFGS", "LBFGS", "STATUS_CONVERGED", "STATUS_LIMIT", "STATUS_LINE_SEARCH"]

#: ``Result.status``: ``gtol`` or ``ftol`` reached.
STATUS_CONVERGED = 0
#: ``Result.status``: ``maxiter`` or ``maxfun`` reached.
STATUS_LIMIT = 1
#: ``Result.status``: no step satisfying the strong Wolfe conditions was found.
STATUS_LINE_SEARCH = 2

_EPS = np.finfo(np.float64).eps
# slots of the main table and of the pair tables
_X, _G, _X0, _G0, _D = 0, 1, 2, 3, 4
_S, _Y = 4, 5


def _cubic_min(a, fa, ga, b, fb, gb, lo, hi):
    """Minimizer of the cubic through ``(a, fa, ga)`` and ``(b, fb, gb)`` (values and slopes;
    Nocedal & Wright eq. 3.59), clamped to ``[lo, hi]``; the midpoint when it has none."""
    d1 = ga + gb - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if math.isfinite(disc) and disc >= 0.0:
        d2 = math.copysign(math.sqrt(disc), b - a)
        den = gb - ga + 2.0 * d2
        if den != 0.0:
            t = b - (b - a) * (gb + d2 - d1) / den
            if math.isfinite(t):
                return min(max(t, lo), hi)
    return 0.5 * (lo + hi)


def _strong_wolfe(phi, f0, g0, t, c1, c2, maxls):
    r"""Line search for a step satisfying the strong Wolfe conditions (Nocedal & Wright,
    algorithm 3.5, bracketing by cubic extrapolation, then :func:`_zoom`, algorithm 3.6).

    ``phi(t)`` returns :math:`(\phi(t), \phi'(t))` with :math:`\phi(t) = f(x_0 + t d)`; ``f0``,
    ``g0 < 0`` are :math:`\phi(0), \phi'(0)`. A non-finite value counts as too long a step.
    Returns ``(t, f, g, ok)``: the last point evaluated and whether it is acceptable.
    """
    t_prev, f_prev, g_prev = 0.0, f0, g0
    for i in range(maxls):
        f, g = phi(t)
        if (not (math.isfinite(f) and math.isfinite(g)) or f > f0 + c1 * t * g0
                or (i > 0 and f >= f_prev)):
            return _zoom(phi, f0, g0, (t_prev, f_prev, g_prev), (t, f, g), c1, c2, maxls - i - 1)
        if abs(g) <= -c2 * g0:
            return t, f, g, True
        if g >= 0.0:
            return _zoom(phi, f0, g0, (t, f, g), (t_prev, f_prev, g_prev), c1, c2, maxls - i - 1)
        t_next = _cubic_min(t_prev, f_prev, g_prev, t, f, g, t + 0.01 * (t - t_prev), 10.0 * t)
        t_prev, f_prev, g_prev = t, f, g
        t = t_next
    return t_prev, f_prev, g_prev, False


def _zoom(phi, f0, g0, lo, hi, c1, c2, budget):
    """Algorithm 3.6: shrink ``[lo, hi]`` (``lo`` the end with sufficient decrease and the
    lowest value) by safeguarded cubic interpolation until the strong Wolfe conditions hold."""
    (a_lo, f_lo, g_lo), (a_hi, f_hi, g_hi) = lo, hi
    for _ in range(budget):
        left, right = min(a_lo, a_hi), max(a_lo, a_hi)
        width = right - left
        if width <= _EPS * right:
            break
        if math.isfinite(f_hi) and math.isfinite(g_hi):
            t = _cubic_min(a_lo, f_lo, g_lo, a_hi, f_hi, g_hi,
                           left + 0.1 * width, right - 0.1 * width)
        else:
            t = 0.5 * (left + right)
        f, g = phi(t)
        if (not (math.isfinite(f) and math.isfinite(g)) or f > f0 + c1 * t * g0
                or f >= f_lo):
            a_hi, f_hi, g_hi = t, f, g
        else:
            if abs(g) <= -c2 * g0:
                return t, f, g, True
            if g * (a_hi - a_lo) >= 0.0:
                a_hi, f_hi, g_hi = a_lo, f_lo, g_lo
            a_lo, f_lo, g_lo = t, f, g
    return a_lo, f_lo, g_lo, False


class _Run:
    """Counters, clock and trace of one :meth:`step` call."""

    def __init__(self, closure):
        self.closure = closure
        self.nfev = 0
        self.trace = []
        self.t0 = time.perf_counter()

    def call(self):
        loss = self.closure()
        try:
            f = float(loss)
        except (TypeError, ValueError):
            raise TypeError(
                f"closure must return the loss as a real number, got {type(loss).__name__}"
            ) from None
        self.nfev += 1
        self.trace.append((self.nfev, time.perf_counter() - self.t0, f))
        return f


def _positive_or_none(name, value):
    return None if value is None else ck.positive_int(name, value)


class _QuasiNewton:
    """Shared machinery: buffers, the line search, the stopping rules and the result."""

    method = "quasi-newton"

    def __init__(self, params, *, gtol, ftol, maxiter, maxfun, c1, c2, maxls):
        self.gtol = ck.nonnegative("gtol", gtol)
        if not math.isfinite(self.gtol):
            raise ValueError(f"gtol must be finite, got {gtol!r}")
        self.ftol = ck.in_range("ftol", ftol, 0.0, 1.0)
        self.c1 = ck.in_range("c1", c1, 0.0, 1.0, lo_open=True, hi_open=True)
        self.c2 = ck.in_range("c2", c2, 0.0, 1.0, lo_open=True, hi_open=True)
        if not self.c1 < self.c2:
            raise ValueError(f"c1 must be smaller than c2 (0 < c1 < c2 < 1), got c1={c1!r}, c2={c2!r}")
        self.maxiter = _positive_or_none("maxiter", maxiter)
        self.maxfun = _positive_or_none("maxfun", maxfun)
        self.maxls = ck.positive_int("maxls", maxls)

        if isinstance(params, Parameters):
            names = list(params)
            ps = [params[k] for k in names]
            gs = [params.grads[k] for k in names]
        elif isinstance(params, (list, tuple)):
            ps, gs = _pairs(params, "params")
            names = [str(i) for i in range(len(ps))]
            for i, g in enumerate(gs):
                ck.float32_buffer(f"params[{i}][1] (grad)", g)
        else:
            raise TypeError(
                "params must be optcore.Parameters or a list of (param, grad) float32 array "
                f"pairs, got {type(params).__name__}"
            )
        seen = {}
        for k, p, g in zip(names, ps, gs):
            seen[f"param {k}"] = [p]
            seen[f"grad {k}"] = [g]
        ck.no_overlap(seen)
        sizes = np.array([p.size for p in ps], dtype=np.int64)
        self.n = int(sizes.sum())
        if self.n == 0:
            raise ValueError("params holds no elements")
        self.parameters = params
        self._params, self._grads = ps, gs
        self._layout = Layout({k: p.shape for k, p in zip(names, ps)})
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._x0, self._g0, self._d = (self._vector() for _ in range(3))
        self._main = TensorList([ps, gs, self._x0, self._g0, self._d])
        self._sc = _qn.Scratch(self._main)
        self.iterations = 0

    def _vector(self):
        """A float32 work vector with the parameters' layout, as a list of tensor views."""
        arena = Arena(self._layout)
        return [arena[k] for k in self._layout.names]

    def _pair_table(self, s, y):
        return TensorList([self._params, self._grads, self._x0, self._g0, s, y])

    # -- what the subclasses provide ------------------------------------------------------

    def _start_direction(self):
        """Set ``d = -H g`` at the starting point (``x0``, ``g0`` hold it); return ``g.d``."""
        raise NotImplementedError

    def _pair(self):
        """Form ``s, y`` (and ``x0 = x``, ``g0 = g``); return ``(s.y, y.y, g.g, max|g|)``."""
        raise NotImplementedError

    def _update(self, sy, yy):
        """Update the memory with the pair just formed (skipped unless s.y > eps y.y)."""
        raise NotImplementedError

    def _direction(self):
        """Set ``d = -H g`` after :meth:`_update`; return ``g.d``."""
        raise NotImplementedError

    def _has_memory(self):
        raise NotImplementedError

    def reset(self):
        """Forget the curvature memory: the next direction is :math:`-g`."""
        raise NotImplementedError

    def _steepest(self):
        """``d = -g``; return ``g.d``."""
        return _qn.axpby(self._main, self._sc, _D, 0.0, _G, -1.0, _G)

    # -- the iteration ----------------------------------------------------------------------

    def step(self, closure):
        """Minimize until a stopping rule holds (at most ``maxiter`` iterations and about
        ``maxfun`` evaluations in this call); the memory carries over to the next call.

        Parameters
        ----------
        closure : callable
            ``closure() -> loss``: evaluates the loss at the current parameters, writes the
            gradient into the gradient buffers in place and returns the loss (a real number).

        Returns
        -------
        optcore.baselines.Result
            ``fun`` (loss at the final parameters), ``x`` and ``jac`` (the parameter and
            gradient buffers themselves, not copies), ``grad_norm`` (L2) and ``grad_max``
            (:math:`\\|g\\|_\\infty`), ``nit``, ``nfev`` (= ``njev`` = ``evaluations``),
            ``status`` (:data:`STATUS_CONVERGED`, :data:`STATUS_LIMIT`,
            :data:`STATUS_LINE_SEARCH`), ``success``, ``message``, ``seconds``, ``method``,
            ``trace`` (rows ``(evaluations, seconds, loss)``, one per evaluation) and
            ``line_search`` (rows ``(alpha, f_k, g_k.d_k, f_k+1, g_k+1.d_k, evaluations)``,
            one per iteration).

        Raises
        ------
        TypeError
            ``closure`` is not callable or returns something that is not a real number.
        ValueError
            The loss or the gradient at the starting point is NaN or infinite; nothing has
            been written.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable (closure() -> loss), got {type(closure).__name__}")
        run = _Run(closure)
        f = run.call()
        tsq, tmax = _norms.sumsq(self._main, _G)
        gg = float(np.sum(tsq))
        if not math.isfinite(f):
            raise ValueError(f"closure returned a non-finite loss ({f}) at the starting point; "
                             "nothing was changed")
        if not math.isfinite(gg):
            raise ValueError("the gradient at the starting point holds NaN or infinity; "
                             "nothing was changed")
        gmax = float(np.max(tmax))
        _qn.axpby(self._main, self._sc, _X0, 0.0, _X, 1.0, -1)
        _qn.axpby(self._main, self._sc, _G0, 0.0, _G, 1.0, -1)
        rows, nit, status, message = [], 0, None, None
        if gmax <= self.gtol:
            status, message = STATUS_CONVERGED, "CONVERGENCE: NORM OF GRADIENT <= GTOL"
        else:
            dphi0 = self._descent(self._start_direction())
        while status is None:
            if dphi0 is None:
                status, message = STATUS_LINE_SEARCH, "ABNORMAL: NO DESCENT DIRECTION"
                break
            t = 1.0 if self._has_memory() else min(1.0, 1.0 / math.sqrt(gg))
            n_before = run.nfev

            def phi(a):
                _qn.point(self._main, _X, _X0, _D, a)
                return run.call(), _qn.dot(self._main, self._sc, _G, _D)

            t, f_new, dphi, ok = _strong_wolfe(phi, f, dphi0, t, self.c1, self.c2, self.maxls)
            if not ok:
                _qn.axpby(self._main, self._sc, _X, 0.0, _X0, 1.0, -1)
                _qn.axpby(self._main, self._sc, _G, 0.0, _G0, 1.0, -1)
                if self._has_memory():
                    self.reset()
                    dphi0 = self._descent(self._steepest())
                    continue
                status, message = STATUS_LINE_SEARCH, "ABNORMAL_TERMINATION_IN_LNSRCH"
                break
            rows.append((t, f, dphi0, f_new, dphi, run.nfev - n_before))
            sy, yy, gg, gmax = self._pair()
            self._update(sy, yy)
            nit += 1
            self.iterations += 1
            f_old, f = f, f_new
            if gmax <= self.gtol:
                status, message = STATUS_CONVERGED, "CONVERGENCE: NORM OF GRADIENT <= GTOL"
            elif f_old - f <= self.ftol * max(abs(f_old), abs(f), 1.0):
                status, message = STATUS_CONVERGED, "CONVERGENCE: REL_REDUCTION_OF_F_<=_FTOL"
            elif self.maxiter is not None and nit >= self.maxiter:
                status, message = STATUS_LIMIT, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
            elif self.maxfun is not None and run.nfev >= self.maxfun:
                status, message = STATUS_LIMIT, "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT"
            else:
                dphi0 = self._descent(self._direction())
        return self._result(run, f, gg, gmax, nit, status, message, rows)

    def _descent(self, dphi0):
        """``g.d`` when ``d`` is a descent direction; else clear the memory and use ``-g``;
        None when even that is not (a zero gradient)."""
        if dphi0 < 0.0:
            return dphi0
        if self._has_memory():
            self.reset()
            dphi0 = self._steepest()
            if dphi0 < 0.0:
                return dphi0
        return None

    def _result(self, run, f, gg, gmax, nit, status, message, rows):
        from optcore.baselines import Result

        params = self.parameters
        x, jac = (params, params.grads) if isinstance(params, Parameters) else (
            self._params, self._grads)
        return Result(
            x=x, jac=jac, fun=f, grad_norm=math.sqrt(gg), grad_max=gmax, nit=nit,
            nfev=run.nfev, njev=run.nfev, nhev=0, evaluations=float(run.nfev),
            seconds=time.perf_counter() - run.t0, success=status == STATUS_CONVERGED,
            status=status, message=message, method=self.method,
            trace=np.array(run.trace, dtype=np.float64).reshape(-1, 3),
            line_search=np.array(rows, dtype=np.float64).reshape(-1, 6),
        )

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n})"


_COMMON_PARAMS = """
    Parameters
    ----------
    params : Parameters or list of (param, grad) pairs
        What to optimize: a :class:`~optcore.Parameters` arena, or float32 C-contiguous
        ``(param, grad)`` array pairs used in place (gradients writeable: a failed line search
        restores them).
    gtol : float, default 1e-5
        Stop when :math:`\\|g\\|_\\infty \\le` ``gtol``.
    ftol : float, default 2.22e-9
        Stop when :math:`(f_k - f_{k+1}) / \\max(|f_k|, |f_{k+1}|, 1) \\le` ``ftol``
        (L-BFGS-B's ``factr * eps`` with ``factr = 1e7``).
    maxiter : int or None
        Iterations per :meth:`step` call.
    maxfun : int or None
        Evaluations per :meth:`step` call (checked between iterations).
    c1, c2 : float, default 1e-4, 0.9
        Strong Wolfe constants, :math:`0 < c_1 < c_2 < 1`.
    maxls : int, default 20
        Evaluations per line search.
"""


class BFGS(_QuasiNewton):
    __doc__ = r"""BFGS with a dense float64 inverse-Hessian approximation and a strong-Wolfe line search.

    ``BFGS(params, gtol=1e-5, ftol=2.22e-9, maxiter=None, maxfun=None, c1=1e-4, c2=0.9,
    maxls=20)``; ``maxiter=None`` means ``200 * n`` (SciPy's default), ``maxfun=None`` no
    limit. See the module notes for the formulas; memory :math:`4 n^2 + O(n)` bytes.
    """ + _COMMON_PARAMS + r"""
    Examples
    --------
    >>> import numpy as np, optcore
    >>> x = np.array([3.0, -2.0], dtype=np.float32); g = np.zeros(2, dtype=np.float32)
    >>> def closure():
    ...     g[...] = [2 * x[0], 20 * x[1]]
    ...     return float(x[0] ** 2 + 10 * x[1] ** 2)
    >>> r = optcore.BFGS([(x, g)]).step(closure)
    >>> r.status, bool(abs(x).max() < 1e-5)
    (0, True)
    """

    method = "optcore-bfgs"

    def __init__(self, params, *, gtol=1e-5, ftol=2.220446049250313e-09, maxiter=None,
                 maxfun=None, c1=1e-4, c2=0.9, maxls=20):
        super().__init__(params, gtol=gtol, ftol=ftol, maxiter=maxiter, maxfun=maxfun, c1=c1,
                         c2=c2, maxls=maxls)
        if maxiter is None:
            self.maxiter = 200 * self.n
        n = self.n
        self._s, self._y = self._vector(), self._vector()
        self._pairs = self._pair_table(self._s, self._y)
        self._P = np.zeros(n * (n + 1) // 2, dtype=np.float64)
        nblocks = min(n, 32)
        # row blocks of about equal area of the triangle
        self._bstart = np.unique(np.round(n * np.sqrt(np.arange(nblocks + 1) / nblocks))).astype(np.int64)
        self._scratch = np.zeros((self._bstart.size - 1) * n, dtype=np.float64)
        self._g64, self._s64, self._y64, self._w, self._d64, self._u = (
            np.zeros(n) for _ in range(6))
        self._pend_s, self._pend_v = np.zeros(n), np.zeros(n)
        self._pending = False
        self._have_h = False

    def _has_memory(self):
        return self._have_h

    def reset(self):
        self._have_h = False
        self._pending = False

    def _apply(self, g):
        """One sweep over the triangle: the pending update, then ``w = H g`` (if g)."""
        u, v = (self._pend_s, self._pend_v) if self._pending else (None, None)
        if u is None and g is None:
            return
        _qn.bfgs_pass(self._P, self.n, self._bstart, u, v, g, self._w, self._scratch)
        self._pending = False

    def _set_direction(self):
        _qn.scatter(self._main, _D, self._offsets, self._d64, 1.0)
        return _qn.dot(self._main, self._sc, _G, _D)

    def _start_direction(self):
        _qn.gather(self._main, _G, self._offsets, self._g64)
        if self._have_h:
            self._apply(self._g64)
            np.negative(self._w, out=self._d64)
        else:
            np.negative(self._g64, out=self._d64)
        return self._set_direction()

    def _pair(self):
        return _qn.pair(self._pairs, self._sc)

    def _direction(self):
        return self._set_direction()

    def _update(self, sy, yy):
        """The pending rank-two update and ``d = -H_{k+1} g_{k+1}`` (float64)."""
        g, s, y, w, u = self._g64, self._s64, self._y64, self._w, self._u
        _qn.gather(self._main, _G, self._offsets, g)
        if not sy > _EPS * yy:
            if self._have_h:
                self._apply(g)
                np.negative(w, out=self._d64)
            else:
                np.negative(g, out=self._d64)
            return
        _qn.gather(self._pairs, _S, self._offsets, s)
        _qn.gather(self._pairs, _Y, self._offsets, y)
        if self._have_h:
            self._apply(g)                      # w = H_k g_{k+1}
            np.add(w, self._d64, out=u)         # u = H_k y = w - H_k g_k
        else:
            gamma = sy / yy                     # H_0 = gamma I (eq. 6.20)
            self._P.fill(0.0)
            idx = np.arange(self.n)
            self._P[idx * (idx + 1) // 2 + idx] = gamma
            self._have_h = True
            np.multiply(g, gamma, out=w)
            np.multiply(y, gamma, out=u)
        rho = 1.0 / sy
        yu = _qn.dot64(y, u)
        v = self._pend_v
        np.multiply(u, -rho, out=v)
        v += (0.5 * (rho * rho * yu + rho)) * s
        np.copyto(self._pend_s, s)
        self._pending = True
        # H_{k+1} g_{k+1} = w + s (v.g) + v (s.g)
        d = self._d64
        np.multiply(s, -_qn.dot64(v, g), out=d)
        d -= w
        d -= _qn.dot64(s, g) * v

    def inverse_hessian(self):
        """The current inverse-Hessian approximation as a dense ``(n, n)`` float64 array
        (a new array; before the first update the identity)."""
        if not self._have_h:
            return np.eye(self.n)
        self._apply(None)
        H = np.zeros((self.n, self.n))
        rows, cols = np.tril_indices(self.n)
        H[rows, cols] = self._P
        H[cols, rows] = self._P
        return H


class LBFGS(_QuasiNewton):
    __doc__ = r"""Limited-memory BFGS: the two-loop recursion over the last ``m`` pairs (float32) on
    optcore's kernels, with a strong-Wolfe line search.

    ``LBFGS(params, m=10, gtol=1e-5, ftol=2.22e-9, maxiter=15000, maxfun=15000, c1=1e-4,
    c2=0.9, maxls=20)`` (SciPy L-BFGS-B's defaults, ``m`` its ``maxcor``). Memory
    :math:`(2m + 5)` float32 vectors of the parameters' size. See the module notes.
    """ + _COMMON_PARAMS + r"""    m : int, default 10
        Number of stored pairs :math:`(s, y)`.

    Examples
    --------
    >>> import numpy as np, optcore
    >>> from optcore.problems import Rosenbrock
    >>> prob = Rosenbrock(4)
    >>> params = prob.parameters()
    >>> r = optcore.LBFGS(params, gtol=1e-4).step(lambda: prob.loss_and_grad_(params))
    >>> r.status, bool(abs(params["x"] - 1).max() < 1e-3)
    (0, True)
    """

    method = "optcore-lbfgs"

    def __init__(self, params, *, m=10, gtol=1e-5, ftol=2.220446049250313e-09, maxiter=15000,
                 maxfun=15000, c1=1e-4, c2=0.9, maxls=20):
        m = ck.positive_int("m", m)
        super().__init__(params, gtol=gtol, ftol=ftol, maxiter=maxiter, maxfun=maxfun, c1=c1,
                         c2=c2, maxls=maxls)
        self.m = m
        ring = m + 1            # one spare slot: a rejected pair never overwrites a stored one
        S = [self._vector() for _ in range(ring)]
        Y = [self._vector() for _ in range(ring)]
        self._ring = ring
        self._pairs = [self._pair_table(S[j], Y[j]) for j in range(ring)]
        # two-loop tables: d, s_j, y_j, s_{j-1}, y_{j+1}, g
        self._loops = [TensorList([self._d, S[j], Y[j], S[(j - 1) % ring], Y[(j + 1) % ring],
                                   self._grads]) for j in range(ring)]
        self._memory = deque()   # (ring index, rho) oldest first
        self._free = 0
        self._gamma = 1.0

    def _has_memory(self):
        return bool(self._memory)

    def reset(self):
        self._memory.clear()

    def _start_direction(self):
        return self._direction()

    def _pair(self):
        return _qn.pair(self._pairs[self._free], self._sc)

    def _update(self, sy, yy):
        if sy > _EPS * yy:
            if len(self._memory) == self.m:
                self._memory.popleft()
            self._memory.append((self._free, 1.0 / sy))
            self._free = (self._free + 1) % self._ring
            self._gamma = sy / yy

    def _direction(self):
        """Two-loop recursion (Nocedal & Wright, algorithm 7.4): ``d = -H g``; returns g.d."""
        mem = self._memory
        if not mem:
            return self._steepest()
        sc, T = self._sc, self._loops
        newest, oldest = mem[-1][0], mem[0][0]
        dot = _qn.axpby(T[newest], sc, 0, 0.0, 5, 1.0, 1)           # q = g; s_new.q
        alphas = []
        for j, rho in reversed(mem):
            a = rho * dot
            alphas.append(a)
            dot = _qn.axpby(T[j], sc, 0, 1.0, 2, -a, 2 if j == oldest else 3)  # q -= a y_j
        alphas.reverse()
        for (j, rho), a in zip(mem, alphas):
            scale = self._gamma if j == oldest else 1.0              # r = gamma q at the start
            beta = rho * scale * dot
            if j == newest:                                          # d = -(r + (a - b) s)
                dot = _qn.axpby(T[j], sc, 0, -scale, 1, -(a - beta), 5)
            else:
                dot = _qn.axpby(T[j], sc, 0, scale, 1, a - beta, 4)
        return dot
