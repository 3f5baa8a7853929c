r"""First-order training against second-order methods on the same objectives.

:func:`run` trains every problem of :data:`optcore.problems.PROBLEMS` with every first-order
optimizer of optcore (each with and without global-norm clipping, under a warm-up + cosine
learning-rate schedule) and minimizes it with every SciPy method of
:data:`optcore.baselines.METHODS` and with optcore's quasi-Newton methods
(:data:`QUASI_NEWTON`), all under the same budget of full-data gradient evaluations; :func:`format_table` prints the records, :func:`plot` draws loss against
evaluations and against wall time, :func:`write` stores plots and JSON. The ``optcore
compare`` command is a thin wrapper (see :mod:`optcore.cli`).

First-order methods run on minibatches of :data:`BATCH_SIZE` samples for the data problems
(full batch for the analytic ones); their learning rates (:data:`LEARNING_RATES`) were picked
per problem from the grid :math:`\{10^{-4}, 3\cdot10^{-4}, \dots, 1\}` on the default problems
with seed 0 and the default budget, once, by the lowest final loss without clipping (on all
the samples, before the held-out split below; not re-tuned since). SciPy methods always use the
full data, in float64; optcore's quasi-Newton methods the full data, in float32.

The data problems hold out a fixed stratified :data:`HOLDOUT` share of the samples
(:func:`optcore.problems.stratified_split`, seed :data:`SPLIT_SEED`, whatever ``seed`` is):
the methods train on the rest, and every record carries the loss and accuracy on the held-out
samples. :data:`REGIMES` says what is held equal between methods: full-data gradient
evaluations (the default), passes over the training data, or wall time.
"""
import contextlib
import json
import math
import os
import sys
import time
import warnings

import numpy as np

import optcore
from optcore import _checks as ck
from optcore import baselines, problems
from optcore.clip import GlobalNorm

__all__ = ["run", "format_table", "plot", "write", "Records", "FIRST_ORDER", "SCIPY_METHODS",
           "QUASI_NEWTON", "full_batch",
           "DEFAULT_METHODS", "DEFAULT_PROBLEMS", "LEARNING_RATES", "BUDGETS", "REGIMES",
           "HOLDOUT", "SPLIT_SEED", "warmup_cosine", "run_method", "first_order_setup",
           "first_order_steps", "layout", "session", "check_seed"]

#: optcore optimizers of the suite: name -> (class, fixed hyper-parameters).
FIRST_ORDER = {
    "sgd": (optcore.SGD, {"momentum": 0.9}),
    "adagrad": (optcore.AdaGrad, {}),
    "rmsprop": (optcore.RMSProp, {}),
    "adam": (optcore.Adam, {}),
    "adamw": (optcore.AdamW, {"weight_decay": 1e-4}),
    "adamax": (optcore.AdaMax, {}),
    "nadam": (optcore.NAdam, {}),
}
#: SciPy methods of the suite.
SCIPY_METHODS = tuple(baselines.METHODS)
#: optcore's quasi-Newton methods (full batch, float32 path, ``step(closure)``), run by
#: :func:`optcore.baselines.quasi_newton` with their default options.
QUASI_NEWTON = {"optcore-bfgs": optcore.BFGS, "optcore-lbfgs": optcore.LBFGS}
#: Suffix of a first-order method run with global-norm clipping, e.g. ``"adam+clip"``.
CLIP_SUFFIX = "+clip"
DEFAULT_METHODS = (
    tuple(FIRST_ORDER) + tuple(m + CLIP_SUFFIX for m in FIRST_ORDER) + SCIPY_METHODS
    + tuple(QUASI_NEWTON)
)
DEFAULT_PROBLEMS = tuple(problems.PROBLEMS)

#: Default budget per problem, in full-data gradient evaluations.
BUDGETS = {"rosenbrock": 1000, "quadratic": 1000, "logistic": 60, "softmax": 60, "mlp": 60}
#: Budget of ``quick=True`` (a smoke test, not a comparison).
QUICK_BUDGET = 4
#: Wall-time limit per run in seconds (dense BFGS costs O(n^2) memory and O(n^3) per
#: iteration in SciPy's implementation and would otherwise dominate on the MLP).
TIME_LIMIT = 10.0
QUICK_TIME_LIMIT = 1.0
#: What ``regime=`` holds equal: ``"evals"`` a budget of full-data gradient evaluations
#: (:data:`BUDGETS`), ``"epochs"`` the same numbers as passes over the training data
#: (``units="epochs"`` of :mod:`optcore.baselines`), ``"time"`` the wall time per run.
REGIMES = ("evals", "epochs", "time")
#: Seconds per run under ``regime="time"`` (and with ``quick``).
TIME_REGIME_LIMIT = 0.5
QUICK_TIME_REGIME_LIMIT = 0.05
#: Steps timed to size the learning-rate schedule of a first-order run under a time limit.
CALIBRATION_STEPS = 10
#: Share of each class of the data problems held out, and the seed of that split.
HOLDOUT = 0.2
SPLIT_SEED = 0
#: Minibatch size of the first-order methods on the data problems.
BATCH_SIZE = 128
#: Global-norm clipping threshold per problem (``"<method>+clip"``).
CLIP_NORMS = {"rosenbrock": 10.0, "quadratic": 10.0, "logistic": 1.0, "softmax": 1.0, "mlp": 1.0}
#: Peak learning rate per problem and optimizer (see the module notes).
LEARNING_RATES = {
    "rosenbrock": {"sgd": 0.001, "adagrad": 1, "rmsprop": 0.1, "adam": 1,
                  "adamw": 1, "adamax": 1, "nadam": 0.3},
    "quadratic": {"sgd": 0.003, "adagrad": 1, "rmsprop": 0.1, "adam": 1,
                 "adamw": 1, "adamax": 1, "nadam": 0.3},
    "logistic": {"sgd": 0.1, "adagrad": 1, "rmsprop": 0.03, "adam": 0.1,
                "adamw": 0.1, "adamax": 0.3, "nadam": 0.1},
    "softmax": {"sgd": 0.3, "adagrad": 1, "rmsprop": 0.03, "adam": 0.03,
               "adamw": 0.03, "adamax": 0.3, "nadam": 0.03},
    "mlp": {"sgd": 0.1, "adagrad": 0.3, "rmsprop": 0.01, "adam": 0.03,
           "adamw": 0.03, "adamax": 0.1, "nadam": 0.03},
}


def warmup_cosine(lr, total_steps, warmup=0.02):
    r"""Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0
    (Loshchilov & Hutter 2017, without restarts; Goyal et al. 2017 for the warm-up):

    .. math::

        \eta_t = \begin{cases} \eta \frac{t + 1}{w} & t < w \\
        \frac{\eta}{2}\Big(1 + \cos \frac{\pi (t - w)}{T - w}\Big) & t \ge w \end{cases}

    with :math:`w = \lceil \text{warmup} \cdot T \rceil`, :math:`T` = ``total_steps``.
    """
    total = max(1, int(total_steps))
    w = min(total - 1, math.ceil(warmup * total))

    def schedule(t):
        if t < w:
            return lr * (t + 1) / w
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(t - w, total - w) / max(1, total - w)))

    return schedule


def full_batch(method):
    """Whether ``method`` is one of the full-batch methods of the suite (SciPy's, optcore's
    quasi-Newton), as opposed to the minibatch first-order ones."""
    return method in SCIPY_METHODS or method in QUASI_NEWTON


def _parse_methods(methods):
    if methods is None:
        return list(DEFAULT_METHODS)
    out = []
    for m in methods:
        if not isinstance(m, str):
            raise TypeError(f"methods must be strings, got {m!r}")
        key = m.strip().lower()
        base = key[: -len(CLIP_SUFFIX)] if key.endswith(CLIP_SUFFIX) else key
        if base not in FIRST_ORDER and not full_batch(key):
            raise ValueError(
                f"unknown method {m!r}; choose from {', '.join(DEFAULT_METHODS)}"
            )
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("methods is empty")
    return out


def _parse_problems(names):
    if names is None:
        return list(DEFAULT_PROBLEMS)
    out = []
    for p in names:
        if not isinstance(p, str):
            raise TypeError(f"problems must be strings, got {p!r}")
        key = p.strip().lower()
        if key not in problems.PROBLEMS:
            raise ValueError(f"unknown problem {p!r}; choose from {', '.join(DEFAULT_PROBLEMS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("problems is empty")
    return out


class Records(list):
    """The results of one problem: a list of :class:`optcore.baselines.Result`, with the
    problem object as ``problem`` and the regime (:data:`REGIMES`) as ``regime``."""

    def __init__(self, problem, records=(), regime="evals"):
        super().__init__(records)
        self.problem = problem
        self.regime = regime


class _Progress:
    """A plain-text progress bar on a stream: redrawn in place on a terminal, one line per
    finished run otherwise."""

    def __init__(self, total, stream, width=30):
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()

    def update(self, label):
        self.done += 1
        if self.stream is None:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"[{bar}] {self.done:3d}/{self.total} {time.perf_counter() - self.t0:6.1f}s "
                f"{label}")
        if self.tty:
            end = "\n" if self.done == self.total else ""
            self.stream.write("\r" + line.ljust(90)[:90] + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@contextlib.contextmanager
def session(threads):
    """Within: optcore's kernels and (with threadpoolctl) the BLAS limited to ``threads``, and
    the overflow warnings of diverging runs silenced (they are reported as diverged records);
    the thread counts are restored on the way out."""
    previous = optcore.get_num_threads()
    limits = _threads_context(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        optcore.set_num_threads(previous)


def check_seed(seed):
    """``seed`` as a non-negative integer, or a ValueError."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _threads_context(threads):
    """Limit optcore (the caller restores it) and, when threadpoolctl is installed, the BLAS
    library to ``threads``."""
    optcore.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(threads, user_api="blas")


def first_order_setup(problem, method):
    """``(class, hyper-parameters, batch size)`` of a first-order method of the suite on
    ``problem``: the optimizer class, its keyword arguments (peak ``lr`` of
    :data:`LEARNING_RATES`, the fixed ones of :data:`FIRST_ORDER`, ``clip`` for the
    ``"+clip"`` variants, :class:`optcore.clip.GlobalNorm` at :data:`CLIP_NORMS`) and
    :data:`BATCH_SIZE` for the data problems (``None``: full batch)."""
    clip = method.endswith(CLIP_SUFFIX)
    base = method[: -len(CLIP_SUFFIX)] if clip else method
    cls, fixed = FIRST_ORDER[base]
    lr = LEARNING_RATES.get(problem.name, LEARNING_RATES["softmax"])[base]
    batch = BATCH_SIZE if problem.n_samples is not None else None
    policy = GlobalNorm(CLIP_NORMS.get(problem.name, 1.0)) if clip else None
    return cls, dict(lr=lr, clip=policy, **fixed), batch


def first_order_steps(problem, method, steps, time_limit=None, seed=0):
    """Take up to ``steps`` steps of a first-order method of the suite on a fresh copy of the
    parameters (minibatch gradient and update, nothing else: no schedule, no loss
    checkpoints), stopping early once ``time_limit`` seconds have passed; return
    ``(steps taken, seconds)``. Used to time a step and, under :mod:`tracemalloc`, to
    measure the memory a step needs."""
    cls, hyper, batch = first_order_setup(problem, method)
    params = problem.parameters()
    opt = cls(params, **hyper)
    batches = problem.batches(batch, seed)
    t0 = time.perf_counter()
    done = 0
    while done < steps and (time_limit is None or time.perf_counter() - t0 <= time_limit):
        problem.loss_and_grad_(params, next(batches))
        opt.step()
        done += 1
    return done, time.perf_counter() - t0


def run_method(problem, method, budget, time_limit, *, seed=0, trace_points=100,
               units="evals"):
    """One record: ``method`` (a name of :data:`DEFAULT_METHODS`) on ``problem``.

    With a ``budget`` (in ``units``, see :mod:`optcore.baselines`) the first-order methods
    plan their warm-up + cosine schedule over the steps it pays for; without one (equal wall
    time) over the steps that fit in ``time_limit``, estimated from
    :data:`CALIBRATION_STEPS` timed steps on a throw-away copy of the parameters. The time
    limit stops every run in either case (the calibration stops at a quarter of it).
    """
    if method in SCIPY_METHODS:
        return baselines.minimize(problem, method, budget=budget, time_limit=time_limit,
                                  units=units)
    if method in QUASI_NEWTON:
        return baselines.quasi_newton(problem, QUASI_NEWTON[method], budget=budget,
                                      time_limit=time_limit, units=units)
    cls, hyper, batch = first_order_setup(problem, method)
    lr = hyper["lr"]
    kwargs = dict(batch_size=batch, seed=seed, name=method, **hyper)
    if budget is not None:
        steps = max(1, baselines.planned_steps(budget, problem.n_samples, batch, units))
        return baselines.train(problem, cls, budget=budget, time_limit=time_limit,
                               schedule=warmup_cosine(lr, steps), trace_points=trace_points,
                               units=units, **kwargs)
    done, seconds = first_order_steps(problem, method, CALIBRATION_STEPS, 0.25 * time_limit,
                                      seed)
    steps = max(1, math.floor(time_limit * done / max(seconds, 1e-9)))
    return baselines.train(problem, cls, steps, time_limit=time_limit,
                           schedule=warmup_cosine(lr, steps), trace_points=trace_points,
                           **kwargs)


def run(problems_=None, methods=None, *, budget=None, time_limit=None, seed=0, threads=1,
        quick=False, X=None, y=None, progress=None, regime="evals"):
    """Run every method on every problem.

    Parameters
    ----------
    problems_ : list of str, optional
        Problem names (default: all of :data:`DEFAULT_PROBLEMS`).
    methods : list of str, optional
        First-order names (``"sgd"``, ``"adam"``, ...), the same with ``"+clip"``, and SciPy
        methods (``"bfgs"``, ...); default :data:`DEFAULT_METHODS`.
    budget : float, optional
        Full-data gradient evaluations per run, or passes over the training data with
        ``regime="epochs"`` (default: :data:`BUDGETS` per problem, or :data:`QUICK_BUDGET`
        with ``quick``); not allowed with ``regime="time"``.
    time_limit : float, optional
        Seconds of wall time per run (default :data:`TIME_LIMIT`, or
        :data:`QUICK_TIME_LIMIT` with ``quick``; with ``regime="time"``, the budget itself,
        default :data:`TIME_REGIME_LIMIT` or :data:`QUICK_TIME_REGIME_LIMIT`); checked
        before each evaluation.
    seed : int, default 0
        Seeds the minibatch order, the MLP initialization and the quadratic's rotation; with
        the same seed and thread count, losses and iterates are reproducible (wall times are
        not).
    threads : int, default 1
        Threads for optcore's kernels and the BLAS (through threadpoolctl when installed).
        The default problems are small enough that one thread is fastest on a busy machine
        and keeps the BLAS reductions in a fixed order.
    quick : bool
        A tiny budget and fewer trace points: a smoke test of a few seconds.
    X, y : array_like, optional
        Data for the data problems (default: the digits).
    progress : text stream or None
        Where the progress bar goes (the command passes ``sys.stderr``); ``None``: no bar.
    regime : {"evals", "epochs", "time"}, default "evals"
        What every method gets the same amount of (:data:`REGIMES`).

    Returns
    -------
    dict of str to Records
        Records per problem (a list of :class:`optcore.baselines.Result` in the order of
        ``methods``, with the problem as attribute ``problem``).
    """
    names = _parse_problems(problems_)
    methods = _parse_methods(methods)
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
    if budget is not None:
        if regime == "time":
            raise ValueError("regime 'time' takes no budget: the time limit is the budget")
        budget = ck.real("budget", budget)
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a finite number > 0, got {budget}")
    if time_limit is None and regime == "time":
        time_limit = QUICK_TIME_REGIME_LIMIT if quick else TIME_REGIME_LIMIT
    elif time_limit is None:
        time_limit = QUICK_TIME_LIMIT if quick else TIME_LIMIT
    time_limit = ck.real("time_limit", time_limit)
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    seed = check_seed(seed)
    threads = ck.positive_int("threads", threads)
    if (X is None) != (y is None):
        raise ValueError("give both X and y")
    if X is not None:
        X, y, k = problems.check_data(X, y)
        if k > 2 and "logistic" in names:
            if problems_ is not None:
                raise ValueError(f"problem 'logistic' needs labels 0/1; y has {k} classes")
            names.remove("logistic")
    built = {}
    for name in names:
        data = problems.PROBLEMS[name].takes_data
        kwargs = {"seed": seed} if name in ("quadratic", "mlp") else {}
        if data:
            kwargs.update(holdout=HOLDOUT, split_seed=SPLIT_SEED)
        built[name] = problems.make_problem(name, X if data else None, y if data else None,
                                            **kwargs)
    bar = _Progress(len(names) * len(methods), progress)
    results = {}
    with session(threads):
        for name in names:
            problem = built[name]
            problem.f_star  # the reference minimum for the plots, computed here, untimed
            b = budget if budget is not None else (QUICK_BUDGET if quick else BUDGETS[name])
            b = None if regime == "time" else b
            units = "epochs" if regime == "epochs" else "evals"
            results[name] = Records(problem, regime=regime)
            for method in methods:
                results[name].append(run_method(problem, method, b, time_limit, seed=seed,
                                                trace_points=20 if quick else 100,
                                                units=units))
                bar.update(f"{name} {method}")
    return results


def _status(r):
    if r.status == baselines.STATUS_DIVERGED:
        return "diverged"
    if r.status == baselines.STATUS_BUDGET:
        return "budget"
    if r.status == baselines.STATUS_TIME:
        return "time"
    if full_batch(r.method):
        return "converged" if r.success else f"stopped ({r.status})"
    return "done"


def format_table(results):
    """A plain-text table of the records, best final loss first within each problem."""
    head = ("problem", "method", "final loss", "|grad|", "evals", "epochs", "hvp", "seconds",
            "accuracy", "val loss", "val acc", "status")
    rows = []

    def pct(v):
        return "-" if v is None else ("nan" if math.isnan(v) else f"{100 * v:.2f}%")

    for name, records in results.items():
        for r in sorted(records, key=lambda r: (math.isnan(r.fun), r.fun)):
            rows.append((
                name, r.method, f"{r.fun:.6g}", f"{r.grad_norm:.2e}", f"{r.evaluations:.4g}",
                f"{r.epochs:.4g}", str(r.nhev), f"{r.seconds:.3f}", pct(r.accuracy),
                "-" if r.val_loss is None else f"{r.val_loss:.4f}", pct(r.val_accuracy),
                _status(r),
            ))
    return layout(head, rows, right=set(range(2, 11)))


def layout(head, rows, right=()):
    """Plain-text columns: a header, a rule, the rows (strings) with the columns of ``right``
    right-aligned and a blank line wherever the first column changes."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        lines.append(fmt(row))
        previous = row[0]
    return "\n".join(lines)


def _style(method):
    scipy_colors = {"newton-cg": "black", "bfgs": "tab:olive", "cg": "tab:cyan",
                    "l-bfgs-b": "tab:gray", "trust-ncg": "navy"}
    if method in SCIPY_METHODS:
        return {"color": scipy_colors[method], "linestyle": ":", "linewidth": 2.2}
    if method in QUASI_NEWTON:  # the color of SciPy's counterpart
        return {"color": scipy_colors[method[len("optcore-"):].replace("lbfgs", "l-bfgs-b")],
                "linestyle": "-.", "linewidth": 2.2}
    base = method[: -len(CLIP_SUFFIX)] if method.endswith(CLIP_SUFFIX) else method
    color = f"C{list(FIRST_ORDER).index(base)}"
    return {"color": color, "linestyle": "--" if method.endswith(CLIP_SUFFIX) else "-",
            "linewidth": 1.4}


def plot(problem, records, path):
    """Write a PNG of the loss against evaluations and against wall time.

    Every curve is the running minimum of its trace (SciPy's line searches evaluate trial
    points whose loss may be higher than the iterate's). When the problem's minimum
    :math:`f^*` is known (:attr:`optcore.problems.Problem.f_star`: the analytic and the convex
    problems) the curves show the gap :math:`f - f^*` on a log scale, else the loss itself.
    Needs matplotlib (the ``plot`` extra); uses the non-interactive Agg backend.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'optcore[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    f_star = problem.f_star
    shift = 0.0 if f_star is None else f_star
    floor = 1e-15 * max(1.0, abs(shift))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    epochs = getattr(records, "regime", "evals") == "epochs"
    for r in records:
        t = r.trace[np.isfinite(r.trace[:, 2])]
        if not len(t):
            continue
        y = np.minimum.accumulate(t[:, 2])
        if f_star is not None:
            y = np.maximum(y - shift, floor)
        style = _style(r.method)
        axes[0].plot(t[:, 3 if epochs else 0], y, label=r.method, **style)
        axes[1].plot(np.maximum(t[:, 1], 1e-5), y, **style)
    axes[0].set_xlabel(
        f"passes over the training data (a Hessian-vector product = "
        f"{baselines.HESSP_PASSES:g})" if epochs else
        "full-data gradient evaluations (Hessian-vector products included)")
    axes[1].set_xlabel("wall time [s]")
    axes[1].set_xscale("log")
    if f_star is None:
        axes[0].set_ylabel("best loss so far")
    elif f_star == 0.0:
        axes[0].set_ylabel("best loss so far (minimum 0)")
    else:
        axes[0].set_ylabel(f"best loss so far − f*   (f* = {f_star:.10g})")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"{problem.name} (n = {problem.n}): optcore first-order (solid; dashed = "
                 f"global-norm clipping), SciPy (dotted), optcore quasi-Newton (dash-dot)")
    fig.legend(loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.87, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results, out, *, settings=None):
    """Write ``<problem>.png``, ``<problem>.json`` and ``table.txt`` into the directory
    ``out`` (created if needed); return the paths written. ``results`` as :func:`run`
    returns it."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {out!r}: {exc.strerror}") from None
    paths = []
    for name, records in results.items():
        problem = records.problem
        paths.append(plot(problem, records, os.path.join(out, f"{name}.png")))
        path = os.path.join(out, f"{name}.json")
        with open(path, "w") as f:
            json.dump({"problem": name, "n": problem.n, "f_star": problem.f_star,
                       "n_train": problem.n_samples, "n_val": getattr(problem, "n_val", 0),
                       "regime": getattr(records, "regime", "evals"),
                       "settings": settings or {},
                       "records": [r.to_dict() for r in records]}, f, allow_nan=False)
        paths.append(path)
    path = os.path.join(out, "table.txt")
    with open(path, "w") as f:
        f.write(format_table(results) + "\n")
    paths.append(path)
    return paths
