"""Quasi-Newton methods: ``optcore.BFGS`` / ``optcore.LBFGS`` beside SciPy in the same groups.

- ``bfgs-to-scipy30-<n>``: wall time to reach the objective ``scipy.optimize.minimize(
  method="BFGS")`` reaches in 30 iterations on ``optcore.problems.Quadratic(n)`` (condition
  number 1000, n = 1226 as the MLP of ``optcore compare``): SciPy's 30 iterations against
  optcore's BFGS run for the number of iterations it needs to get there (found once, untimed,
  and recorded as ``iterations``). Each side evaluates its own objective path (SciPy float64,
  optcore float32), inside the timed region.
- ``bfgs-iteration-<n>``: seconds per BFGS iteration (``extra_info["per_iteration"]``) on a
  separable ill-conditioned quadratic whose gradient costs O(n), so that the O(n^2) update
  dominates; n up to 10^4 (an 800 MB inverse Hessian for SciPy, 400 MB packed for optcore).
  SciPy only up to n = 2048: its O(n^3) iteration takes about a minute at 10^4.
- ``lbfgs-iteration-<n>``: seconds per L-BFGS iteration (m = 10, 30 iterations, no stopping
  on tolerances) against SciPy's L-BFGS-B (Fortran, ``maxcor=10``), n = 10^5 and 10^6, on the
  same separable quadratic (SciPy float64, optcore float32).

Every benchmark runs at 1 and 2 threads (group suffix ``-<t>t``): optcore's kernels through
``optcore.set_num_threads`` and the BLAS under both SciPy and the NumPy objectives through
threadpoolctl, so that neither side oversubscribes the cores (with other jobs on the machine,
OpenBLAS's default threads made SciPy's L-BFGS-B 16x slower).

``OPTCORE_BENCH_SMOKE=1`` shrinks the sizes (n <= 64k) so that ``--benchmark-disable`` runs
everything once in seconds.
"""
import os

import numpy as np
import pytest
from scipy.optimize import minimize as sp_minimize

import optcore
from optcore.problems import Quadratic

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")
TO_SCIPY_N = [200] if SMOKE else [1226]
BFGS_N = [256, 512] if SMOKE else [1226, 2048, 4096, 10000]
SCIPY_BFGS_MAX_N = 512 if SMOKE else 2048
LBFGS_N = [1 << 16] if SMOKE else [100_000, 1_000_000]
ITERS = 30
THREADS = [1, 2]


@pytest.fixture
def limit():
    """``limit(t)``: run optcore's kernels and the BLAS on t threads for this test."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    ctl = []

    def apply(t):
        optcore.set_num_threads(t)
        ctl.append(threadpoolctl.threadpool_limits(limits=t, user_api="blas"))
    yield apply
    for c in ctl:
        c.restore_original_limits()
    optcore.set_num_threads(None)


# ---------------------------------------------------------------------------------------------
# the target: time to SciPy's 30-iteration objective


_SCIPY30 = {}


def scipy30(n):
    """The objective SciPy's BFGS reaches in 30 iterations, and the optcore iterations that
    reach it (both found once, untimed)."""
    if n not in _SCIPY30:
        problem = Quadratic(n)
        f30 = sp_minimize(problem.fun_and_grad, problem.x0, jac=True, method="BFGS",
                          options={"maxiter": ITERS, "gtol": 0.0}).fun
        params = problem.parameters()
        opt = optcore.BFGS(params, gtol=0.0, ftol=0.0, maxiter=1)
        k = 0
        while problem.fun(problem.x_of(params)) > f30:
            opt.step(lambda: problem.loss_and_grad_(params))
            k += 1
        _SCIPY30[n] = problem, f30, k
    return _SCIPY30[n]


@pytest.mark.parametrize("impl", ["optcore", "scipy"])
@pytest.mark.parametrize("t", THREADS)
@pytest.mark.parametrize("n", TO_SCIPY_N)
def test_bfgs_to_scipy30(benchmark, limit, impl, t, n):
    limit(t)
    problem, f30, k = scipy30(n)
    benchmark.group = f"bfgs-to-scipy30-{n}-{t}t"
    optcore.BFGS([(np.zeros(1, np.float32), np.zeros(1, np.float32))])  # import cost untimed
    if impl == "scipy":
        def run():
            return sp_minimize(problem.fun_and_grad, problem.x0, jac=True, method="BFGS",
                               options={"maxiter": ITERS, "gtol": 0.0}).fun
        iterations = ITERS
    else:
        def run():
            params = problem.parameters()
            optcore.BFGS(params, gtol=0.0, ftol=0.0, maxiter=k).step(
                lambda: problem.loss_and_grad_(params))
            return problem.fun(problem.x_of(params))
        iterations = k
    f = benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1, warmup_rounds=0)
    assert f <= f30 * (1 + 1e-9)
    benchmark.extra_info.update(impl=impl, n=n, threads=t, iterations=iterations, objective=float(f),
                                scipy30=float(f30))


# ---------------------------------------------------------------------------------------------
# per-iteration cost


class Separable:
    """f(x) = 1/2 sum a_i (x_i - 1)^2, a geometric from 1 to 1000: an O(n) gradient, in float64
    for SciPy and in place in float32 (preallocated buffers) for optcore."""

    def __init__(self, n):
        self.a = np.geomspace(1.0, 1e3, n)
        self.a32 = self.a.astype(np.float32)
        self.r32 = np.empty(n, np.float32)
        self.n = n

    def fun_and_grad(self, x):
        r = x - 1.0
        g = self.a * r
        return 0.5 * float(r @ g), g

    def pair(self):
        x = np.zeros(self.n, np.float32)
        g = np.zeros(self.n, np.float32)

        def closure():
            np.subtract(x, np.float32(1.0), out=self.r32)
            np.multiply(self.a32, self.r32, out=g)
            return 0.5 * float(np.dot(self.r32, g))
        return x, g, closure


def _per_iteration(benchmark, run):
    nit = benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(iterations=nit,
                                per_iteration=benchmark.stats.stats.min / nit if benchmark.stats else None)


@pytest.mark.parametrize("impl", ["optcore", "scipy"])
@pytest.mark.parametrize("t", THREADS)
@pytest.mark.parametrize("n", BFGS_N)
def test_bfgs_iteration(benchmark, limit, impl, t, n):
    if impl == "scipy" and n > SCIPY_BFGS_MAX_N:
        pytest.skip(f"SciPy's O(n^3) BFGS iteration at n = {n} takes about a minute")
    limit(t)
    benchmark.group = f"bfgs-iteration-{n}-{t}t"
    f = Separable(n)
    iters = 5 if n >= 4096 else 10
    if impl == "scipy":
        def run():
            return sp_minimize(f.fun_and_grad, np.zeros(n), jac=True, method="BFGS",
                               options={"maxiter": iters, "gtol": 0.0}).nit
    else:
        def run():
            x, g, closure = f.pair()
            return optcore.BFGS([(x, g)], gtol=0.0, ftol=0.0, maxiter=iters).step(closure).nit
    benchmark.extra_info.update(impl=impl, n=n, threads=t)
    _per_iteration(benchmark, run)


@pytest.mark.parametrize("impl", ["optcore", "scipy"])
@pytest.mark.parametrize("t", THREADS)
@pytest.mark.parametrize("n", LBFGS_N)
def test_lbfgs_iteration(benchmark, limit, impl, t, n):
    limit(t)
    benchmark.group = f"lbfgs-iteration-{n}-{t}t"
    f = Separable(n)
    if impl == "scipy":
        def run():
            return sp_minimize(f.fun_and_grad, np.zeros(n), jac=True, method="L-BFGS-B",
                               options={"maxiter": ITERS, "gtol": 0.0, "ftol": 0.0,
                                        "maxcor": 10}).nit
    else:
        def run():
            x, g, closure = f.pair()
            return optcore.LBFGS([(x, g)], m=10, gtol=0.0, ftol=0.0, maxiter=ITERS).step(
                closure).nit
    benchmark.extra_info.update(impl=impl, n=n, threads=t)
    _per_iteration(benchmark, run)
