r"""Curvature at a point: extreme Hessian eigenvalues, critical-point type, escape direction.

Near a point :math:`\theta'` the loss is, to second order,

.. math::

    L(\theta) \approx L(\theta') + (\theta - \theta')^\top g
        + \tfrac12 (\theta - \theta')^\top H (\theta - \theta'),

with :math:`g` the gradient and :math:`H` the Hessian. At a critical point (:math:`g = 0`) the
sign of :math:`v^\top H v` decides the type: all eigenvalues of :math:`H` positive - a local
minimum; all negative - a local maximum; both signs - a saddle point, which the loss leaves
along the eigenvector :math:`u` of a negative eigenvalue :math:`\lambda`
(:math:`L(\theta' + t u) \approx L(\theta') + \tfrac12 \lambda t^2 < L(\theta')`); a zero
eigenvalue leaves the second-order test inconclusive (degenerate). The condition number
:math:`\lambda_{\max} / \lambda_{\min}` of a positive definite Hessian measures how elongated
the valley is (Goodfellow, Bengio & Courville, *Deep Learning*, §4.3 and §8.2; Nocedal &
Wright, *Numerical Optimization*, §2.1).

Only Hessian-vector products are needed: the extreme eigenvalues come from ARPACK's Lanczos
iteration (``scipy.sparse.linalg.eigsh``) on a ``LinearOperator`` whose ``matvec`` is the
problem's ``hessp`` (one run per end of the spectrum). For small ``n`` (``n <= dense_max``) the Hessian is assembled from ``n``
products (columns :math:`H e_i`), symmetrized and diagonalized with ``numpy.linalg.eigh``,
which is exact and cheaper than Lanczos at that size.
"""
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from optcore import _checks as ck

__all__ = ["Curvature", "extreme_eigenpairs", "analyze", "hessian_operator"]


@dataclass
class Curvature:
    """The curvature of an objective at a point (returned by :func:`analyze`).

    Attributes
    ----------
    kind : str
        ``"minimum"``, ``"maximum"``, ``"saddle"`` or ``"degenerate"``: the type the Hessian's
        eigenvalue signs give (meaningful as a critical-point type when ``critical``).
    critical : bool
        Whether the gradient norm is at most ``gtol``.
    grad_norm : float
    lambda_min, lambda_max : float
        Smallest and largest Hessian eigenvalues.
    condition : float
        :math:`\\lambda_{\\max} / \\lambda_{\\min}` when the Hessian is positive definite, else
        ``inf``.
    v_min, v_max : ndarray
        Unit eigenvectors of ``lambda_min`` and ``lambda_max``.
    escape_direction : ndarray or None
        At a saddle (or maximum), ``v_min``: moving along it (either sign) lowers the loss to
        second order. ``None`` otherwise.
    method : str
        ``"dense"`` or ``"eigsh"``.
    """

    kind: str
    critical: bool
    grad_norm: float
    lambda_min: float
    lambda_max: float
    condition: float
    v_min: np.ndarray
    v_max: np.ndarray
    escape_direction: object
    method: str


def hessian_operator(problem, x):
    """``scipy.sparse.linalg.LinearOperator`` of the Hessian of ``problem`` at ``x`` (float64,
    symmetric), whose ``matvec`` calls ``problem.hessp(x, v)``."""
    x = problem._vector("x", x)
    n = problem.n
    return LinearOperator((n, n), matvec=lambda v: problem.hessp(x, np.ravel(v)),
                          dtype=np.float64)


def extreme_eigenpairs(problem, x, *, dense_max=200, tol=1e-10, maxiter=None, ncv=40, seed=0):
    r"""The smallest and largest eigenvalues of the Hessian at ``x`` and their eigenvectors.

    Parameters
    ----------
    problem : optcore.problems.Problem
        Anything with ``n``, ``hessp(x, v)`` and ``_vector``.
    x : array_like, shape (n,)
    dense_max : int, default 200
        Up to this ``n`` the Hessian is assembled from ``n`` Hessian-vector products and
        diagonalized exactly (``numpy.linalg.eigh``); above it, two Lanczos runs on the
        Hessian operator, ``eigsh(k=1, which="LA")`` and ``eigsh(k=1, which="SA")``. ``n < 3``
        always uses the dense path (ARPACK needs ``k < n``).
    tol : float, default 1e-10
        Relative accuracy of ``eigsh``.
    maxiter : int, optional
        ``eigsh`` iteration limit (default ``10 n``).
    ncv : int, default 40
        Lanczos basis size (capped at ``n``). The smallest eigenvalue of an ill-conditioned
        Hessian sits in a cluster that is tight relative to the spectrum's width and converges
        slowly; a basis larger than ARPACK's default (20) makes the restarts effective (with
        eigenvalues spaced geometrically from 1 to :math:`10^4`, ``n = 300``: no convergence
        in 3000 restarts with 20, under a second with 40). Raise it, ``maxiter`` or
        ``dense_max`` if ``ArpackNoConvergence`` is raised.
    seed : int, default 0
        Seed of ``eigsh``'s start vector (results reproducible).

    Returns
    -------
    (lambda_min, v_min), (lambda_max, v_max), method
    """
    x = problem._vector("x", x)
    n = problem.n
    dense_max = ck.positive_int("dense_max", dense_max) if dense_max else 0
    if n <= max(dense_max, 2):
        eye = np.eye(n)
        H = np.column_stack([problem.hessp(x, eye[i]) for i in range(n)])
        w, V = np.linalg.eigh(0.5 * (H + H.T))
        return (float(w[0]), V[:, 0]), (float(w[-1]), V[:, -1]), "dense"
    v0 = np.random.default_rng(seed).standard_normal(n)
    op = hessian_operator(problem, x)
    ncv = min(n, max(3, ck.positive_int("ncv", ncv)))
    ends = [eigsh(op, k=1, which=w, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0) for w in ("SA", "LA")]
    (w_lo, V_lo), (w_hi, V_hi) = ends
    return (float(w_lo[0]), V_lo[:, 0]), (float(w_hi[0]), V_hi[:, 0]), "eigsh"


def analyze(problem, x, *, gtol=1e-5, rtol=1e-8, **eig_kwargs):
    r"""Classify the point ``x`` of ``problem`` from the extreme eigenvalues of its Hessian.

    Parameters
    ----------
    problem : optcore.problems.Problem
    x : array_like, shape (n,)
    gtol : float, default 1e-5
        The point is critical when :math:`\|\nabla f(x)\| \le` ``gtol``.
    rtol : float, default 1e-8
        Eigenvalues with :math:`|\lambda| \le` ``rtol`` :math:`\cdot \max|\lambda|` count as
        zero (the Hessian is then degenerate unless the other end decides a saddle).
    **eig_kwargs
        Passed to :func:`extreme_eigenpairs` (``dense_max``, ``tol``, ``maxiter``, ``ncv``,
        ``seed``).

    Returns
    -------
    Curvature

    Examples
    --------
    >>> from optcore.problems import Rosenbrock
    >>> from optcore.curvature import analyze
    >>> c = analyze(Rosenbrock(2), [1.0, 1.0])
    >>> c.kind, c.critical, round(c.condition)
    ('minimum', True, 2508)
    """
    x = problem._vector("x", x)
    gtol = ck.nonnegative("gtol", gtol)
    rtol = ck.nonnegative("rtol", rtol)
    (lo, v_lo), (hi, v_hi), method = extreme_eigenpairs(problem, x, **eig_kwargs)
    zero = rtol * max(abs(lo), abs(hi))
    if lo > zero:
        kind = "minimum"
    elif hi < -zero:
        kind = "maximum"
    elif lo < -zero and hi > zero:
        kind = "saddle"
    else:
        kind = "degenerate"
    gnorm = float(np.linalg.norm(problem.grad(x)))
    return Curvature(
        kind=kind,
        critical=gnorm <= gtol,
        grad_norm=gnorm,
        lambda_min=lo,
        lambda_max=hi,
        condition=hi / lo if kind == "minimum" else float("inf"),
        v_min=v_lo,
        v_max=v_hi,
        escape_direction=v_lo if kind in ("saddle", "maximum") else None,
        method=method,
    )
