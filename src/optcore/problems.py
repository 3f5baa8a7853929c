r"""Objective functions for comparing first-order training with second-order methods.

Every problem exposes two paths to the same objective :math:`f : \mathbb{R}^n \to \mathbb{R}`:

* a **float64 path** for SciPy and for analysis: :meth:`Problem.fun`, :meth:`Problem.grad`,
  :meth:`Problem.fun_and_grad` and :meth:`Problem.hessp` (a Hessian-vector product, exact where
  the problem allows it, otherwise a central difference of gradients, see :meth:`MLP.hessp`),
  on a flat vector ``x`` of length :attr:`Problem.n` starting from :attr:`Problem.x0`;
* a **float32 first-order path** for optcore's optimizers: :meth:`Problem.parameters` returns a
  :class:`~optcore.Parameters` arena holding ``x0``, and :meth:`Problem.loss_and_grad_` writes
  the gradient into ``params.grads`` in place and returns the loss, on the whole data set or on
  a minibatch of sample indices (see :meth:`Problem.batches`).

The flat vector ``x`` is the concatenation of the named tensors of :attr:`Problem.shapes` in
order (each raveled in C order); :meth:`Problem.x_of` and :meth:`Problem.set_x` convert.

Built in: :class:`Rosenbrock`, :class:`Quadratic` (the ill-conditioned "long valley"),
:class:`LogisticRegression`, :class:`SoftmaxRegression` and :class:`MLP` (one hidden layer with
batch normalization, non-convex). The data problems default to scikit-learn's bundled
handwritten digits (:func:`load_digits`, no download); with ``holdout=`` they keep a stratified
fraction of the samples out of the objective (:func:`stratified_split`) and report the loss and
accuracy on it (:meth:`Problem.validation`).
"""
import numpy as np
from scipy.special import expit, log_expit

from optcore import _checks as ck
from optcore.params import Parameters

__all__ = [
    "Problem",
    "Rosenbrock",
    "Quadratic",
    "LogisticRegression",
    "SoftmaxRegression",
    "MLP",
    "load_digits",
    "stratified_split",
    "check_data",
    "make_problem",
    "PROBLEMS",
]


class Problem:
    """Base class of an objective with a float64 path and a float32 first-order path.

    Subclasses set :attr:`name`, :attr:`shapes` and :attr:`x0` and implement
    ``_fun_grad(x)`` (float64), ``_hessp(x, v)`` and ``_loss_grad32(p, g, idx)`` (float32
    views of the arena; ``idx`` the sample indices or ``None`` for all).

    Attributes
    ----------
    name : str
        Short name used by :mod:`optcore.compare`.
    shapes : dict of str to tuple
        Names and shapes of the tensors that make up ``x``, in order.
    x0 : ndarray of float64, shape (n,)
        The starting point.
    n_samples : int or None
        Number of data samples (``None`` when the objective has no data).
    takes_data : bool
        Whether the class is built from a data set ``X, y``.
    hessp_exact : bool
        Whether :meth:`hessp` is exact (else a finite difference of gradients).
    hessp_cost : int
        Gradient evaluations one :meth:`hessp` costs (1 when exact, counting a
        Hessian-vector product like a gradient as Pearlmutter's trick does; 2 for a central
        difference).
    """

    name = "problem"
    n_samples = None
    takes_data = False
    hessp_exact = True
    hessp_cost = 1

    def __init__(self, shapes, x0):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes.values()]
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(int)
        self.x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
        if self.x0.size != self.n:
            raise ValueError(f"x0 has {self.x0.size} elements, expected {self.n}")

    @property
    def n(self):
        """Number of variables."""
        return int(self._offsets[-1])

    # -- float64 path -----------------------------------------------------------------------

    def _vector(self, name, x):
        if not isinstance(x, np.ndarray) and not isinstance(x, (list, tuple)):
            raise TypeError(f"{name} must be an array of {self.n} numbers, got {type(x).__name__}")
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size != self.n:
            raise ValueError(f"{name} has {x.size} elements, expected {self.n}")
        return x

    def _split(self, x):
        """Views of the flat vector ``x`` shaped as :attr:`shapes`."""
        return {
            k: x[a:b].reshape(s)
            for (k, s), a, b in zip(self.shapes.items(), self._offsets, self._offsets[1:])
        }

    def fun(self, x):
        """The objective :math:`f(x)` (float64)."""
        return self._fun_grad(self._vector("x", x))[0]

    def grad(self, x):
        r"""The gradient :math:`\nabla f(x)` (float64, shape ``(n,)``)."""
        return self._fun_grad(self._vector("x", x))[1]

    def fun_and_grad(self, x):
        """``(f(x), grad(x))`` in one evaluation (what ``scipy.optimize.minimize(jac=True)``
        takes)."""
        return self._fun_grad(self._vector("x", x))

    def hessp(self, x, v):
        r"""The Hessian-vector product :math:`\nabla^2 f(x)\, v` (float64, shape ``(n,)``)."""
        return self._hessp(self._vector("x", x), self._vector("v", v))

    def _fd_hessp(self, x, v):
        r"""Central difference of gradients:
        :math:`H v \approx (\nabla f(x + h v) - \nabla f(x - h v)) / (2h)` with
        :math:`h = \epsilon^{1/3} (1 + \|x\|) / \|v\|`, :math:`\epsilon` the float64 machine
        epsilon (the step that balances truncation :math:`O(h^2)` and rounding
        :math:`O(\epsilon / h)` errors); two gradient evaluations."""
        nv = np.linalg.norm(v)
        if nv == 0.0:
            return np.zeros_like(x)
        h = np.cbrt(np.finfo(np.float64).eps) * (1.0 + np.linalg.norm(x)) / nv
        return (self._fun_grad(x + h * v)[1] - self._fun_grad(x - h * v)[1]) / (2.0 * h)

    def accuracy(self, x):
        """Fraction of samples classified correctly at ``x``, or ``None`` when the problem is
        not a classifier."""
        return None

    def validation(self, x):
        """``(loss, accuracy)`` at ``x`` on the held-out samples, or ``None`` when the problem
        has none (see the ``holdout`` parameter of the data problems)."""
        return None

    @property
    def f_star(self):
        """The minimum value of :math:`f` when it is known (closed form, or for a convex
        problem computed once by trust-region Newton-CG to a gradient norm of 1e-10 and
        cached), else ``None`` (non-convex problems)."""
        return None

    # -- float32 first-order path -----------------------------------------------------------

    def parameters(self, x=None):
        """A new :class:`~optcore.Parameters` arena (float32) holding ``x`` (default
        :attr:`x0`), with one named tensor per entry of :attr:`shapes`."""
        params = Parameters(self.shapes)
        self.set_x(params, self.x0 if x is None else x)
        return params

    def _check_params(self, params):
        if not isinstance(params, Parameters):
            raise TypeError(f"params must be optcore.Parameters, got {type(params).__name__}")
        if list(params) != list(self.shapes) or any(
            params.layout.shapes[k] != s for k, s in self.shapes.items()
        ):
            raise ValueError(
                f"params has tensors {params!r}; this problem needs {self.shapes} "
                "(use problem.parameters())"
            )

    def x_of(self, params):
        """The flat float64 vector of the values in ``params``."""
        self._check_params(params)
        return np.concatenate([params[k].reshape(-1) for k in self.shapes]).astype(np.float64)

    def set_x(self, params, x):
        """Copy the flat vector ``x`` into ``params`` (rounded to float32)."""
        self._check_params(params)
        for k, v in self._split(self._vector("x", x)).items():
            params[k] = v

    def loss_and_grad_(self, params, batch=None):
        """Float32 loss and gradient; the gradient is written into ``params.grads`` in place.

        Parameters
        ----------
        params : Parameters
            From :meth:`parameters`.
        batch : array of int, optional
            Sample indices of a minibatch (data problems only); default: all samples. The
            minibatch loss is the mean over the batch plus the full regularization term.

        Returns
        -------
        float
            The loss at ``params`` (on the batch).
        """
        self._check_params(params)
        if batch is not None:
            if self.n_samples is None:
                raise ValueError(f"batch: problem {self.name!r} has no data samples")
            batch = np.asarray(batch)
            if batch.ndim != 1 or batch.size == 0 or not np.issubdtype(batch.dtype, np.integer):
                raise ValueError("batch must be a non-empty 1-D array of sample indices")
            if batch.min() < 0 or batch.max() >= self.n_samples:
                raise ValueError(f"batch has indices outside [0, {self.n_samples})")
        views = {k: params[k] for k in self.shapes}
        grads = {k: params.grads[k] for k in self.shapes}
        return float(self._loss_grad32(views, grads, batch))

    def batches(self, batch_size=None, seed=0):
        """Endless minibatches of sample indices: each epoch a fresh permutation drawn from
        ``numpy.random.default_rng(seed)``, cut into batches of ``batch_size`` (the last one of
        an epoch may be smaller). Without data, or when ``batch_size`` is ``None`` or covers all
        samples, yields ``None`` (the full objective) forever."""
        if batch_size is not None:
            batch_size = ck.positive_int("batch_size", batch_size)
        if self.n_samples is None or batch_size is None or batch_size >= self.n_samples:
            return _full_batches()
        return _shuffled_batches(self.n_samples, batch_size, np.random.default_rng(seed))

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n})"


def _full_batches():
    while True:
        yield None


def _shuffled_batches(m, batch_size, rng):
    while True:
        perm = rng.permutation(m)
        for i in range(0, m, batch_size):
            yield perm[i : i + batch_size]


# ---------------------------------------------------------------------------------------------
# Analytic test functions


class Rosenbrock(Problem):
    r"""The Rosenbrock function in ``n`` dimensions (Rosenbrock, *The Computer Journal* 3, 1960):

    .. math::

        f(x) = \sum_{i=1}^{n-1} 100\,(x_{i+1} - x_i^2)^2 + (1 - x_i)^2,

    minimum :math:`f = 0` at :math:`x = (1, \dots, 1)`; a curved, narrow valley. For
    :math:`4 \le n \le 30` there is a second local minimum near :math:`(-1, 1, \dots, 1)`
    (Kok & Sandrock, *Evolutionary Computation* 17, 2009), where methods started from
    :math:`(-1.2, 1, -1.2, 1, \dots)` (the start used here) may stop. The Hessian-vector
    product is exact (the Hessian is tridiagonal). Same function as ``scipy.optimize.rosen``.

    Parameters
    ----------
    n : int, default 10
        Dimension (at least 2).
    """

    name = "rosenbrock"

    def __init__(self, n=10):
        n = ck.positive_int("n", n)
        if n < 2:
            raise ValueError(f"n must be at least 2, got {n}")
        x0 = np.where(np.arange(n) % 2 == 0, -1.2, 1.0)
        super().__init__({"x": (n,)}, x0)
        self.x_star = np.ones(n)

    f_star = 0.0

    @staticmethod
    def _eval(x):
        a, b = x[:-1], x[1:]
        d = b - a * a
        e = 1 - a
        f = np.sum(100 * d * d + e * e)
        g = np.zeros_like(x)
        g[:-1] = -400 * a * d - 2 * e
        g[1:] += 200 * d
        return f, g

    def _fun_grad(self, x):
        f, g = self._eval(x)
        return float(f), g

    def _hessp(self, x, v):
        a, b = x[:-1], x[1:]
        hv = np.zeros_like(x)
        # diagonal: 1200 x_i^2 - 400 x_{i+1} + 2 (i < n-1), plus 200 (i > 0)
        hv[:-1] = (1200 * a * a - 400 * b + 2) * v[:-1] - 400 * a * v[1:]
        hv[1:] += 200 * v[1:] - 400 * a * v[:-1]
        return hv

    def _loss_grad32(self, p, g, batch):
        f, grad = self._eval(p["x"])
        g["x"][...] = grad
        return f


class Quadratic(Problem):
    r"""An ill-conditioned convex quadratic, the "long valley" of gradient descent:

    .. math::

        f(x) = \tfrac12 (x - x^*)^\top A (x - x^*), \qquad
        A = Q \operatorname{diag}(\lambda_1, \dots, \lambda_n) Q^\top,

    with eigenvalues spaced geometrically from 1 to ``cond`` (so the condition number of
    :math:`A` is ``cond``) and :math:`Q` a random orthogonal matrix. Minimum :math:`f = 0` at
    :math:`x^* = (1, \dots, 1)`; start :math:`x_0 = 0`. Gradient descent needs a step below
    :math:`2/\lambda_{\max}` and then makes progress :math:`\propto \lambda_{\min}/\lambda_{\max}`
    along the valley floor (Goodfellow et al., *Deep Learning*, §4.3.1 and §8.2.1).

    Parameters
    ----------
    n : int, default 50
    cond : float, default 1000
        Condition number of the Hessian (at least 1).
    seed : int, default 0
        Seed of the rotation :math:`Q`.
    """

    name = "quadratic"

    def __init__(self, n=50, cond=1000.0, seed=0):
        n = ck.positive_int("n", n)
        cond = ck.real("cond", cond)
        if not np.isfinite(cond) or cond < 1:
            raise ValueError(f"cond must be a finite number >= 1, got {cond}")
        super().__init__({"x": (n,)}, np.zeros(n))
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        q *= np.sign(np.diag(r))
        self.eigenvalues = np.geomspace(1.0, cond, n) if n > 1 else np.ones(1)
        self.A = (q * self.eigenvalues) @ q.T
        self.A = 0.5 * (self.A + self.A.T)
        self.A32 = self.A.astype(np.float32)
        self.x_star = np.ones(n)
        self.cond = cond

    f_star = 0.0

    def _fun_grad(self, x):
        r = x - self.x_star
        g = self.A @ r
        return float(0.5 * r @ g), g

    def _hessp(self, x, v):
        return self.A @ v

    def _loss_grad32(self, p, g, batch):
        r = p["x"] - np.float32(1.0)
        np.matmul(self.A32, r, out=g["x"])
        return np.float32(0.5) * np.dot(r, g["x"])


# ---------------------------------------------------------------------------------------------
# Data


def load_digits():
    """scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes),
    read from the scikit-learn installation (no download).

    Returns
    -------
    X : ndarray of float64, shape (1797, 64)
        Pixel intensities 0..16.
    y : ndarray of int64, shape (1797,)
        Digits 0..9.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError(
            "the default data set needs scikit-learn: pip install 'optcore[demo]', "
            "or pass your own X and y"
        ) from None
    d = sk_load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def stratified_split(y, fraction=0.2, seed=0):
    r"""Indices of a stratified, seeded split of the samples into training and held-out sets.

    Each class :math:`c` with :math:`m_c` samples contributes
    :math:`\operatorname{round}(\text{fraction} \cdot m_c)` of them (round half to even), drawn
    without replacement by ``numpy.random.default_rng(seed)``, to the held-out set; the rest
    are the training set. Both index arrays are sorted, so the samples keep their order. The
    same ``y``, ``fraction`` and ``seed`` give the same split (NumPy's ``Generator`` streams
    are stable across versions for a given bit generator, PCG64).

    Parameters
    ----------
    y : array_like of int, shape (m,)
        Class labels.
    fraction : float, default 0.2
        Share of each class held out, in ``(0, 1)``.
    seed : int, default 0

    Returns
    -------
    train, held_out : ndarray of int64
        Disjoint sorted indices that together cover ``0 .. m-1``.

    Raises
    ------
    ValueError
        ``fraction`` outside ``(0, 1)``, a negative seed, ``y`` not 1-D.
    """
    fraction = ck.real("fraction", fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(y == c))[: int(round(fraction * np.sum(y == c)))]
            for c in np.unique(y)]
    held = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(y.size, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


def check_data(X, y, *, n_classes=None):
    """Validate a data set: ``X`` a finite 2-D numeric array, ``y`` integer labels.

    Parameters
    ----------
    X : array_like, shape (n_samples, n_features)
    y : array_like, shape (n_samples,)
        Labels ``0 .. k-1`` (integers, or floats with integral values).
    n_classes : int, optional
        Required number of classes (2 for logistic regression); labels must lie in
        ``0 .. n_classes-1``.

    Returns
    -------
    X : ndarray of float64
    y : ndarray of int64
    k : int
        The number of classes.

    Raises
    ------
    TypeError
        Non-numeric ``X`` or ``y``.
    ValueError
        Wrong dimensions, mismatched lengths, NaN or infinity, non-integral or negative
        labels, fewer than two classes present.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X must be numeric, got dtype {X.dtype}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise TypeError(f"y must be numeric labels, got dtype {y.dtype}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D (n_samples,), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"X must have at least 2 samples and 1 feature, got shape {X.shape}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinity")
    yf = y.astype(np.float64)
    if not np.all(np.isfinite(yf)):
        raise ValueError("y contains NaN or infinity")
    if np.any(yf != np.round(yf)) or np.any(yf < 0):
        raise ValueError("y must hold class labels 0, 1, 2, ... (non-negative integers)")
    y = yf.astype(np.int64)
    k = int(y.max()) + 1
    if n_classes is not None:
        if k > n_classes:
            raise ValueError(f"y must hold labels in 0..{n_classes - 1}, got label {k - 1}")
        k = n_classes
    if np.unique(y).size < 2:
        raise ValueError("y must contain at least two classes")
    return X, y, k


def _standardizer(X):
    """Per-feature mean and standard deviation of ``X`` (1 for constant features)."""
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    return mu, sd


class _DataProblem(Problem):
    """Shared data handling: validation, the held-out split, standardization, float32 copies,
    one-hot labels."""

    takes_data = True
    binary = False

    def __init__(self, X, y, alpha, standardize, shapes_fn, x0_fn, holdout=None, split_seed=0):
        if (X is None) != (y is None):
            raise ValueError("pass both X and y, or neither (the digits data set)")
        digits = X is None
        if digits:
            X, y = load_digits()
        X, y, k = check_data(X, y, n_classes=None if digits else (2 if self.binary else None))
        self.X_val = self.y_val = None
        if holdout is not None:
            # stratified on the labels as given (the ten digits for the default data)
            train, held = stratified_split(y, holdout, split_seed)
            X, y, self.X_val, self.y_val = X[train], y[train], X[held], y[held]
        if digits and self.binary:
            y = y % 2  # odd vs even digits
            self.y_val = None if self.y_val is None else self.y_val % 2
        X, y, k = check_data(X, y, n_classes=2 if self.binary else None)
        if self.y_val is not None and self.y_val.max() >= k:
            raise ValueError(f"the held-out samples have label {self.y_val.max()}, which "
                             f"the {y.size} training samples lack")
        self.alpha = ck.real("alpha", alpha)
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if standardize:
            mu, sd = _standardizer(X)  # training statistics, applied to the held-out samples
            X = (X - mu) / sd
            self.X_val = None if self.X_val is None else (self.X_val - mu) / sd
        self.X, self.y, self.n_classes = X, y, k
        self.n_samples, self.n_features = X.shape
        self.X32 = X.astype(np.float32)
        self.Y = np.zeros((self.n_samples, k))
        self.Y[np.arange(self.n_samples), y] = 1.0
        self.Y32 = self.Y.astype(np.float32)
        super().__init__(shapes_fn(self.n_features, k), x0_fn(self.n_features, k))

    convex = True

    @property
    def f_star(self):
        if not self.convex:
            return None
        if getattr(self, "_f_star", None) is None:
            from scipy.optimize import minimize

            r = minimize(self._fun_grad, self.x0, jac=True, hessp=self._hessp,
                         method="trust-ncg", options={"gtol": 1e-10, "maxiter": 1000})
            self._f_star = float(r.fun)
        return self._f_star

    def _rows(self, batch):
        if batch is None:
            return self.X32, self.Y32
        return self.X32[batch], self.Y32[batch]

    @property
    def n_val(self):
        """Number of held-out samples (0 without ``holdout``)."""
        return 0 if self.y_val is None else int(self.y_val.size)

    def validation(self, x):
        r"""``(loss, accuracy)`` at ``x`` on the held-out samples (``None`` without them): the
        mean cross-entropy of the model's predictions, without the L2 term (it is a property
        of the weights, not of the data), and the fraction classified correctly. The held-out
        samples are standardized with the training set's statistics."""
        if self.y_val is None:
            return None
        Z = self._logits(self._vector("x", x), self.X_val)
        if Z.ndim == 1:  # binary: z is the log-odds of class 1
            y = self.y_val == 1
            return float(np.mean(-log_expit(np.where(y, Z, -Z)))), float(np.mean((Z > 0) == y))
        lse = _logsumexp_rows(Z)[:, 0]
        loss = np.mean(lse - Z[np.arange(Z.shape[0]), self.y_val])
        return float(loss), float(np.mean(np.argmax(Z, axis=1) == self.y_val))


def _logsumexp_rows(Z):
    zmax = Z.max(axis=1, keepdims=True)
    return zmax + np.log(np.sum(np.exp(Z - zmax), axis=1, keepdims=True))


def _softmax_ce(Z, Y):
    """Mean cross-entropy of logits ``Z`` against one-hot ``Y`` and ``(P - Y) / m``."""
    lse = _logsumexp_rows(Z)
    loss = np.mean(lse[:, 0] - np.sum(Y * Z, axis=1))
    dZ = (np.exp(Z - lse) - Y) / Z.shape[0]
    return loss, dZ


class LogisticRegression(_DataProblem):
    r"""L2-regularized logistic regression (binary cross-entropy), convex:

    .. math::

        f(w, b) = \frac1m \sum_{i=1}^m \big[\log(1 + e^{z_i}) - y_i z_i\big]
                  + \frac{\alpha}{2}\|w\|^2, \qquad z_i = x_i^\top w + b,

    with the exact Hessian-vector product
    :math:`H v = \frac1m \tilde X^\top \operatorname{diag}(p(1-p))\, \tilde X v + \alpha v_w`
    (:math:`\tilde X = [X, 1]`, :math:`p = \sigma(z)`; the bias is not regularized), as in
    scikit-learn's ``LogisticRegression(solver="newton-cg")``.

    Parameters
    ----------
    X, y : array_like, optional
        Data (labels 0/1). Default: the digits data set, odd (1) vs even (0).
    alpha : float, default 1e-3
        L2 penalty on the weights.
    standardize : bool, default True
        Scale each feature to zero mean and unit variance (constant features left at 0;
        the statistics of the training samples).
    holdout : float, optional
        Fraction of each class kept out of the objective as a held-out set
        (:func:`stratified_split`, stratified on the labels given, the ten digits for the
        default data); :meth:`validation` scores it. Default: none, all samples train.
    split_seed : int, default 0
        Seed of the split.
    """

    name = "logistic"
    binary = True

    def __init__(self, X=None, y=None, *, alpha=1e-3, standardize=True, holdout=None,
                 split_seed=0):
        super().__init__(X, y, alpha, standardize,
                         lambda d, k: {"w": (d,), "b": (1,)},
                         lambda d, k: np.zeros(d + 1), holdout, split_seed)
        self.yf = self.y.astype(np.float64)
        self.yf32 = self.yf.astype(np.float32)

    def _fun_grad(self, x):
        w, b = x[:-1], x[-1]
        z = self.X @ w + b
        loss = np.mean(-log_expit(z) + (1 - self.yf) * z) + 0.5 * self.alpha * (w @ w)
        r = (expit(z) - self.yf) / self.n_samples
        g = np.empty_like(x)
        g[:-1] = self.X.T @ r + self.alpha * w
        g[-1] = r.sum()
        return float(loss), g

    def _hessp(self, x, v):
        z = self.X @ x[:-1] + x[-1]
        p = expit(z)
        u = (p * (1 - p)) * (self.X @ v[:-1] + v[-1]) / self.n_samples
        hv = np.empty_like(x)
        hv[:-1] = self.X.T @ u + self.alpha * v[:-1]
        hv[-1] = u.sum()
        return hv

    def _loss_grad32(self, p, g, batch):
        X = self.X32 if batch is None else self.X32[batch]
        y = self.yf32 if batch is None else self.yf32[batch]
        w, b = p["w"], p["b"]
        z = X @ w + b[0]
        a = np.float32(self.alpha)
        loss = np.mean(-log_expit(z) + (1 - y) * z) + 0.5 * a * np.dot(w, w)
        r = (expit(z) - y) / np.float32(len(y))
        np.matmul(X.T, r, out=g["w"])
        g["w"] += a * w
        g["b"][0] = r.sum()
        return loss

    def _logits(self, x, X):
        return X @ x[:-1] + x[-1]

    def accuracy(self, x):
        return float(np.mean((self._logits(self._vector("x", x), self.X) > 0) == (self.y == 1)))


class SoftmaxRegression(_DataProblem):
    r"""L2-regularized multinomial logistic (softmax) regression, convex:

    .. math::

        f(W, b) = \frac1m \sum_{i=1}^m \Big[\log \sum_c e^{z_{ic}} - z_{i y_i}\Big]
                  + \frac{\alpha}{2}\|W\|_F^2, \qquad Z = X W + b,

    with the exact Hessian-vector product: for a direction :math:`(V, v_b)`,
    :math:`U = X V + v_b`, :math:`D = P \odot (U - \operatorname{rowsum}(P \odot U))`,
    :math:`H v = (\frac1m X^\top D + \alpha V,\ \frac1m \mathbf 1^\top D)`.

    Parameters
    ----------
    X, y : array_like, optional
        Data (labels 0..k-1). Default: the digits data set (10 classes).
    alpha : float, default 1e-3
    standardize : bool, default True
    holdout : float, optional
        Fraction of each class kept out of the objective as a held-out set
        (:func:`stratified_split`, stratified on the labels given, the ten digits for the
        default data); :meth:`validation` scores it. Default: none, all samples train.
    split_seed : int, default 0
        Seed of the split.
    """

    name = "softmax"

    def __init__(self, X=None, y=None, *, alpha=1e-3, standardize=True, holdout=None,
                 split_seed=0):
        super().__init__(X, y, alpha, standardize,
                         lambda d, k: {"W": (d, k), "b": (k,)},
                         lambda d, k: np.zeros(d * k + k), holdout, split_seed)

    def _unpack(self, x):
        d, k = self.n_features, self.n_classes
        return x[: d * k].reshape(d, k), x[d * k :]

    def _fun_grad(self, x):
        W, b = self._unpack(x)
        loss, dZ = _softmax_ce(self.X @ W + b, self.Y)
        loss += 0.5 * self.alpha * np.sum(W * W)
        gW = self.X.T @ dZ + self.alpha * W
        return float(loss), np.concatenate([gW.ravel(), dZ.sum(axis=0)])

    def _hessp(self, x, v):
        W, b = self._unpack(x)
        V, vb = self._unpack(v)
        Z = self.X @ W + b
        P = np.exp(Z - _logsumexp_rows(Z))
        U = self.X @ V + vb
        PU = P * U
        D = (PU - P * PU.sum(axis=1, keepdims=True)) / self.n_samples
        return np.concatenate([(self.X.T @ D + self.alpha * V).ravel(), D.sum(axis=0)])

    def _loss_grad32(self, p, g, batch):
        X, Y = self._rows(batch)
        W, b = p["W"], p["b"]
        a = np.float32(self.alpha)
        loss, dZ = _softmax_ce(X @ W + b, Y)
        np.matmul(X.T, dZ, out=g["W"])
        g["W"] += a * W
        np.sum(dZ, axis=0, out=g["b"])
        return loss + 0.5 * a * np.dot(W.ravel(), W.ravel())

    def _logits(self, x, X):
        W, b = self._unpack(x)
        return X @ W + b

    def accuracy(self, x):
        return float(np.mean(np.argmax(self._logits(self._vector("x", x), self.X), axis=1)
                             == self.y))


class MLP(_DataProblem):
    r"""A one-hidden-layer network with batch normalization, softmax cross-entropy (non-convex):

    .. math::

        H = X W_1, \quad
        \hat H = \gamma \odot \frac{H - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \quad
        A = \tanh(\hat H), \quad Z = A W_2 + b_2,

    .. math::

        f = \frac1m \sum_i \Big[\log \sum_c e^{z_{ic}} - z_{i y_i}\Big]
            + \frac{\alpha}{2}\big(\|W_1\|_F^2 + \|W_2\|_F^2\big),

    with :math:`\mu_B, \sigma_B^2` the mean and biased variance of :math:`H` over the batch
    (training-mode batch norm, Ioffe & Szegedy 2015; :math:`\epsilon = 10^{-5}`). The first
    layer has no bias (batch norm's :math:`\beta` replaces it). The activation is ``tanh`` rather
    than ReLU so that :math:`f` is twice differentiable and the Newton-type methods and the
    curvature analysis see a well-defined Hessian.

    The float64 path computes batch norm in NumPy (float64); the float32 path calls
    :func:`optcore.kernels.batchnorm_forward` / :func:`optcore.kernels.batchnorm_backward`.
    :meth:`hessp` is a central difference of gradients (see ``Problem._fd_hessp``), costing
    two gradient evaluations.

    Parameters
    ----------
    X, y : array_like, optional
        Data (labels 0..k-1). Default: the digits data set.
    hidden : int, default 16
    alpha : float, default 1e-4
    standardize : bool, default True
    seed : int, default 0
        Seed of the initialization: Glorot-uniform weights (Glorot & Bengio 2010),
        :math:`\gamma = 1`, :math:`\beta = b_2 = 0`.
    holdout : float, optional
        Fraction of each class kept out of the objective as a held-out set
        (:func:`stratified_split`, stratified on the labels given, the ten digits for the
        default data); :meth:`validation` scores it. Default: none, all samples train.
    split_seed : int, default 0
        Seed of the split.
    """

    name = "mlp"
    convex = False
    hessp_exact = False
    hessp_cost = 2
    eps = 1e-5

    def __init__(self, X=None, y=None, *, hidden=16, alpha=1e-4, standardize=True, seed=0,
                 holdout=None, split_seed=0):
        self.hidden = ck.positive_int("hidden", hidden)
        rng = np.random.default_rng(seed)

        def shapes(d, k):
            return {"W1": (d, self.hidden), "gamma": (self.hidden,), "beta": (self.hidden,),
                    "W2": (self.hidden, k), "b2": (k,)}

        def x0(d, k):
            h = self.hidden
            l1 = np.sqrt(6.0 / (d + h))
            l2 = np.sqrt(6.0 / (h + k))
            return np.concatenate([rng.uniform(-l1, l1, d * h), np.ones(h), np.zeros(h),
                                   rng.uniform(-l2, l2, h * k), np.zeros(k)])

        super().__init__(X, y, alpha, standardize, shapes, x0, holdout, split_seed)

    def _forward64(self, x):
        p = self._split(x)
        H = self.X @ p["W1"]
        mean = H.mean(axis=0)
        invstd = 1.0 / np.sqrt(H.var(axis=0) + self.eps)
        Hn = (H - mean) * invstd
        A = np.tanh(p["gamma"] * Hn + p["beta"])
        return p, Hn, invstd, A, A @ p["W2"] + p["b2"]

    def _fun_grad(self, x):
        p, Hn, invstd, A, Z = self._forward64(x)
        loss, dZ = _softmax_ce(Z, self.Y)
        a = self.alpha
        loss += 0.5 * a * (np.sum(p["W1"] ** 2) + np.sum(p["W2"] ** 2))
        gW2 = A.T @ dZ + a * p["W2"]
        dY = (dZ @ p["W2"].T) * (1 - A * A)
        dgamma = np.sum(dY * Hn, axis=0)
        dbeta = dY.sum(axis=0)
        m = self.n_samples
        dH = (p["gamma"] * invstd / m) * (m * dY - dbeta - Hn * dgamma)
        gW1 = self.X.T @ dH + a * p["W1"]
        g = np.concatenate([gW1.ravel(), dgamma, dbeta, gW2.ravel(), dZ.sum(axis=0)])
        return float(loss), g

    def _hessp(self, x, v):
        return self._fd_hessp(x, v)

    def _loss_grad32(self, p, g, batch):
        from optcore.kernels import batchnorm_backward, batchnorm_forward

        X, Y = self._rows(batch)
        a = np.float32(self.alpha)
        H = X @ p["W1"]
        Yh, mean, invstd = batchnorm_forward(H, p["gamma"], p["beta"], eps=self.eps)
        A = np.tanh(Yh)
        loss, dZ = _softmax_ce(A @ p["W2"] + p["b2"], Y)
        np.matmul(A.T, dZ, out=g["W2"])
        g["W2"] += a * p["W2"]
        np.sum(dZ, axis=0, out=g["b2"])
        dY = (dZ @ p["W2"].T) * (1 - A * A)
        dH = batchnorm_backward(dY, H, p["gamma"], mean, invstd,
                                dgamma=g["gamma"], dbeta=g["beta"])[0]
        np.matmul(X.T, dH, out=g["W1"])
        g["W1"] += a * p["W1"]
        w1, w2 = p["W1"].ravel(), p["W2"].ravel()
        return loss + 0.5 * a * (np.dot(w1, w1) + np.dot(w2, w2))

    def _logits(self, x, X):
        """Logits of the samples ``X`` with batch norm in inference form: normalized by the
        mean and variance of the training set's hidden units at ``x`` (the population
        statistics, what the running averages estimate)."""
        p = self._split(x)
        H = self.X @ p["W1"]
        mean = H.mean(axis=0)
        invstd = 1.0 / np.sqrt(H.var(axis=0) + self.eps)
        A = np.tanh(p["gamma"] * ((X @ p["W1"] - mean) * invstd) + p["beta"])
        return A @ p["W2"] + p["b2"]

    def accuracy(self, x):
        Z = self._forward64(self._vector("x", x))[4]
        return float(np.mean(np.argmax(Z, axis=1) == self.y))


PROBLEMS = {
    "rosenbrock": Rosenbrock,
    "quadratic": Quadratic,
    "logistic": LogisticRegression,
    "softmax": SoftmaxRegression,
    "mlp": MLP,
}


def make_problem(name, X=None, y=None, **kwargs):
    """Build a problem by name (a key of :data:`PROBLEMS`); ``X, y`` go to the data problems.

    Raises
    ------
    ValueError
        Unknown name, or data given to a problem without data.
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    cls = PROBLEMS[name]
    if cls.takes_data:
        return cls(X, y, **kwargs)
    if X is not None or y is not None:
        raise ValueError(f"problem {name!r} takes no data")
    return cls(**kwargs)
