"""optcore.curvature on functions whose Hessian is known in closed form."""
import numpy as np
import pytest
from scipy.optimize import rosen_hess

from optcore import curvature as C
from optcore import problems as P


class Diagonal(P.Problem):
    """f(x) = sum_i d_i x_i^2 / 2 + q sum_i x_i^4 / 4: Hessian diag(d + 3 q x^2)."""

    name = "diagonal"

    def __init__(self, d, quartic=0.0):
        self.d = np.asarray(d, dtype=float)
        self.q = quartic
        super().__init__({"x": (self.d.size,)}, np.zeros(self.d.size))

    def _fun_grad(self, x):
        return float(0.5 * self.d @ (x * x) + 0.25 * self.q * np.sum(x**4)), self.d * x + self.q * x**3

    def _hessp(self, x, v):
        return (self.d + 3 * self.q * x * x) * v


def test_saddle_x2_minus_y2():
    # f = x^2 - y^2: H = diag(2, -2), a saddle at 0, escape along +-e_y
    problem = Diagonal([2.0, -2.0])
    c = C.analyze(problem, [0.0, 0.0])
    assert c.kind == "saddle" and c.critical
    assert c.lambda_min == pytest.approx(-2.0) and c.lambda_max == pytest.approx(2.0)
    np.testing.assert_allclose(np.abs(c.escape_direction), [0.0, 1.0], atol=1e-12)
    assert c.condition == np.inf
    # the escape direction lowers the loss on both sides: f(t u) = -t^2
    for t in (1e-3, -1e-3):
        assert problem.fun(t * c.escape_direction) == pytest.approx(-t * t)


def test_maximum_minimum_and_degenerate():
    c = C.analyze(Diagonal([-1.0, -3.0]), [0.0, 0.0])
    assert c.kind == "maximum" and c.escape_direction is not None
    c = C.analyze(Diagonal([1.0, 3.0]), [0.0, 0.0])
    assert c.kind == "minimum" and c.condition == pytest.approx(3.0)
    assert c.escape_direction is None
    # f = x^2/2 + y^4/4: H = diag(1, 0) at 0, the second-order test is inconclusive
    c = C.analyze(Diagonal([1.0, 0.0], quartic=1.0), [0.0, 0.0])
    assert c.kind == "degenerate" and c.critical


def test_rosenbrock_at_its_minimum_closed_form():
    # H(1, 1) = [[802, -400], [-400, 200]]: lambda = 501 -+ sqrt(501^2 - 400)
    c = C.analyze(P.Rosenbrock(2), [1.0, 1.0])
    lo, hi = 501 - np.sqrt(501**2 - 400), 501 + np.sqrt(501**2 - 400)
    assert c.kind == "minimum" and c.critical and c.grad_norm == 0.0
    assert c.lambda_min == pytest.approx(lo, rel=1e-12)
    assert c.lambda_max == pytest.approx(hi, rel=1e-12)
    assert c.condition == pytest.approx(hi / lo, rel=1e-12)
    H = np.array([[802.0, -400.0], [-400.0, 200.0]])
    np.testing.assert_allclose(H @ c.v_min, lo * c.v_min, atol=1e-10)


@pytest.mark.parametrize("n", [50, 400])
def test_eigsh_path_matches_the_dense_hessian(n):
    # n = 400 > dense_max takes the Lanczos path; reference: scipy's rosen_hess + eigvalsh
    problem = P.Rosenbrock(n)
    x = np.random.default_rng(0).uniform(0.5, 1.5, n)
    w = np.linalg.eigvalsh(rosen_hess(x))
    (lo, v_lo), (hi, v_hi), method = C.extreme_eigenpairs(problem, x)
    assert method == ("dense" if n <= 200 else "eigsh")
    assert lo == pytest.approx(w[0], rel=1e-8, abs=1e-8 * abs(w[-1]))
    assert hi == pytest.approx(w[-1], rel=1e-10)
    np.testing.assert_allclose(problem.hessp(x, v_hi), hi * v_hi, atol=1e-6 * abs(hi))


def test_quadratic_condition_number_by_lanczos():
    problem = P.Quadratic(300, cond=1e3, seed=2)
    c = C.analyze(problem, problem.x0)
    assert c.method == "eigsh"
    assert c.kind == "minimum" and not c.critical  # x0 is not the minimizer
    assert c.lambda_min == pytest.approx(1.0, rel=1e-8)
    assert c.lambda_max == pytest.approx(1e3, rel=1e-10)
    assert c.condition == pytest.approx(1e3, rel=1e-8)
    c2 = C.analyze(problem, problem.x0)
    np.testing.assert_array_equal(c.v_min, c2.v_min)  # seeded start vector


def test_escape_direction_in_high_dimension():
    d = np.linspace(1.0, 5.0, 300)
    d[123] = -0.5
    c = C.analyze(Diagonal(d), np.zeros(300))
    assert c.method == "eigsh" and c.kind == "saddle"
    assert c.lambda_min == pytest.approx(-0.5)
    assert abs(c.escape_direction[123]) == pytest.approx(1.0, abs=1e-8)


def test_bfgs_local_minimum_of_rosenbrock_is_a_minimum():
    # for n >= 4 the Rosenbrock function has a second local minimum near (-1, 1, ..., 1)
    from optcore.baselines import minimize

    problem = P.Rosenbrock(10)
    r = minimize(problem, "bfgs", tol=1e-10)
    c = C.analyze(problem, r.x, gtol=1e-4)
    assert r.fun > 3.0 and r.x[0] < -0.9
    assert c.critical and c.kind == "minimum"


def test_hessian_operator_and_bad_input():
    problem = P.Quadratic(5, cond=10.0)
    op = C.hessian_operator(problem, problem.x0)
    np.testing.assert_allclose(op @ np.eye(5), problem.A)
    with pytest.raises(ValueError, match="x has"):
        C.analyze(problem, np.zeros(4))
    with pytest.raises(ValueError, match="gtol"):
        C.analyze(problem, problem.x0, gtol=-1.0)
