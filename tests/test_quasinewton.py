"""optcore.BFGS and optcore.LBFGS (optcore.quasinewton) and their kernels (_kernels/_qn).

References, all written here in plain float64 NumPy from Nocedal & Wright, *Numerical
Optimization* (2006): the kernels against the element-wise formulas; the BFGS inverse update
(eq. 6.17 with H_0 of eq. 6.20) and the L-BFGS two-loop recursion (algorithm 7.4); the strong
Wolfe conditions (eq. 3.7) recomputed from what the closure saw; SciPy's BFGS / L-BFGS-B for
the optima of convex problems.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize as sp_minimize

import optcore
from optcore import problems as P
from optcore import quasinewton as Q
from optcore._kernels import _qn
from optcore._kernels._runtime import TensorList

METHODS = [optcore.BFGS, optcore.LBFGS]
F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------
# helpers


class Recorder:
    """A closure over a problem's float32 path that keeps a copy of every point, loss and
    gradient it evaluated."""

    def __init__(self, problem, params):
        self.problem, self.params = problem, params
        self.x, self.f, self.g = [], [], []

    def __call__(self):
        f = self.problem.loss_and_grad_(self.params)
        self.x.append(flat(self.params[k] for k in self.params))
        self.f.append(float(f))
        self.g.append(flat(self.params.grads[k] for k in self.params))
        return f

    def accepted(self, result):
        """Indices of the start point and of the point accepted by every line search (each
        line search ends on the point it accepts)."""
        counts = result.line_search[:, 5].astype(int)
        assert 1 + counts.sum() == len(self.f), "a line search failed and was restarted"
        return np.concatenate([[0], np.cumsum(counts)])


def vector_table(rng, sizes, nslots):
    """A TensorList of ``nslots`` slots of float32 tensors of the given sizes."""
    slots = [[rng.standard_normal(n).astype(np.float32) for n in sizes] for _ in range(nslots)]
    return TensorList(slots), slots


def flat(arrays):
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays])


def f32(a):
    """``a`` rounded to float32, as float64."""
    return a.astype(np.float32).astype(np.float64)


def ulp_bound(g, x):
    """Sum of |g_i| * ulp(x_i) / 2: the largest change of g.s when s = x_new - x_old is off
    by the rounding of x_new to float32 (half an ulp per component)."""
    return float(np.sum(np.abs(g) * np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)) / 2)


# ---------------------------------------------------------------------------------------------
# kernels against float64 NumPy


SIZES = st.lists(st.integers(0, 40000), min_size=1, max_size=4).filter(lambda s: sum(s) > 0)


@settings(max_examples=25, deadline=None)
@given(sizes=SIZES, seed=st.integers(0, 2**31 - 1))
def test_dot_and_axpby_match_float64(sizes, seed):
    rng = np.random.default_rng(seed)
    tl, slots = vector_table(rng, sizes, 3)
    sc = _qn.Scratch(tl)
    a, b, c = (flat(s) for s in slots)
    # dot: exact float32 products summed in float64; error <= n * eps64 * sum|a b|
    bound = len(a) * 2.3e-16 * np.sum(np.abs(a * b)) + 1e-300
    assert abs(_qn.dot(tl, sc, 0, 1) - a @ b) <= bound
    # axpby in its four forms; each element computed in float64 and rounded once to float32
    for alpha, z, beta in [(1.0, 1, -0.37), (0.0, 1, -1.0), (-2.5, 1, 0.75), (0.3, -1, 0.0)]:
        x0 = flat(slots[0])
        expect = (alpha * x0 if alpha != 0 else 0.0) + (beta * flat(slots[1]) if z >= 0 else 0.0)
        got_dot = _qn.axpby(tl, sc, 0, alpha, z, beta, 2)
        np.testing.assert_array_equal(flat(slots[0]), expect.astype(np.float32))
        x = flat(slots[0])
        assert abs(got_dot - c @ x) <= len(x) * 2.3e-16 * np.sum(np.abs(c * x)) + 1e-300


@settings(max_examples=15, deadline=None)
@given(sizes=SIZES, seed=st.integers(0, 2**31 - 1), t=st.floats(-10, 10))
def test_point_pair_gather_scatter_match_float64(sizes, seed, t):
    rng = np.random.default_rng(seed)
    tl, slots = vector_table(rng, sizes, 6)
    x0, d = flat(slots[2]), flat(slots[4])
    _qn.point(tl, 0, 2, 4, t)
    np.testing.assert_array_equal(flat(slots[0]), (x0 + t * d).astype(np.float32))
    x, g, x0, g0 = (flat(slots[i]) for i in range(4))
    sy, yy, gg, gmax = _qn.pair(tl, _qn.Scratch(tl))
    s = (x - x0).astype(np.float32).astype(np.float64)
    y = (g - g0).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(flat(slots[4]), s)
    np.testing.assert_array_equal(flat(slots[5]), y)
    np.testing.assert_array_equal(flat(slots[2]), x)
    np.testing.assert_array_equal(flat(slots[3]), g)
    for got, ref, terms in [(sy, s @ y, s * y), (yy, y @ y, y * y), (gg, g @ g, g * g)]:
        assert abs(got - ref) <= len(s) * 2.3e-16 * np.sum(np.abs(terms)) + 1e-300
    assert gmax == np.max(np.abs(g))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = np.full(sum(sizes), np.nan)
    _qn.gather(tl, 1, offsets, out)
    np.testing.assert_array_equal(out, g)
    v = rng.standard_normal(sum(sizes))
    _qn.scatter(tl, 1, offsets, v, -0.5)
    np.testing.assert_array_equal(flat(slots[1]), (-0.5 * v).astype(np.float32))


@pytest.mark.parametrize("n", [1, 2, 7, 33, 300])
def test_bfgs_pass_matches_dense_float64(n, rng):
    A = rng.standard_normal((n, n))
    A = A + A.T
    rows, cols = np.tril_indices(n)
    packed = A[rows, cols].copy()
    nblocks = min(n, 32)
    bstart = np.unique(np.round(n * np.sqrt(np.arange(nblocks + 1) / nblocks))).astype(np.int64)
    scratch = np.zeros((bstart.size - 1) * n)
    u, v, g = (rng.standard_normal(n) for _ in range(3))
    w = np.zeros(n)
    _qn.bfgs_pass(packed, n, bstart, u, v, g, w, scratch)
    A2 = A + np.outer(u, v) + np.outer(v, u)
    # each entry: two products and two additions in float64
    np.testing.assert_allclose(packed, A2[rows, cols], rtol=0, atol=1e-13 * (1 + np.abs(A2).max()))
    np.testing.assert_allclose(w, A2 @ g, rtol=0, atol=1e-13 * n * np.abs(A2).max() * np.abs(g).max())
    before = packed.copy()
    _qn.bfgs_pass(packed, n, bstart, None, None, g, w, scratch)  # product only
    np.testing.assert_array_equal(packed, before)
    np.testing.assert_allclose(w, A2 @ g, rtol=0, atol=1e-13 * n * np.abs(A2).max() * np.abs(g).max())


def test_kernels_bitwise_independent_of_threads(rng):
    sizes = [70000, 3, 40001]
    results = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        tl, slots = vector_table(np.random.default_rng(7), sizes, 6)
        sc = _qn.Scratch(tl)
        out = [_qn.dot(tl, sc, 0, 1), _qn.axpby(tl, sc, 0, 0.7, 1, -0.2, 3), _qn.pair(tl, sc)]
        n = 700
        P_ = np.random.default_rng(8).standard_normal(n * (n + 1) // 2)
        bstart = np.unique(np.round(n * np.sqrt(np.arange(33) / 32))).astype(np.int64)
        w = np.zeros(n)
        u = np.random.default_rng(9).standard_normal(n)
        _qn.bfgs_pass(P_, n, bstart, u, u[::-1].copy(), u, w, np.zeros(32 * n))
        results.append((out, [flat(s) for s in slots], P_, w))
    (o1, s1, p1, w1), (o2, s2, p2, w2) = results
    assert o1 == o2
    for a, b in zip(s1 + [p1, w1], s2 + [p2, w2]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the line search


def wolfe_problems():
    return [("rosenbrock", P.Rosenbrock(10), 200), ("mlp", P.MLP(), 60)]


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("name,problem,maxiter", wolfe_problems(), ids=["rosenbrock", "mlp"])
def test_strong_wolfe_holds_at_every_accepted_step(cls, name, problem, maxiter):
    params = problem.parameters()
    rec = Recorder(problem, params)
    opt = cls(params, maxiter=maxiter)
    r = opt.step(rec)
    assert r.nit >= (40 if name == "mlp" else 30)
    c1, c2 = opt.c1, opt.c2
    # 1. the optimizer's own records: phi(alpha), phi'(alpha) as it computed them
    alpha, f0, d0, f1, d1, _ = r.line_search.T
    assert np.all(d0 < 0)
    assert np.all(f1 <= f0 + c1 * alpha * d0)
    assert np.all(np.abs(d1) <= c2 * np.abs(d0))
    # 2. independently, from what the closure saw: with s = x_{k+1} - x_k (the step actually
    # taken, float64 difference of the float32 iterates), f_{k+1} <= f_k + c1 g_k.s and
    # |g_{k+1}.s| <= c2 |g_k.s|. s differs from alpha d by the rounding of x_{k+1} to float32
    # (half an ulp per component), which moves g.s by at most ulp_bound(g, x_{k+1}).
    idx = rec.accepted(r)
    for k in range(r.nit):
        i, j = idx[k], idx[k + 1]
        s = rec.x[j] - rec.x[i]
        gs0, gs1 = rec.g[i] @ s, rec.g[j] @ s
        b0, b1 = ulp_bound(rec.g[i], rec.x[j]), ulp_bound(rec.g[j], rec.x[j])
        assert gs0 < b0
        assert rec.f[j] <= rec.f[i] + c1 * gs0 + c1 * b0, k
        assert abs(gs1) <= c2 * abs(gs0) + b1 + c2 * b0, k
        # the recorded values are those of the closure
        assert (f0[k], f1[k]) == (rec.f[i], rec.f[j])


@settings(max_examples=200, deadline=None)
@given(a=st.floats(1e-2, 1e2), b=st.floats(-10, 10), c=st.floats(-10, 10),
       slope=st.floats(-10, -0.1), t0=st.floats(1e-2, 1e2),
       c1=st.floats(1e-5, 0.4), gap=st.floats(0.05, 0.55))
@example(a=0.01, b=-10.0, c=0.0, slope=-0.25, t0=0.01, c1=0.03125, gap=0.0625)
def test_line_search_finds_strong_wolfe_steps_on_quartics(a, b, c, slope, t0, c1, gap):
    # phi(t) = a t^4 + b t^3 + c t^2 + slope t: bounded below, phi'(0) = slope < 0, so steps
    # satisfying the strong Wolfe conditions exist (N&W lemma 3.1); the search must return one.
    # Coefficients within a few decades of each other: where the acceptable interval is
    # narrower than the float64 resolution of phi (|phi| ~ 1e11 around a minimizer at
    # t ~ 2000 with an interval of 1e-5), no search comparing values can find it. (50000
    # random draws from these ranges: all found, in at most 18 evaluations, 4.7 on average.)
    c2 = c1 + gap

    def phi(t):
        return a * t**4 + b * t**3 + c * t**2 + slope * t, 4 * a * t**3 + 3 * b * t**2 + 2 * c * t + slope
    # Keep the draws where float64 can see the acceptable steps around the global minimizer
    # t*: over the interval |phi'| <= c2 |slope| (half-width w = c2 |slope| / phi''(t*)) phi
    # must vary by more than its own rounding. Hypothesis found a = 0.01, b = -10, c = 0,
    # slope = -0.25: t* = 750, w = 1e-6, a variation of 1e-8 against an ulp of 1.2e-7 of
    # phi(t*) = -1.05e9.
    roots = np.roots([4 * a, 3 * b, 2 * c, slope])
    ts = [r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r)) and r.real > 0]
    t_min = min(ts, key=lambda r: phi(r)[0])
    curv = 12 * a * t_min**2 + 6 * b * t_min + 2 * c
    w = c2 * abs(slope) / curv
    assume(curv * w * w / 2 > 64 * np.finfo(float).eps * max(1.0, abs(phi(t_min)[0])))
    t, f, g, ok = Q._strong_wolfe(phi, 0.0, slope, t0, c1, c2, 40)
    assert ok
    assert t > 0 and (f, g) == phi(t)
    assert f <= c1 * t * slope
    assert abs(g) <= c2 * abs(slope)


def test_line_search_zoom_and_interpolation_on_a_known_function():
    # phi(t) = (t - 3)^2 - 9: phi'(0) = -6; the bracketing phase steps past the minimum at 3
    calls = []

    def phi(t):
        calls.append(t)
        return (t - 3.0) ** 2 - 9.0, 2.0 * (t - 3.0)

    t, f, g, ok = Q._strong_wolfe(phi, 0.0, -6.0, 1.0, 1e-4, 0.1, 20)
    assert ok and abs(g) <= 0.1 * 6.0 and f <= 1e-4 * t * -6.0
    # a cubic through two points of a quadratic has the quadratic's minimizer
    assert Q._cubic_min(0.0, 0.0, -6.0, 10.0, 40.0, 14.0) == pytest.approx(3.0)
    # a concave stretch (slope getting steeper) has no minimizer ahead
    assert Q._cubic_min(0.0, 0.0, -1.0, 1.0, -2.0, -3.0) is None
    # a non-finite value at the first trial is treated as too long a step
    t, f, g, ok = Q._strong_wolfe(
        lambda t: (math.inf, math.nan) if t > 4 else ((t - 3.0) ** 2 - 9.0, 2.0 * (t - 3.0)),
        0.0, -6.0, 100.0, 1e-4, 0.9, 20)
    assert ok and t <= 4


# ---------------------------------------------------------------------------------------------
# iterates against float64 references of the same formulas


def ref_bfgs_inverse(pairs, n):
    """H after the updates of eq. 6.17 from H_0 = (s.y / y.y) I (eq. 6.20), pairs with
    s.y <= eps y.y skipped; the identity before the first update."""
    H = None
    for s, y in pairs:
        sy = s @ y
        if not sy > np.finfo(float).eps * (y @ y):
            continue
        if H is None:
            H = (sy / (y @ y)) * np.eye(n)
        rho = 1.0 / sy
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return np.eye(n) if H is None else H


def ref_two_loop(pairs, g, m):
    """-H g by algorithm 7.4 over the last m accepted pairs, H_0 = (s.y / y.y) I (eq. 7.20)."""
    pairs = [(s, y) for s, y in pairs if s @ y > np.finfo(float).eps * (y @ y)][-m:]
    if not pairs:
        return -g
    q, alphas = g.copy(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        r += s * (a - (y @ r) / (s @ y))
    return -r


def ref_direction(cls, pairs, g, n, m):
    return -ref_bfgs_inverse(pairs, n) @ g if cls is optcore.BFGS else ref_two_loop(pairs, g, m)


def run_quadratic(cls, cond, iters=40, m=5):
    problem = P.Quadratic(60, cond=cond, seed=3)
    params = problem.parameters()
    rec = Recorder(problem, params)
    kw = {"m": m} if cls is optcore.LBFGS else {}
    opt = cls(params, gtol=0.0, ftol=0.0, maxiter=iters, **kw)
    r = opt.step(rec)
    assert r.nit == iters and r.status == Q.STATUS_LIMIT
    idx = rec.accepted(r)
    return problem, opt, r, [rec.x[i] for i in idx], [rec.g[i] for i in idx]


@pytest.mark.parametrize("cls,m", [(optcore.BFGS, None), (optcore.LBFGS, 1), (optcore.LBFGS, 5)])
@pytest.mark.parametrize("cond", [1e2, 1e3])
def test_each_step_is_the_reference_direction_from_the_same_pairs(cls, m, cond):
    # Given the pairs the optimizer stores, s = fl32(x_{k+1} - x_k) and y = fl32(g_{k+1} - g_k)
    # from its float32 iterates and gradients, the float64 formula gives d_k; the step taken must be alpha_k d_k up to the two float32 roundings in
    # between: d_k stored in float32 (half an ulp of d per component, times alpha) and
    # x_{k+1} = fl32(x_k + alpha d) (half an ulp of x_{k+1}), plus a slack of
    # `slack * |alpha| max|d|`. BFGS computes d in float64: its slack (1e-8; measured 1.1e-9)
    # covers the rounding differences between the rank-two form the optimizer uses and the
    # product form of eq. 6.17, which cancel heavily once rho = 1 / s.y is large (measured
    # 5e-9 relative on H, hence 5e-8 below). L-BFGS keeps q and r of the two-loop recursion in
    # float32, rounded at each of its 2h + 1 passes: slack 4e-7 ~ 3.4 eps32 (measured 9.3e-8).
    # m = 1 and m = 5 over 40 iterations wrap the ring of stored pairs many times.
    slack = 1e-8 if cls is optcore.BFGS else 4e-7
    problem, opt, r, X, G = run_quadratic(cls, cond, m=m or 5)
    pairs = []
    for k, alpha in enumerate(r.line_search[:, 0]):
        d = ref_direction(cls, pairs, G[k], problem.n, m)
        step = X[k + 1] - X[k]
        bound = (np.spacing(np.abs(X[k + 1]).astype(np.float32)) / 2
                 + abs(alpha) * np.spacing(np.abs(d).astype(np.float32)) / 2
                 + slack * abs(alpha) * np.abs(d).max())
        assert np.all(np.abs(step - alpha * d) <= bound), k
        pairs.append((f32(X[k + 1] - X[k]), f32(G[k + 1] - G[k])))
    if cls is optcore.BFGS:
        H = ref_bfgs_inverse(pairs, problem.n)
        np.testing.assert_allclose(opt.inverse_hessian(), H, rtol=0, atol=5e-8 * np.abs(H).max())


@pytest.mark.parametrize("cls,cond,tol", [(optcore.BFGS, 1e2, 5e-6), (optcore.BFGS, 1e3, 5e-6),
                                           (optcore.LBFGS, 1e2, 1e-5), (optcore.LBFGS, 1e3, 1e-3)])
def test_iterates_track_a_float64_run(cls, cond, tol):
    # A float64 run of the same formulas with exact gradients and the optimizer's step lengths.
    # The float32 run differs by its rounding: iterates and gradients carry relative errors of
    # ~eps32 = 1.2e-7 each step, which the curvature pairs propagate. Measured over 40
    # iterations, max |x_k - x_k^ref| / |x_0 - x*|: BFGS 2.6e-7 (cond 1e2) and 6.5e-7 (1e3),
    # L-BFGS 1.1e-6 and 1.8e-4: its float32 pairs (y = g - g0 loses digits as g shrinks) and
    # the 2h + 1 float32 roundings of its two-loop vector, amplified by the conditioning, keep
    # about four digits after 40 iterations at cond 1e3. Tolerances: 5-8x the measurement.
    problem, opt, r, X, G = run_quadratic(cls, cond)
    x = problem.x0.copy()
    g = problem.grad(x)
    pairs, worst = [], 0.0
    for k, alpha in enumerate(r.line_search[:, 0]):
        xn = x + alpha * ref_direction(cls, pairs, g, problem.n, 5)
        gn = problem.grad(xn)
        pairs.append((xn - x, gn - g))
        x, g = xn, gn
        worst = max(worst, np.linalg.norm(X[k + 1] - x) / np.linalg.norm(problem.x0 - problem.x_star))
    assert worst <= tol


# ---------------------------------------------------------------------------------------------
# the optima of convex problems against SciPy


_OPTIMA = {}


def scipy_optimum(name):
    """The problem and SciPy's optimum: L-BFGS-B to a gradient of 1e-10 (and, for the small
    logistic problem, SciPy's BFGS agreeing with it to 1e-12; its O(n^3) iterations make it
    take minutes on softmax)."""
    if name not in _OPTIMA:
        problem = P.make_problem(name)
        ref = sp_minimize(problem.fun_and_grad, problem.x0, jac=True, method="L-BFGS-B",
                          options={"gtol": 1e-10, "ftol": 1e-15, "maxfun": 20000}).fun
        if name == "logistic":
            bfgs = sp_minimize(problem.fun_and_grad, problem.x0, jac=True, method="BFGS",
                               options={"gtol": 1e-9}).fun
            assert bfgs == pytest.approx(ref, rel=1e-12)
        _OPTIMA[name] = problem, ref
    return _OPTIMA[name]


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("name", ["logistic", "softmax"])
def test_convex_data_problems_reach_scipys_optimum(cls, name):
    problem, ref = scipy_optimum(name)
    params = problem.parameters()
    r = cls(params).step(lambda: problem.loss_and_grad_(params))
    assert r.status in (Q.STATUS_CONVERGED, Q.STATUS_LINE_SEARCH)
    f = problem.fun(problem.x_of(params))
    # Float32 resolution: the loss is a float32 mean over 1797 samples, rounded to ~1e-7
    # relative per term and ~1e-6 in the sum, so decreases below a few 1e-6 relative cannot be
    # seen by the line search; measured 1.9e-7 .. 3.4e-6 relative above SciPy's optimum.
    assert ref <= f <= ref * (1 + 1e-5)
    assert r.grad_max <= 1e-4


@pytest.mark.parametrize("cls", METHODS)
def test_quadratic_minimum_to_float32_resolution(cls):
    problem = P.Quadratic(100, cond=1e3, seed=1)
    sp = sp_minimize(problem.fun_and_grad, problem.x0, jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-12, "ftol": 1e-16, "maxfun": 20000})
    np.testing.assert_allclose(sp.x, problem.x_star, atol=1e-6)
    params = problem.parameters()
    r = cls(params).step(lambda: problem.loss_and_grad_(params))
    assert r.success
    # the float32 gradient A32 (x - 1) has errors ~eps32 |A| |x| ~ eps32 lambda_max, which
    # move the zero of the gradient by ~eps32 * cond = 1.2e-4 along the flattest direction
    # (measured 4.7e-5 for BFGS, 3.0e-5 for L-BFGS)
    assert np.abs(problem.x_of(params) - sp.x).max() <= F32_EPS * problem.cond


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written


def pair_problem(n=5):
    x = np.linspace(-1, 1, n).astype(np.float32)
    g = np.zeros(n, dtype=np.float32)

    def closure():
        g[...] = 2 * (x - 0.5)
        return float(np.sum((x - 0.5) ** 2))
    return x, g, closure


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("kwargs,err,word", [
    ({"gtol": -1.0}, ValueError, "gtol"), ({"gtol": math.nan}, ValueError, "gtol"),
    ({"gtol": math.inf}, ValueError, "gtol"), ({"gtol": "1"}, TypeError, "gtol"),
    ({"ftol": -1e-9}, ValueError, "ftol"), ({"ftol": math.nan}, ValueError, "ftol"),
    ({"ftol": 2.0}, ValueError, "ftol"),
    ({"c1": 0.0}, ValueError, "c1"), ({"c2": 1.0}, ValueError, "c2"),
    ({"c1": 0.5, "c2": 0.4}, ValueError, "c1"), ({"c2": math.nan}, ValueError, "c2"),
    ({"maxiter": 0}, ValueError, "maxiter"), ({"maxiter": 2.5}, TypeError, "maxiter"),
    ({"maxfun": -3}, ValueError, "maxfun"), ({"maxls": 0}, ValueError, "maxls"),
    ({"maxls": True}, TypeError, "maxls"),
])
def test_bad_hyper_parameters_are_rejected(cls, kwargs, err, word):
    x, g, _ = pair_problem()
    with pytest.raises(err, match=word):
        cls([(x, g)], **kwargs)


@pytest.mark.parametrize("m,err", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                   (True, TypeError), (None, TypeError)])
def test_bad_memory_size_is_rejected(m, err):
    x, g, _ = pair_problem()
    with pytest.raises(err, match="m must"):
        optcore.LBFGS([(x, g)], m=m)


@pytest.mark.parametrize("cls", METHODS)
def test_bad_params_are_rejected(cls):
    x, g, _ = pair_problem(6)
    with pytest.raises(TypeError, match="float32"):
        cls([(x.astype(np.float64), g)])
    with pytest.raises(ValueError, match="C-contiguous"):
        cls([(np.zeros((4, 4), np.float32)[:, 1], np.zeros(4, np.float32))])
    ro = g.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="grad.*read-only"):
        cls([(x, ro)])
    with pytest.raises(ValueError, match="share memory"):
        cls([(x, x)])
    with pytest.raises(ValueError, match="shape"):
        cls([(x, g[:5])])
    with pytest.raises(TypeError, match="params must"):
        cls(x)
    with pytest.raises(ValueError, match="no elements"):
        cls([(x[:0], g[:0])])


def test_bfgs_refuses_a_matrix_larger_than_the_machine():
    assert optcore.BFGS.memory_bytes(10_000) == 8 * 10_000 * 10_001 // 2 + 8 * 10_000 * 40 + 20 * 10_000
    n = 4_000_000   # an 8 n(n+1)/2 = 64 TB triangle: refused before anything is allocated
    x = np.zeros(n, np.float32)
    with pytest.raises(MemoryError, match="use LBFGS"):
        optcore.BFGS([(x, np.zeros_like(x))])


@pytest.mark.parametrize("cls", METHODS)
def test_bad_closures_raise_and_write_nothing(cls):
    x, g, closure = pair_problem()
    opt = cls([(x, g)])
    x_before, g_before = x.copy(), g.copy()
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(1.0)
    with pytest.raises(TypeError, match="real number"):
        opt.step(lambda: None)
    with pytest.raises(TypeError, match="real number"):
        opt.step(lambda: np.ones(3))
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(g, g_before)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite loss"):
            opt.step(lambda: bad)
        np.testing.assert_array_equal(x, x_before)

    def nan_grad():
        g[...] = np.nan
        return 1.0
    with pytest.raises(ValueError, match="gradient at the starting point"):
        opt.step(nan_grad)
    np.testing.assert_array_equal(x, x_before)
    # the optimizer is still usable afterwards
    r = opt.step(closure)
    assert r.success and np.abs(x - 0.5).max() < 1e-6


@pytest.mark.parametrize("cls", METHODS)
def test_nan_during_the_line_search_shortens_the_step(cls):
    # f(x) = 100 sum (x - 0.2)^2 is NaN where max|x| > 0.3; from x = 0 the first trial step
    # (alpha = 1 / |g|, a step of length 1 along -g) lands there, so the search must treat
    # NaN as "too long a step" and cut it back
    x = np.zeros(3, np.float32)
    g = np.zeros(3, np.float32)

    def closure():
        g[...] = 200 * (x - 0.2)
        return math.nan if np.abs(x).max() > 0.3 else float(100 * np.sum((x - 0.2) ** 2))
    r = cls([(x, g)]).step(closure)
    assert r.success
    np.testing.assert_allclose(x, 0.2, atol=1e-6)
    assert np.isnan(r.trace[1, 2])


# ---------------------------------------------------------------------------------------------
# determinism, layouts, calls


def run_mlp(cls, threads, hidden, iters):
    optcore.set_num_threads(threads)
    problem = P.MLP(hidden=hidden)
    params = problem.parameters()
    r = cls(params, maxiter=iters).step(lambda: problem.loss_and_grad_(params))
    return params.flat.copy(), r


@pytest.mark.parametrize("cls,hidden", [(optcore.BFGS, 16), (optcore.LBFGS, 520)])
def test_one_and_two_threads_give_identical_bits(cls, hidden):
    # n = 1226 (the BFGS triangle, 751k entries, is swept in parallel) and n = 39530 (above
    # the 32768 elements where the vector kernels go parallel)
    x1, r1 = run_mlp(cls, 1, hidden, 10)
    x2, r2 = run_mlp(cls, 2, hidden, 10)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(r1.trace[:, 2], r2.trace[:, 2])
    np.testing.assert_array_equal(r1.line_search, r2.line_search)


@pytest.mark.parametrize("cls", METHODS)
def test_arena_and_array_pairs_give_identical_bits(cls):
    problem = P.MLP()
    params = problem.parameters()
    r1 = cls(params, maxiter=20).step(lambda: problem.loss_and_grad_(params))
    # the same tensors as (param, grad) pairs of separate arrays
    other = problem.parameters()
    pairs = [(np.ascontiguousarray(other[k]), np.zeros_like(other[k])) for k in other]

    def closure():
        for (p, _), k in zip(pairs, other):
            other[k][...] = p
        f = problem.loss_and_grad_(other)
        for (_, g), k in zip(pairs, other):
            g[...] = other.grads[k]
        return f
    r2 = cls(pairs, maxiter=20).step(closure)
    for (p, _), k in zip(pairs, params):
        np.testing.assert_array_equal(p, params[k])
    np.testing.assert_array_equal(r1.line_search, r2.line_search)
    assert r1.x is params and r1.jac is params.grads
    assert all(a is p for a, (p, _) in zip(r2.x, pairs))


@pytest.mark.parametrize("cls", METHODS)
def test_the_memory_carries_over_between_step_calls(cls):
    problem = P.Rosenbrock(6)
    one = problem.parameters()
    r = cls(one, maxiter=12).step(lambda: problem.loss_and_grad_(one))
    many = problem.parameters()
    opt = cls(many, maxiter=1)
    steps = [opt.step(lambda: problem.loss_and_grad_(many)) for _ in range(12)]
    assert [s.nit for s in steps] == [1] * 12 and opt.iterations == 12
    # each call re-evaluates its start point (one more evaluation) and BFGS recomputes H g
    # there by a matrix sweep instead of the rank-two formula, so iterates agree to rounding
    np.testing.assert_allclose(many["x"], one["x"], rtol=1e-5)
    np.testing.assert_allclose(steps[-1].fun, r.fun, rtol=1e-4)
    opt.reset()
    assert opt.step(lambda: problem.loss_and_grad_(many)).line_search[0, 0] < 1.0


@pytest.mark.parametrize("cls", METHODS)
def test_stopping_rules_and_the_result_record(cls):
    problem = P.Rosenbrock(8)
    params = problem.parameters()
    closure = lambda: problem.loss_and_grad_(params)  # noqa: E731
    r = cls(params, maxfun=10).step(closure)
    assert r.status == Q.STATUS_LIMIT and "F,G EVALUATIONS" in r.message and not r.success
    assert 10 <= r.nfev < 10 + 20
    r = cls(params, maxiter=3).step(closure)
    assert r.status == Q.STATUS_LIMIT and r.nit == 3 and "ITERATIONS" in r.message
    r = cls(params, gtol=1e-3, ftol=0.0).step(closure)
    assert r.status == Q.STATUS_CONVERGED and r.grad_max <= 1e-3 and "GRADIENT" in r.message
    assert r.grad_max == pytest.approx(np.abs(params.grads["x"]).max(), rel=1e-12)
    assert r.grad_norm == pytest.approx(np.linalg.norm(params.grads["x"].astype(float)), rel=1e-9)
    assert r.fun == r.trace[-1, 2] == pytest.approx(problem.fun(problem.x_of(params)), rel=1e-5)
    assert r.nfev == r.njev == r.evaluations == len(r.trace) and r.nhev == 0
    assert r.method == ("optcore-bfgs" if cls is optcore.BFGS else "optcore-lbfgs")
    assert r.line_search.shape == (r.nit, 6)
    r = cls(params, gtol=0.0, ftol=1e-3).step(closure)
    assert r.status == Q.STATUS_CONVERGED and "REL_REDUCTION" in r.message
    # already converged: no iteration
    r = cls(params, gtol=1.0).step(closure)
    assert r.nit == 0 and r.nfev == 1 and r.success


@pytest.mark.parametrize("cls", METHODS)
def test_a_failed_line_search_restores_the_last_iterate(cls):
    # a gradient of the wrong sign: every step along -g increases f, so no step satisfies
    # sufficient decrease; the parameters and gradients go back to the last iterate
    x = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.zeros(3, np.float32)
    sign = [1.0]

    def closure():     # f = sum (x - 3)^4 + x^2, with the sign of the gradient switchable
        x64 = x.astype(np.float64)
        g[...] = sign[0] * (4 * (x64 - 3) ** 3 + 2 * x64)
        return float(np.sum((x64 - 3) ** 4 + x64**2))
    opt = cls([(x, g)], maxls=8)
    sign[0] = -1.0
    r = opt.step(closure)
    assert r.status == Q.STATUS_LINE_SEARCH and "LNSRCH" in r.message and r.nit == 0
    assert r.nfev == 1 + 8
    np.testing.assert_array_equal(x, [1.0, -2.0, 0.5])
    np.testing.assert_array_equal(g, -(4 * (x - 3.0) ** 3 + 2 * x))
    assert r.fun == 16 + 625 + 39.0625 + 5.25
    # with a memory, the failure first clears it and retries along -g (a second search)
    sign[0] = 1.0
    opt = cls([(x, g)], maxls=8, gtol=0.0, ftol=0.0, maxiter=2)
    opt.step(closure)
    start = x.copy()
    sign[0] = -1.0
    r = opt.step(closure)
    assert r.status == Q.STATUS_LINE_SEARCH and r.nit == 0 and r.nfev == 1 + 8 + 8
    np.testing.assert_array_equal(x, start)
    # ... unless the evaluation budget is spent
    sign[0] = 1.0
    opt.step(closure)
    sign[0] = -1.0
    opt.maxfun = 5
    r = opt.step(closure)
    assert r.status == Q.STATUS_LIMIT and r.nfev == 1 + 8
