r"""Second-order baselines from SciPy and first-order training with optcore, behind one record.

:func:`minimize` runs ``scipy.optimize.minimize`` with one of the methods of :data:`METHODS`
on a :mod:`optcore.problems` objective (float64); :func:`train` runs one of optcore's
optimizers on the problem's float32 path. Both return a :class:`Result`, modelled on SciPy's
``OptimizeResult``, with the same accounting so that budgets compare like with like:

* ``nfev`` / ``njev`` count objective-and-gradient evaluations (SciPy is always given the
  function and its gradient together, ``jac=True``, so the two are equal); for :func:`train`
  they count minibatch evaluations.
* ``nhev`` counts Hessian-vector products.
* ``evaluations`` is the cost in **full-data gradient evaluations**: for SciPy
  ``nfev + hessp_cost * nhev`` (a Hessian-vector product costs about one gradient when exact,
  two when it is a difference of gradients, see :attr:`optcore.problems.Problem.hessp_cost`);
  for :func:`train`, each step costs ``batch_size / n_samples`` (one epoch = 1).
* ``epochs`` is the cost in **passes over the training data** (the unit of
  ``units="epochs"``): an evaluation of :math:`(f, \nabla f)` on all samples is one pass, a
  Hessian-vector product :data:`HESSP_PASSES` passes (exact or by differences: a forward and a
  backward sweep at the point and along the direction, Pearlmutter 1994), a step on a
  minibatch of :math:`b` samples :math:`b / m` (the last, smaller batch of an epoch its true
  share, so that an epoch costs exactly 1).
* ``seconds`` is the wall time spent optimizing; the trace's extra full-data loss evaluations
  of :func:`train` are made with the clock stopped and are not counted.

``budget=`` limits one of the two costs, chosen by ``units`` (``"evals"``, the default, or
``"epochs"``); both are always recorded.
"""
import math
import time
from numbers import Real

import numpy as np
from scipy.optimize import OptimizeResult
from scipy.optimize import minimize as _sp_minimize

from optcore import _checks as ck
from optcore.clip import ClipPolicy, GlobalNorm
from optcore.optim import Optimizer
from optcore.params import Parameters
from optcore.problems import Problem

__all__ = ["Result", "minimize", "train", "quasi_newton", "planned_steps", "METHODS", "UNITS",
           "HESSP_PASSES", "STATUS_BUDGET", "STATUS_TIME", "STATUS_DIVERGED"]

#: SciPy methods supported by :func:`minimize`, with whether they use Hessian-vector products.
METHODS = {"newton-cg": True, "bfgs": False, "cg": False, "l-bfgs-b": False, "trust-ncg": True}

#: Units of ``budget=``: full-data gradient evaluations or passes over the training data.
UNITS = ("evals", "epochs")
#: Passes over the data one Hessian-vector product costs under ``units="epochs"``.
HESSP_PASSES = 2.0

#: ``Result.status`` when the evaluation budget stopped the run.
STATUS_BUDGET = 101
#: ``Result.status`` when the time limit stopped the run.
STATUS_TIME = 102
#: ``Result.status`` when the loss became NaN or infinite (:func:`train`).
STATUS_DIVERGED = 103


class Result(OptimizeResult):
    """The record of one run: SciPy's ``OptimizeResult`` fields plus cost and a trace.

    Attributes
    ----------
    x : ndarray
        Final point (float64). For a run stopped by its budget, the best point evaluated.
    fun : float
        Full-data objective at ``x`` (float64 path).
    grad_norm : float
        Euclidean norm of the full-data gradient at ``x``.
    nit, nfev, njev, nhev : int
        Iterations (steps), function/gradient evaluations and Hessian-vector products.
    evaluations : float
        Cost in full-data gradient evaluations (see the module notes).
    epochs : float
        Cost in passes over the training data (see the module notes).
    seconds : float
        Wall time of the optimization.
    success : bool
        SciPy's convergence flag; for :func:`train`, ``True`` unless the loss diverged.
    status : int
        SciPy's status code, or :data:`STATUS_BUDGET`, :data:`STATUS_TIME`,
        :data:`STATUS_DIVERGED`; 0 when :func:`train` completed.
    message : str
    method, problem : str
        What ran on what.
    accuracy : float or None
        Training accuracy at ``x`` for classification problems.
    val_loss, val_accuracy : float or None
        Cross-entropy and accuracy at ``x`` on the problem's held-out samples
        (:meth:`optcore.problems.Problem.validation`), ``None`` when it has none.
    trace : ndarray, shape (k, 4)
        Rows ``(evaluations, seconds, loss, epochs)``: for SciPy and :func:`quasi_newton` every
        evaluation (trial points of line searches included; a last row at the total cost when
        Hessian-vector products followed the last evaluation), for :func:`train` the full-data
        loss at regular checkpoints.
    """

    def to_dict(self):
        """A dict for strict JSON: arrays as (nested) lists, NumPy scalars as Python numbers,
        NaN and infinities (a diverged run) as ``None``."""
        out = {}
        for k, v in self.items():
            if isinstance(v, np.ndarray):
                v = np.where(np.isfinite(v), v, None).tolist() if v.dtype.kind == "f" else v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[k] = v
        return out


class _Stop(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class _Meter:
    """Counts evaluations against the budget and the clock, and keeps the trace."""

    def __init__(self, budget, time_limit, units="evals"):
        self.budget = budget
        self.time_limit = time_limit
        self.units = units
        self.evaluations = 0.0
        self.epochs = 0.0
        self.nfev = 0
        self.nhev = 0
        self.nit = 0
        self.trace = []
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def elapsed(self):
        return time.perf_counter() - self.t0 - self.paused

    def charge(self, cost, passes):
        """Charge ``cost`` evaluations and ``passes`` epochs, or stop before exceeding the
        budget (in ``units``) or the time limit."""
        spent, extra = (self.evaluations, cost) if self.units == "evals" else (self.epochs, passes)
        if self.budget is not None and spent + extra > self.budget * (1 + 1e-12):
            what = "evaluation" if self.units == "evals" else "epoch"
            raise _Stop(STATUS_BUDGET, f"{what} budget of {self.budget:g} exhausted")
        if self.time_limit is not None and self.elapsed() > self.time_limit:
            raise _Stop(STATUS_TIME, f"time limit of {self.time_limit:g} s reached")
        self.evaluations += cost
        self.epochs += passes

    def record(self, loss):
        self.trace.append((self.evaluations, self.elapsed(), float(loss), self.epochs))


def _limits(budget, time_limit, units="evals"):
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    if budget is not None:
        budget = ck.real("budget", budget)
        if not budget > 0 or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number > 0, got {budget}")
    if time_limit is not None:
        time_limit = ck.real("time_limit", time_limit)
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    return budget, time_limit


def _finish(problem, x, meter, seconds, **fields):
    f, g = problem.fun_and_grad(x)
    trace = np.array(meter.trace, dtype=np.float64).reshape(-1, 4)
    val = None
    if getattr(problem, "n_val", 0):
        val = problem.validation(x) if np.all(np.isfinite(x)) else (math.nan, math.nan)
    return Result(
        x=x, fun=float(f), grad_norm=float(np.linalg.norm(g)), nit=meter.nit, nhev=meter.nhev,
        evaluations=float(meter.evaluations), epochs=float(meter.epochs), seconds=float(seconds),
        problem=problem.name, accuracy=problem.accuracy(x), trace=trace,
        val_loss=None if val is None else val[0], val_accuracy=None if val is None else val[1],
        **fields,
    )


def minimize(problem, method, *, maxiter=None, budget=None, time_limit=None, tol=None,
             units="evals"):
    r"""Minimize a problem with ``scipy.optimize.minimize``.

    Parameters
    ----------
    problem : optcore.problems.Problem
    method : {"newton-cg", "bfgs", "cg", "l-bfgs-b", "trust-ncg"}
        Line-search Newton-CG (the Newton system :math:`H p = -g` solved inexactly by conjugate
        gradients on Hessian-vector products), BFGS (quasi-Newton, a dense inverse-Hessian
        approximation), nonlinear conjugate gradients (Polak-Ribière), L-BFGS-B (limited-memory
        BFGS, bounds unused) and the trust-region Newton-CG of Steihaug; Nocedal & Wright,
        *Numerical Optimization* (2006), chapters 5-7. Case-insensitive.
    maxiter : int, optional
        Iteration limit (SciPy's default when omitted).
    budget : float, optional
        Limit in ``units`` (Hessian-vector products included at their cost). When reached,
        the run stops and returns the best point evaluated with ``status = STATUS_BUDGET``.
    time_limit : float, optional
        Limit in seconds of wall time (checked before each evaluation).
    tol : float, optional
        SciPy's ``tol`` (method-specific gradient/step tolerance).
    units : {"evals", "epochs"}, default "evals"
        Unit of ``budget``: full-data gradient evaluations or passes over the data (see the
        module notes).

    Returns
    -------
    Result

    Raises
    ------
    ValueError
        Unknown method, or ``budget``/``time_limit``/``maxiter`` not positive.

    Examples
    --------
    >>> from optcore.problems import Rosenbrock
    >>> from optcore.baselines import minimize
    >>> r = minimize(Rosenbrock(4), "trust-ncg", tol=1e-10)
    >>> bool(r.success), round(r.fun, 8)
    (True, 0.0)
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an optcore.problems.Problem, got {type(problem).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    budget, time_limit = _limits(budget, time_limit, units)
    options = {}
    if maxiter is not None:
        options["maxiter"] = ck.positive_int("maxiter", maxiter)
    if tol is not None:
        tol = ck.real("tol", tol)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")

    meter = _Meter(budget, time_limit, units)
    best = {"f": math.inf, "x": problem.x0.copy()}

    def fun(x):
        meter.charge(1, 1.0)
        meter.nfev += 1
        f, g = problem.fun_and_grad(x)
        meter.record(f)
        if f < best["f"]:
            best["f"], best["x"] = f, x.copy()
        return f, g

    def hessp(x, v):
        meter.charge(problem.hessp_cost, HESSP_PASSES)
        meter.nhev += 1
        return problem.hessp(x, v)

    def callback(xk):
        meter.nit += 1

    kwargs = {"hessp": hessp} if METHODS[key] else {}
    try:
        res = _sp_minimize(fun, problem.x0.copy(), jac=True, method=key, tol=tol,
                           callback=callback, options=options, **kwargs)
        seconds = meter.elapsed()
        x, success, status, message = res.x, bool(res.success), int(res.status), str(res.message)
        meter.nit = int(res.get("nit", meter.nit))
    except _Stop as stop:
        seconds = meter.elapsed()
        x, success, status, message = best["x"], False, stop.status, stop.message
    if meter.trace and meter.evaluations > meter.trace[-1][0]:
        # Hessian-vector products after the last evaluation: extend the trace to the cost spent
        meter.trace.append((meter.evaluations, seconds, min(best["f"], meter.trace[-1][2]),
                            meter.epochs))
    return _finish(problem, np.asarray(x, dtype=np.float64), meter, seconds, method=key,
                   nfev=meter.nfev, njev=meter.nfev, success=success, status=status,
                   message=message)


def planned_steps(budget, n_samples, batch_size, units="evals"):
    r"""The number of steps of :func:`train` that ``budget`` pays for: ``budget`` divided by
    a step's cost under ``units="evals"``; under ``"epochs"`` the whole epochs' steps
    (:math:`\lceil m / b \rceil` each) plus the steps of the last, partial epoch, whose
    batches are all full but its smaller last one.

    Parameters
    ----------
    budget : float
    n_samples : int or None
        Samples :math:`m` (``None``: no data, every step costs 1).
    batch_size : int or None
        :math:`b` (``None``: full batch).
    units : {"evals", "epochs"}
    """
    if n_samples is None or batch_size is None or batch_size >= n_samples:
        return math.floor(budget + 1e-9)
    if units == "evals":
        return math.floor(budget * n_samples / batch_size + 1e-9)
    whole = math.floor(budget + 1e-12)
    per_epoch = -(-n_samples // batch_size)
    rest = math.floor((budget - whole) * n_samples / batch_size + 1e-9)
    return whole * per_epoch + min(rest, per_epoch - 1)


def train(problem, optimizer, steps=None, *, budget=None, time_limit=None, batch_size=None,
          seed=0, schedule=None, clip=None, trace_points=100, name=None, units="evals",
          **hyper):
    r"""Train a problem with one of optcore's first-order optimizers on its float32 path.

    Each step: :meth:`Problem.loss_and_grad_` writes the (minibatch) gradient into the
    parameter arena and ``optimizer.step(lr=schedule(t))`` updates in place (with clipping
    fused into the step when ``clip`` is given).

    Parameters
    ----------
    problem : optcore.problems.Problem
    optimizer : type or Optimizer
        An optimizer class (e.g. ``optcore.Adam``), built here over
        ``problem.parameters()`` with ``**hyper``; or an instance already built over a
        :class:`~optcore.Parameters` arena from ``problem.parameters()``.
    steps : int, optional
        Number of steps. At least one of ``steps``, ``budget``, ``time_limit`` is required;
        the first limit reached stops the run.
    budget : float, optional
        Limit in ``units``: full-data gradient evaluations (a step on a batch of ``b`` of
        ``m`` samples costs ``b / m``) or passes over the data (a step costs its batch's
        share of the samples).
    time_limit : float, optional
        Limit in seconds.
    batch_size : int, optional
        Minibatch size for data problems (default: full batch). Batches are drawn from
        ``Problem.batches(batch_size, seed)``.
    seed : int, default 0
    schedule : callable, optional
        ``schedule(t) -> lr`` for step ``t = 0, 1, ...``; default: the optimizer's ``lr``.
    clip : float or optcore.clip.ClipPolicy, optional
        With an optimizer class: its ``clip=`` policy; a number :math:`c` means
        ``optcore.clip.GlobalNorm(c)``, :math:`g \leftarrow g \min(1, c / \|g\|_2)` as
        ``torch.nn.utils.clip_grad_norm_``, applied on the fly inside the fused step.
    trace_points : int, default 100
        About how many full-data loss checkpoints to record (clock stopped while recording).
    name : str, optional
        ``Result.method``; default the optimizer's class name in lower case.
    units : {"evals", "epochs"}, default "evals"
        Unit of ``budget`` (see the module notes).
    **hyper
        Hyper-parameters for the optimizer class (e.g. ``lr=1e-3``).

    Returns
    -------
    Result
        ``nit`` steps taken; ``status`` 0, or :data:`STATUS_BUDGET` / :data:`STATUS_TIME` when
        a budget stopped it before ``steps``, or :data:`STATUS_DIVERGED` (``success=False``)
        when the loss became NaN or infinite.

    Examples
    --------
    >>> import optcore
    >>> from optcore.problems import Quadratic
    >>> from optcore.baselines import train
    >>> r = train(Quadratic(10, cond=10.0), optcore.Adam, steps=500, lr=0.05)
    >>> r.fun < 1e-3
    True
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an optcore.problems.Problem, got {type(problem).__name__}")
    if isinstance(clip, bool) or isinstance(clip, Real):
        clip = GlobalNorm(ck.real("clip", clip))
    elif clip is not None and not isinstance(clip, ClipPolicy):
        raise TypeError(f"clip must be a number or an optcore.clip policy, got {type(clip).__name__}")
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        params = problem.parameters()
        opt = optimizer(params, clip=clip, **hyper)
    elif isinstance(optimizer, Optimizer):
        if hyper or clip is not None:
            raise TypeError("hyper-parameters and clip= go to an optimizer class, not an instance")
        params = optimizer.parameters
        if not isinstance(params, Parameters):
            raise ValueError("optimizer must be built over a Parameters arena from problem.parameters()")
        problem._check_params(params)
        opt = optimizer
    else:
        raise TypeError(f"optimizer must be an optcore Optimizer class or instance, got {optimizer!r}")
    if steps is not None:
        steps = ck.positive_int("steps", steps)
    budget, time_limit = _limits(budget, time_limit, units)
    if steps is None and budget is None and time_limit is None:
        raise ValueError("give steps, budget or time_limit")
    if schedule is not None and not callable(schedule):
        raise TypeError("schedule must be callable: schedule(t) -> lr")
    trace_points = ck.positive_int("trace_points", trace_points)
    batches = problem.batches(batch_size, seed)
    m = problem.n_samples
    cost = 1.0 if m is None or batch_size is None else min(1.0, batch_size / m)
    planned = [s for s in (steps, None if budget is None else planned_steps(
        budget, m, batch_size, units)) if s is not None]
    every = max(1, min(planned) // trace_points) if planned else 10

    meter = _Meter(budget, time_limit, units)

    def checkpoint():
        t = time.perf_counter()
        loss = problem.fun(problem.x_of(params))
        meter.paused += time.perf_counter() - t
        meter.record(loss)
        return loss

    status, message, success = 0, None, True
    checkpoint()
    while steps is None or meter.nit < steps:
        batch = next(batches)
        try:
            meter.charge(cost, 1.0 if batch is None else batch.size / m)
        except _Stop as stop:
            status, message = stop.status, stop.message
            break
        loss = problem.loss_and_grad_(params, batch)
        meter.nfev += 1
        if not math.isfinite(loss):
            status, success = STATUS_DIVERGED, False
            message = f"loss became {loss} at step {meter.nit}"
            break
        opt.step(lr=None if schedule is None else schedule(meter.nit))
        meter.nit += 1
        if meter.nit % every == 0:
            checkpoint()
    seconds = meter.elapsed()
    if meter.nit % every != 0 or meter.nit == 0:
        checkpoint()
    if message is None:
        message = f"completed {meter.nit} steps"
    x = problem.x_of(params)
    if not np.all(np.isfinite(x)):
        status, success, message = STATUS_DIVERGED, False, "parameters became non-finite"
    return _finish(problem, x, meter, seconds, method=name or type(opt).__name__.lower(),
                   nfev=meter.nfev, njev=meter.nfev, success=success, status=status,
                   message=message)


def quasi_newton(problem, optimizer, *, budget=None, time_limit=None, units="evals", name=None,
                 **hyper):
    r"""Minimize a problem with a full-batch optimizer driven by ``step(closure)``
    (:class:`optcore.BFGS`, :class:`optcore.LBFGS`) on its float32 path.

    The closure evaluates the loss and the full-data gradient (written into the arena in
    place by :meth:`Problem.loss_and_grad_`); every call is charged one evaluation and one
    pass over the data, and the budget or the time limit stop the run from inside it, at
    which point the best point evaluated is returned, as :func:`minimize` does.

    Parameters
    ----------
    problem : optcore.problems.Problem
    optimizer : type
        A class built as ``optimizer(problem.parameters(), **hyper)`` whose
        ``step(closure)`` minimizes until its own stopping rules hold and counts its
        iterations in ``iterations``.
    budget : float, optional
        Limit in ``units``.
    time_limit : float, optional
        Limit in seconds (checked before each evaluation).
    units : {"evals", "epochs"}, default "evals"
    name : str, optional
        ``Result.method``; default the optimizer's ``method`` attribute.
    **hyper
        Options of the optimizer (``gtol``, ``m``, ...).

    Returns
    -------
    Result
        ``status`` the optimizer's (0 converged), or :data:`STATUS_BUDGET` /
        :data:`STATUS_TIME`; ``nit`` the iterations completed.

    Examples
    --------
    >>> import optcore
    >>> from optcore.problems import Quadratic
    >>> from optcore.baselines import quasi_newton
    >>> r = quasi_newton(Quadratic(10, cond=10.0), optcore.LBFGS, budget=100)
    >>> r.fun < 1e-9, r.method
    (True, 'optcore-lbfgs')
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an optcore.problems.Problem, got {type(problem).__name__}")
    if not (isinstance(optimizer, type) and callable(getattr(optimizer, "step", None))):
        raise TypeError(f"optimizer must be a class with step(closure), got {optimizer!r}")
    budget, time_limit = _limits(budget, time_limit, units)
    params = problem.parameters()
    opt = optimizer(params, **hyper)
    meter = _Meter(budget, time_limit, units)
    best = {"f": math.inf, "x": problem.x0.copy()}

    def closure():
        meter.charge(1, 1.0)
        meter.nfev += 1
        f = problem.loss_and_grad_(params)
        meter.record(f)
        if f < best["f"]:
            best["f"], best["x"] = f, problem.x_of(params)
        return f

    try:
        res = opt.step(closure)
        seconds = meter.elapsed()
        x, success, status, message = (problem.x_of(params), bool(res.success),
                                       int(res.status), str(res.message))
    except _Stop as stop:
        seconds = meter.elapsed()
        x, success, status, message = best["x"], False, stop.status, stop.message
    meter.nit = int(opt.iterations)
    return _finish(problem, x, meter, seconds, method=name or optimizer.method,
                   nfev=meter.nfev, njev=meter.nfev, success=success, status=status,
                   message=message)
