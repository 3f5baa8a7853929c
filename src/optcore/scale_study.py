r"""Where each family of methods stops working: the MLP grown from about :math:`10^3` to
:math:`10^6` parameters.

:func:`run` widens the hidden layer of :class:`optcore.problems.MLP` on the digits (training
part of the held-out split of :mod:`optcore.compare`) through :data:`HIDDEN` and gives every
method the same wall time at every width (``regime="time"`` of :mod:`optcore.compare`). It
records per run the time per iteration, the memory the run needs (the peak of NumPy's
allocations, read with :mod:`tracemalloc`, during a short separate probe of
:data:`PROBE_EVALUATIONS` evaluations, so the timed run carries no tracing overhead) and the
held-out loss and accuracy reached. A method that cannot run says why instead of crashing:

* ``skipped`` before it starts when its dense :math:`n \times n` matrix would pass the memory
  limit (SciPy's BFGS and ``optcore-bfgs``; bytes predicted from :data:`DENSE_BYTES`);
* ``too slow`` when it ends the time without completing one iteration (Newton-CG and
  trust-region Newton-CG at large :math:`n`: the first inner CG solve needs more
  Hessian-vector products, two gradients each, than fit in the time).

:func:`format_table`, :func:`plot` (time per iteration and held-out loss against :math:`n`)
and :func:`write` present the records; ``optcore compare --scale`` is the command.
"""
import json
import math
import os
import tracemalloc

from optcore import _checks as ck
from optcore import baselines, compare, problems

__all__ = ["run", "format_table", "plot", "write", "HIDDEN", "QUICK_HIDDEN", "DEFAULT_METHODS",
           "TIME_LIMIT", "MEMORY_LIMIT", "DENSE_BYTES"]

#: Hidden widths: :math:`n = 76 h + 10` on the digits (64 features, 10 classes), so about
#: :math:`10^3, 10^4, 10^5, 10^6` parameters.
HIDDEN = (13, 132, 1316, 13158)
QUICK_HIDDEN = (13, 132)
#: Seconds per run (every method, every width), and with ``quick``.
TIME_LIMIT = 3.0
QUICK_TIME_LIMIT = 0.2
#: Memory a method may need, in bytes (2 GiB), and with ``quick`` (64 MiB, so that the quick
#: run exercises the skip at :math:`n \approx 10^4`).
MEMORY_LIMIT = 2 * 2**30
QUICK_MEMORY_LIMIT = 64 * 2**20
#: Evaluations (full-data gradients; steps for first-order methods) of the memory probe.
PROBE_EVALUATIONS = 3
#: Methods with a dense :math:`n \times n` float64 matrix: bytes per :math:`8 n^2`, the peak
#: measured with tracemalloc at :math:`n = 998` (SciPy builds the update
#: :math:`(I - \rho s y^\top) H (I - \rho y s^\top)` from full-size temporaries; optcore's
#: BFGS keeps the packed lower triangle, :math:`n(n+1)/2` numbers, and no temporary).
DENSE_BYTES = {"bfgs": 6.0, "optcore-bfgs": 0.5}
#: Methods of the study: the first-order optimizers without clipping and every full-batch
#: method of :mod:`optcore.compare`.
DEFAULT_METHODS = (tuple(compare.FIRST_ORDER) + compare.SCIPY_METHODS
                   + tuple(compare.QUASI_NEWTON))

STATUS_SKIPPED = "skipped"
STATUS_TOO_SLOW = "too slow"


def _peak_memory(problem, method, time_limit, seed):
    """Peak bytes NumPy allocates during a probe of :data:`PROBE_EVALUATIONS` evaluations
    (first-order: steps), from the method's start (its copy of the parameters and its state
    included) to its last step; the trace's full-data loss checkpoints are not part of it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        if compare.full_batch(method):
            compare.run_method(problem, method, PROBE_EVALUATIONS, time_limit, seed=seed)
        else:
            compare.first_order_steps(problem, method, PROBE_EVALUATIONS, seed=seed)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _record(method, problem, hidden):
    return {"method": method, "hidden": hidden, "n": problem.n, "status": None, "reason": "",
            "nit": 0, "evaluations": 0.0, "seconds": 0.0, "seconds_per_iter": None,
            "memory_bytes": None, "fun": None, "val_loss": None, "val_accuracy": None}


def _too_slow_reason(r, time_limit):
    per_eval = r.seconds / max(r.evaluations, 1e-12)
    if r.nhev:
        return (f"no Newton step in {time_limit:g} s: {r.nhev} Hessian-vector products "
                f"({r.nhev * baselines.HESSP_PASSES:g} gradients of {per_eval:.2g} s) did not "
                "finish the first CG solve")
    return f"no iteration in {time_limit:g} s ({r.nfev} evaluations of {per_eval:.2g} s)"


def _one(problem, method, hidden, time_limit, memory_limit, seed):
    rec = _record(method, problem, hidden)
    dense = DENSE_BYTES.get(method)
    if dense is not None and dense * 8.0 * problem.n**2 > memory_limit:
        rec["status"] = STATUS_SKIPPED
        rec["reason"] = (f"dense n x n matrix: {dense * 8.0 * problem.n**2 / 2**30:.3g} GiB "
                         f"> memory limit {memory_limit / 2**30:.3g} GiB")
        return rec
    rec["memory_bytes"] = int(_peak_memory(problem, method, time_limit, seed))
    r = compare.run_method(problem, method, None, time_limit, seed=seed, trace_points=1)
    rec.update(nit=int(r.nit), evaluations=float(r.evaluations), seconds=float(r.seconds),
               fun=float(r.fun), val_loss=r.val_loss, val_accuracy=r.val_accuracy)
    if r.nit:
        rec["seconds_per_iter"] = r.seconds / r.nit
    if r.status == baselines.STATUS_DIVERGED:
        rec["status"], rec["reason"] = "diverged", r.message
    elif r.nit == 0:
        rec["status"], rec["reason"] = STATUS_TOO_SLOW, _too_slow_reason(r, time_limit)
    elif compare.full_batch(method) and r.success:
        rec["status"] = "converged"
    else:
        rec["status"] = "time" if r.status == baselines.STATUS_TIME else "done"
    return rec


def _parse(methods):
    if methods is None:
        return list(DEFAULT_METHODS)
    return compare._parse_methods(methods)


def run(methods=None, *, hidden=None, time_limit=None, memory_limit=None, seed=0, threads=1,
        quick=False, progress=None):
    """Run every method at every width under the same wall time.

    Parameters
    ----------
    methods : list of str, optional
        Names of :data:`optcore.compare.DEFAULT_METHODS` (default :data:`DEFAULT_METHODS`).
    hidden : list of int, optional
        Hidden widths (default :data:`HIDDEN`, or :data:`QUICK_HIDDEN` with ``quick``).
    time_limit : float, optional
        Seconds per run (default :data:`TIME_LIMIT`, :data:`QUICK_TIME_LIMIT` with ``quick``).
    memory_limit : float, optional
        Bytes a method may need (default :data:`MEMORY_LIMIT`, :data:`QUICK_MEMORY_LIMIT`
        with ``quick``); a method whose dense matrix would need more is skipped.
    seed : int, default 0
    threads : int, default 1
        Threads of optcore's kernels and of the BLAS.
    quick : bool
        Two small widths, 0.2 s per run and a 64 MiB memory limit: a smoke test.
    progress : text stream or None
        Where the progress bar goes.

    Returns
    -------
    list of dict
        One record per width and method: ``method``, ``hidden``, ``n``, ``status``
        (``"done"``, ``"time"``, ``"converged"``, ``"diverged"``, ``"skipped"``,
        ``"too slow"``), ``reason`` (why a method was skipped or too slow), ``nit``,
        ``evaluations``, ``seconds``, ``seconds_per_iter``, ``memory_bytes`` (probe peak),
        ``fun`` (training loss), ``val_loss``, ``val_accuracy``.
    """
    methods = _parse(methods)
    widths = [ck.positive_int("hidden", h) for h in (
        hidden if hidden is not None else (QUICK_HIDDEN if quick else HIDDEN))]
    if not widths:
        raise ValueError("hidden is empty")
    if time_limit is None:
        time_limit = QUICK_TIME_LIMIT if quick else TIME_LIMIT
    time_limit = ck.real("time_limit", time_limit)
    if not (time_limit > 0 and math.isfinite(time_limit)):
        raise ValueError(f"time_limit must be a finite number > 0 seconds, got {time_limit}")
    if memory_limit is None:
        memory_limit = QUICK_MEMORY_LIMIT if quick else MEMORY_LIMIT
    memory_limit = ck.real("memory_limit", memory_limit)
    if not memory_limit > 0:
        raise ValueError(f"memory_limit must be > 0 bytes, got {memory_limit}")
    seed = compare.check_seed(seed)
    threads = ck.positive_int("threads", threads)
    bar = compare._Progress(len(widths) * len(methods), progress)
    records = []
    with compare.session(threads):
        for h in widths:
            problem = problems.MLP(hidden=h, seed=seed, holdout=compare.HOLDOUT,
                                   split_seed=compare.SPLIT_SEED)
            for method in methods:
                records.append(_one(problem, method, h, time_limit, memory_limit, seed))
                bar.update(f"n={problem.n} {method}")
    return records


def _fmt(v, spec, none="-"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(records):
    """A plain-text table: one block per width, methods by held-out loss; a skipped or too
    slow method shows its reason."""
    head = ("n", "method", "s/iter", "iters", "memory MB", "val loss", "val acc", "status")
    rows = []
    for n in sorted({r["n"] for r in records}):
        block = [r for r in records if r["n"] == n]
        block.sort(key=lambda r: (r["val_loss"] is None or math.isnan(r["val_loss"]),
                                  r["val_loss"] if r["val_loss"] is not None else 0.0))
        for r in block:
            status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            rows.append((str(n), r["method"], _fmt(r["seconds_per_iter"], ".3g"),
                         str(r["nit"]), _fmt(None if r["memory_bytes"] is None
                                             else r["memory_bytes"] / 2**20, ".1f"),
                         _fmt(r["val_loss"], ".4f"),
                         _fmt(None if r["val_accuracy"] is None else 100 * r["val_accuracy"],
                              ".2f") + ("%" if r["val_accuracy"] is not None else ""),
                         status))
    return compare.layout(head, rows, right={0, 2, 3, 4, 5, 6})


def plot(records, path, time_limit=None):
    """Write a PNG: time per iteration against :math:`n` (log-log) and the held-out loss
    reached in the time against :math:`n`, one line per method; a method that was skipped or
    too slow at a width is drawn as a cross on the top edge there."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'optcore[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    methods = list(dict.fromkeys(r["method"] for r in records))
    for method in methods:
        mine = sorted((r for r in records if r["method"] == method), key=lambda r: r["n"])
        style = compare._style(method)
        ran = [r for r in mine if r["seconds_per_iter"] is not None]
        axes[0].plot([r["n"] for r in ran], [r["seconds_per_iter"] for r in ran], marker="o",
                     markersize=3, label=method, **style)
        ok = [r for r in ran if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
        axes[1].plot([r["n"] for r in ok], [r["val_loss"] for r in ok], marker="o",
                     markersize=3, **style)
        for r in mine:
            if r["status"] in (STATUS_SKIPPED, STATUS_TOO_SLOW):
                for ax in axes:
                    ax.plot([r["n"]], [0.97], transform=ax.get_xaxis_transform(), marker="x",
                            markersize=9, color=style["color"], clip_on=False)
    axes[0].set_ylabel("seconds per iteration")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("held-out loss reached" + (f" in {time_limit:g} s" if time_limit else ""))
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters n (MLP hidden width grown)")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("MLP on the digits, same wall time per run: x on the top edge = skipped "
                 "(memory) or no iteration completed (too slow)")
    fig.legend(loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.87, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(records, out, *, settings=None, time_limit=None):
    """Write ``scale.png``, ``scale.json`` and ``scale.txt`` into the directory ``out``
    (created if needed); return the paths written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {out!r}: {exc.strerror}") from None
    paths = [plot(records, os.path.join(out, "scale.png"), time_limit)]
    path = os.path.join(out, "scale.json")
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in r.items()} for r in records]
    with open(path, "w") as f:
        json.dump({"settings": settings or {}, "records": clean}, f, allow_nan=False)
    paths.append(path)
    path = os.path.join(out, "scale.txt")
    with open(path, "w") as f:
        f.write(format_table(records) + "\n")
    paths.append(path)
    return paths
