"""optcore.baselines: SciPy methods reach the known minima, train() with optcore optimizers,
the Result record and its accounting of evaluations."""
import json
import math

import numpy as np
import pytest

import optcore
from optcore import baselines as B
from optcore import problems as P
from optcore.clip import GlobalNorm

FIELDS = {"x", "fun", "nit", "nfev", "njev", "nhev", "success", "status", "message",
          "seconds", "grad_norm", "trace", "evaluations", "method", "problem", "accuracy",
          "epochs", "val_loss", "val_accuracy"}


@pytest.mark.parametrize("method", list(B.METHODS))
@pytest.mark.parametrize("n", [2, 3])
def test_scipy_methods_reach_the_rosenbrock_minimum(method, n):
    # for n <= 3 the only minimum is (1, ..., 1)
    r = B.minimize(P.Rosenbrock(n), method, tol=1e-12, maxiter=5000)
    np.testing.assert_allclose(r.x, np.ones(n), atol=2e-5)
    assert r.fun < 1e-9
    assert r.grad_norm < 1e-3


@pytest.mark.parametrize("method", list(B.METHODS))
def test_scipy_methods_reach_the_quadratic_minimum(method):
    problem = P.Quadratic(20, cond=100.0, seed=1)
    r = B.minimize(problem, method, tol=1e-12, maxiter=5000)
    # |x - x*| <= |g| / lambda_min with lambda_min = 1
    np.testing.assert_allclose(r.x, np.ones(20), atol=1e-5)
    assert r.fun < 1e-10


def test_result_record_fields_and_accounting():
    problem = P.Rosenbrock(4)
    for method, uses_hessp in B.METHODS.items():
        r = B.minimize(problem, method, maxiter=30)
        assert FIELDS <= set(r)
        assert r.method == method and r.problem == "rosenbrock"
        assert r.njev == r.nfev >= 1
        assert (r.nhev > 0) == uses_hessp
        assert r.evaluations == r.nfev + problem.hessp_cost * r.nhev
        assert r.epochs == r.nfev + B.HESSP_PASSES * r.nhev
        assert r.trace[-1, 3] == r.epochs and r.val_loss is None and r.val_accuracy is None
        assert r.trace.shape[1] == 4 and len(r.trace) - r.nfev in ((0, 1) if uses_hessp else (0,))
        assert np.all(np.diff(r.trace[:, 0]) > 0) and np.all(np.diff(r.trace[:, 1]) >= 0)
        assert r.trace[-1, 0] == r.evaluations
        assert r.fun == pytest.approx(problem.fun(r.x))
        assert r.grad_norm == pytest.approx(np.linalg.norm(problem.grad(r.x)))
        assert r.seconds > 0 and r.accuracy is None
        json.dumps(r.to_dict())


@pytest.mark.parametrize("method", list(B.METHODS))
def test_budget_stops_at_the_best_point(method):
    problem = P.MLP(*P.load_digits(), hidden=4) if B.METHODS[method] else P.Rosenbrock(10)
    r = B.minimize(problem, method, budget=7)
    assert r.evaluations <= 7
    assert r.status == B.STATUS_BUDGET and not r.success
    assert "budget" in r.message
    assert r.fun == pytest.approx(r.trace[:, 2].min())


def test_minimize_time_limit():
    r = B.minimize(P.Rosenbrock(50), "cg", time_limit=1e-9)
    assert r.status == B.STATUS_TIME and r.nfev <= 1


@pytest.mark.parametrize("kwargs, err, match", [
    ({"method": "nelder-mead"}, ValueError, "unknown method"),
    ({"method": 3}, TypeError, "method"),
    ({"method": "bfgs", "budget": 0}, ValueError, "budget"),
    ({"method": "bfgs", "budget": float("nan")}, ValueError, "budget"),
    ({"method": "bfgs", "time_limit": -1}, ValueError, "time_limit"),
    ({"method": "bfgs", "maxiter": 0}, ValueError, "maxiter"),
    ({"method": "bfgs", "tol": 0.0}, ValueError, "tol"),
])
def test_minimize_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        B.minimize(P.Rosenbrock(2), **kwargs)
    with pytest.raises(TypeError, match="problem"):
        B.minimize(lambda x: x, "bfgs")


def test_methods_are_case_insensitive():
    assert B.minimize(P.Rosenbrock(2), "L-BFGS-B").method == "l-bfgs-b"


@pytest.mark.parametrize("name", list(P.PROBLEMS))
def test_train_adam_decreases_the_loss(name):
    problem = P.make_problem(name)
    batch = 128 if problem.n_samples else None
    r = B.train(problem, optcore.Adam, steps=60, batch_size=batch, lr=0.01)
    assert r.fun < problem.fun(problem.x0)
    assert r.trace[-1, 2] < r.trace[0, 2]
    assert r.nit == r.nfev == r.njev == 60 and r.nhev == 0
    assert r.success and r.status == 0 and r.method == "adam"
    assert FIELDS <= set(r)
    json.dumps(r.to_dict())


def test_train_counts_minibatch_evaluations_in_epochs():
    problem = P.SoftmaxRegression()
    m = problem.n_samples
    r = B.train(problem, optcore.SGD, budget=2.0, batch_size=100, lr=0.1)
    assert r.nit == int(2.0 * m / 100)
    assert r.evaluations == pytest.approx(r.nit * 100 / m)
    assert r.status == B.STATUS_BUDGET
    assert r.trace[0, 0] == 0 and r.trace[-1, 0] == pytest.approx(r.evaluations)


def test_train_is_reproducible_for_a_seed():
    problem = P.MLP(hidden=6)
    a = B.train(problem, optcore.Adam, steps=30, batch_size=64, seed=3, lr=0.01)
    b = B.train(problem, optcore.Adam, steps=30, batch_size=64, seed=3, lr=0.01)
    c = B.train(problem, optcore.Adam, steps=30, batch_size=64, seed=4, lr=0.01)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)


def test_train_with_schedule_and_clip():
    problem = P.Quadratic(10, cond=10.0)
    lrs = []

    def schedule(t):
        lrs.append(t)
        return 0.05

    r = B.train(problem, optcore.SGD, steps=5, schedule=schedule, clip=1.0, lr=1.0)
    assert lrs == [0, 1, 2, 3, 4]
    # with |g| clipped to 1 and lr 0.05 each step moves x by at most 0.05
    assert np.linalg.norm(r.x - problem.x0) <= 5 * 0.05 + 1e-6
    s = B.train(problem, optcore.SGD, steps=5, schedule=lambda t: 0.05, clip=GlobalNorm(1.0),
                lr=1.0)
    np.testing.assert_array_equal(r.x, s.x)


def test_train_with_an_optimizer_instance():
    problem = P.Rosenbrock(4)
    params = problem.parameters()
    opt = optcore.NAdam(params, lr=0.01)
    r = B.train(problem, opt, steps=10)
    np.testing.assert_array_equal(r.x, problem.x_of(params))
    assert r.method == "nadam"
    with pytest.raises(TypeError, match="instance"):
        B.train(problem, opt, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="this problem needs"):
        B.train(P.Rosenbrock(5), opt, steps=1)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_train_reports_divergence():
    r = B.train(P.Quadratic(10, cond=1e3), optcore.SGD, steps=200, lr=10.0)
    assert r.status == B.STATUS_DIVERGED and not r.success
    assert r.nit < 200
    json.dumps(r.to_dict(), allow_nan=False)


def test_to_dict_is_strict_json():
    r = B.Result(x=np.array([1.0, np.nan]), fun=float("inf"), nit=np.int64(3),
                 trace=np.array([[0.0, 0.0, np.nan]]), message="m", accuracy=None)
    d = r.to_dict()
    assert d == {"x": [1.0, None], "fun": None, "nit": 3, "trace": [[0.0, 0.0, None]],
                 "message": "m", "accuracy": None}
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("kwargs, err, match", [
    ({}, ValueError, "steps, budget or time_limit"),
    ({"steps": 0}, ValueError, "steps"),
    ({"budget": -1.0}, ValueError, "budget"),
    ({"steps": 1, "clip": "big"}, TypeError, "clip"),
    ({"steps": 1, "schedule": 0.1}, TypeError, "schedule"),
    ({"steps": 1, "nonsense": 1.0}, TypeError, "nonsense"),
])
def test_train_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        B.train(P.Rosenbrock(2), optcore.Adam, **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        B.train(P.Rosenbrock(2), "adam", steps=1)


@pytest.mark.parametrize("method", ["newton-cg", "trust-ncg", "l-bfgs-b"])
def test_epochs_budget_charges_hessian_vector_products_as_two_passes(method):
    # logistic: exact Hv, one gradient under "evals" but two passes under "epochs"
    problem = P.LogisticRegression(holdout=0.2)
    for units, budget in (("evals", 9), ("epochs", 9)):
        r = B.minimize(problem, method, budget=budget, units=units)
        assert r.evaluations == r.nfev + r.nhev and r.epochs == r.nfev + 2 * r.nhev
        spent = r.evaluations if units == "evals" else r.epochs
        assert spent <= budget
        if r.status == B.STATUS_BUDGET:
            # stopped by the next charge: one evaluation (1) or one product (1 or 2) more
            assert spent + (2 if units == "epochs" and r.nhev else 1) > budget
        assert np.all(np.diff(r.trace[:, 3]) >= 0)
        val = problem.validation(r.x)
        assert (r.val_loss, r.val_accuracy) == val and 0.0 < r.val_loss < 1.0


@pytest.mark.parametrize("budget", [0.3, 1.0, 2.5, 3.0])
def test_train_epochs_budget_counts_the_samples_of_each_batch(budget):
    problem = P.SoftmaxRegression(holdout=0.2)  # 1438 samples: 11 batches of 128 and one of 30
    r = B.train(problem, optcore.Adam, budget=budget, batch_size=128, seed=5, units="epochs",
                lr=1e-3)
    sizes = []
    batches = problem.batches(128, seed=5)
    while sum(sizes) + (b := next(batches).size) <= budget * problem.n_samples * (1 + 1e-12):
        sizes.append(b)
    assert r.nit == len(sizes) == B.planned_steps(budget, problem.n_samples, 128, "epochs")
    assert r.epochs == pytest.approx(sum(sizes) / problem.n_samples, rel=1e-12)
    assert r.evaluations == pytest.approx(len(sizes) * 128 / problem.n_samples, rel=1e-12)
    assert r.trace[-1, 3] == pytest.approx(r.epochs) and r.val_loss == problem.validation(r.x)[0]
    ev = B.train(problem, optcore.Adam, budget=budget, batch_size=128, seed=5, lr=1e-3)
    assert ev.nit == B.planned_steps(budget, problem.n_samples, 128, "evals") == math.floor(
        budget * problem.n_samples / 128 + 1e-9)


def test_planned_steps_without_minibatches_and_bad_units():
    assert B.planned_steps(7.5, None, None, "epochs") == 7
    assert B.planned_steps(7.5, 100, 200, "evals") == 7
    with pytest.raises(ValueError, match="units"):
        B.minimize(P.Rosenbrock(3), "cg", budget=3, units="passes")
    with pytest.raises(ValueError, match="units"):
        B.train(P.Rosenbrock(3), optcore.SGD, steps=3, units="seconds")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_diverged_run_validation_scores():
    problem = P.SoftmaxRegression(holdout=0.2)
    with np.errstate(all="ignore"):
        r = B.train(problem, optcore.SGD, steps=50, lr=1e30)
    assert r.status == B.STATUS_DIVERGED
    assert (r.val_loss, r.val_accuracy) == problem.validation(r.x)  # x is still finite
    json.dumps(r.to_dict(), allow_nan=False)
    # non-finite parameters have no score (NaN, null in JSON) rather than argmax's guess
    x = np.full(problem.n, np.inf)
    bad = B._finish(problem, x, B._Meter(None, None), 0.0)
    assert np.isnan(bad.val_loss) and np.isnan(bad.val_accuracy)
    assert json.loads(json.dumps(bad.to_dict(), allow_nan=False))["val_accuracy"] is None


@pytest.mark.parametrize("cls", [optcore.BFGS, optcore.LBFGS])
def test_quasi_newton_runs_the_optimizer_unchanged_and_counts_like_minimize(cls):
    problem = P.LogisticRegression(holdout=0.2)
    r = B.quasi_newton(problem, cls, budget=1000)
    # the same optimizer driven directly: the harness only counts, so the iterates agree bitwise
    params = problem.parameters()
    direct = cls(params).step(lambda: problem.loss_and_grad_(params))
    # (both end the same way: converged, or a line search that float32 losses cannot satisfy)
    assert r.status == direct.status and r.success == direct.success and r.nfev < 1000
    np.testing.assert_array_equal(r.x, problem.x_of(params))
    assert r.nit == direct.nit and r.nfev == direct.nfev == r.evaluations == r.epochs
    assert r.method == cls.method and r.nhev == 0
    assert len(r.trace) == r.nfev and r.trace[-1, 0] == r.nfev and r.trace[-1, 3] == r.nfev
    assert (r.val_loss, r.val_accuracy) == problem.validation(r.x)


@pytest.mark.parametrize("units", ["evals", "epochs"])
def test_quasi_newton_budget_stops_with_the_best_point(units):
    problem = P.Rosenbrock(6)
    r = B.quasi_newton(problem, optcore.LBFGS, budget=7, units=units)
    assert r.status == B.STATUS_BUDGET and not r.success and r.nfev == 7
    assert r.evaluations == r.epochs == 7
    # the best of the evaluated (float32) points, rescored in float64
    assert r.fun == pytest.approx(problem.fun(r.x)) and r.trace[:, 2].min() == pytest.approx(
        r.fun, rel=1e-5)
    assert 0 < r.nit < 7


def test_quasi_newton_time_limit_and_bad_arguments():
    r = B.quasi_newton(P.MLP(hidden=30, holdout=0.2), optcore.BFGS, time_limit=1e-6)
    assert r.status == B.STATUS_TIME and r.nfev <= 1
    with pytest.raises(TypeError, match="optimizer"):
        B.quasi_newton(P.Rosenbrock(3), optcore.Adam(optcore.Parameters({"x": (3,)})))
    with pytest.raises(TypeError, match="problem"):
        B.quasi_newton("rosenbrock", optcore.BFGS)
    with pytest.raises(ValueError, match="budget"):
        B.quasi_newton(P.Rosenbrock(3), optcore.BFGS, budget=0)
