"""optcore.problems: gradients and Hessian-vector products against independent references
(finite differences, scipy.optimize.rosen*, torch autograd), the float32 path against the
float64 path, minibatches and data validation."""
import numpy as np
import pytest
from scipy.optimize import rosen, rosen_der, rosen_hess_prod

import optcore
from optcore import problems as P


def _digits_subset(m=300):
    X, y = P.load_digits()
    return X[:m], y[:m]


def _small():
    """Every problem, small enough for coordinate-wise finite differences."""
    X, y = _digits_subset(200)
    return [
        P.Rosenbrock(6),
        P.Quadratic(12, cond=50.0, seed=3),
        P.LogisticRegression(X, y % 2),
        P.SoftmaxRegression(X[:, :20], y % 4),
        P.MLP(X[:, :12], y % 3, hidden=4, seed=1),
    ]


def _point(problem, rng, scale=0.3):
    return problem.x0 + scale * rng.standard_normal(problem.n)


@pytest.mark.parametrize("i", range(5))
def test_grad_matches_central_differences(i, rng):
    problem = _small()[i]
    x = _point(problem, rng)
    g = problem.grad(x)
    h = 1e-6
    eye = np.eye(problem.n)
    fd = np.array([(problem.fun(x + h * e) - problem.fun(x - h * e)) / (2 * h) for e in eye])
    # central differences: truncation O(h^2 f''') and rounding O(eps |f| / h) ~ 1e-9 here
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(g).max()))


@pytest.mark.parametrize("i", range(5))
def test_hessp_matches_differences_of_gradients(i, rng):
    problem = _small()[i]
    x = _point(problem, rng)
    for _ in range(3):
        v = rng.standard_normal(problem.n)
        h = 1e-6
        fd = (problem.grad(x + h * v) - problem.grad(x - h * v)) / (2 * h)
        hv = problem.hessp(x, v)
        # both sides carry O(1e-8) relative error (finite differences of float64 gradients)
        np.testing.assert_allclose(hv, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


def test_hessp_is_linear_and_symmetric(rng):
    for problem in _small():
        x = _point(problem, rng)
        u, v = rng.standard_normal((2, problem.n))
        hu, hv = problem.hessp(x, u), problem.hessp(x, v)
        # u^T H v = v^T H u: exact for analytic products, ~1e-7 for the MLP's differences
        assert abs(u @ hv - v @ hu) <= 1e-6 * (1 + abs(u @ hv))
        np.testing.assert_allclose(problem.hessp(x, 2 * u + v), 2 * hu + hv, rtol=1e-6,
                                   atol=1e-8 * np.abs(hu).max())
        np.testing.assert_array_equal(problem.hessp(x, np.zeros(problem.n)), 0.0)


def test_rosenbrock_matches_scipy(rng):
    for n in (2, 3, 10):
        problem = P.Rosenbrock(n)
        for _ in range(5):
            x = rng.uniform(-2, 2, n)
            v = rng.standard_normal(n)
            assert problem.fun(x) == pytest.approx(rosen(x), rel=1e-14)
            np.testing.assert_allclose(problem.grad(x), rosen_der(x), rtol=1e-13, atol=1e-12)
            np.testing.assert_allclose(problem.hessp(x, v), rosen_hess_prod(x, v), rtol=1e-12,
                                       atol=1e-10)
        assert problem.fun(np.ones(n)) == 0.0
        np.testing.assert_array_equal(problem.grad(np.ones(n)), 0.0)


def test_quadratic_spectrum_and_minimum():
    problem = P.Quadratic(30, cond=1e4, seed=7)
    w = np.linalg.eigvalsh(problem.A)
    np.testing.assert_allclose(w, np.geomspace(1.0, 1e4, 30), rtol=1e-9)
    assert problem.fun(np.ones(30)) == 0.0
    x = np.zeros(30)
    assert problem.fun(x) == pytest.approx(0.5 * np.ones(30) @ problem.A @ np.ones(30))
    np.testing.assert_allclose(P.Quadratic(30, cond=1e4, seed=7).A, problem.A)
    assert not np.allclose(P.Quadratic(30, cond=1e4, seed=8).A, problem.A)


def _torch_reference(problem, x, v):
    """Loss, gradient and exact Hessian-vector product of a data problem through torch
    autograd in float64, written from the documented formulas (not calling optcore)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    X = torch.tensor(problem.X)
    y = torch.tensor(problem.y)

    def f(t):
        if isinstance(problem, P.LogisticRegression):
            w, b = t[:-1], t[-1]
            z = X @ w + b
            return (F.binary_cross_entropy_with_logits(z, y.double())
                    + 0.5 * problem.alpha * (w @ w))
        if isinstance(problem, P.SoftmaxRegression):
            d, k = problem.n_features, problem.n_classes
            W, b = t[: d * k].reshape(d, k), t[d * k:]
            return F.cross_entropy(X @ W + b, y) + 0.5 * problem.alpha * (W * W).sum()
        d, h, k = problem.n_features, problem.hidden, problem.n_classes
        o = np.cumsum([0, d * h, h, h, h * k, k])
        W1, gamma, beta, W2, b2 = (t[a:b] for a, b in zip(o, o[1:]))
        W1, W2 = W1.reshape(d, h), W2.reshape(h, k)
        H = F.batch_norm(X @ W1, None, None, gamma, beta, training=True, eps=1e-5)
        Z = torch.tanh(H) @ W2 + b2
        return F.cross_entropy(Z, y) + 0.5 * problem.alpha * ((W1 * W1).sum() + (W2 * W2).sum())

    xt = torch.tensor(x, requires_grad=True)
    loss = f(xt)
    (g,) = torch.autograd.grad(loss, xt, create_graph=True)
    (hv,) = torch.autograd.grad(g @ torch.tensor(v), xt)
    return loss.item(), g.detach().numpy(), hv.numpy()


@pytest.mark.parametrize("cls", [P.LogisticRegression, P.SoftmaxRegression, P.MLP])
def test_data_problems_match_torch_autograd(cls, rng):
    X, y = _digits_subset(400)
    problem = cls(X, y % 2) if cls is P.LogisticRegression else cls(X, y)
    x = _point(problem, rng, 0.1)
    v = rng.standard_normal(problem.n)
    loss, g, hv = _torch_reference(problem, x, v)
    f, g_ours = problem.fun_and_grad(x)
    # same float64 formulas, different summation orders: agreement to ~1e-13 relative
    assert f == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(g_ours, g, rtol=1e-9, atol=1e-12 * np.abs(g).max())
    # the MLP's hessp is a central difference (h ~ 6e-6): O(h^2) + O(eps/h) ~ 1e-9 relative
    tol = 1e-5 if cls is P.MLP else 1e-9
    np.testing.assert_allclose(problem.hessp(x, v), hv, rtol=tol, atol=tol * np.abs(hv).max())


def _grads_flat(problem, params):
    return np.concatenate([params.grads[k].ravel() for k in problem.shapes]).astype(np.float64)


@pytest.mark.parametrize("name", list(P.PROBLEMS))
def test_float32_path_agrees_with_float64_path(name, rng):
    problem = P.make_problem(name)
    params = problem.parameters(_point(problem, rng, 0.05))
    x = problem.x_of(params)  # the float32-rounded point both paths see
    f, g = problem.fun_and_grad(x)
    loss = problem.loss_and_grad_(params)
    g32 = _grads_flat(problem, params)
    # float32 arithmetic over at most ~1800 samples x 64 features: ~1e-7 relative observed;
    # 2e-5 leaves room for the accumulated rounding of the matrix products
    assert loss == pytest.approx(f, rel=2e-5)
    assert np.linalg.norm(g32 - g) <= 2e-5 * np.linalg.norm(g)


def test_mlp_float32_path_is_thread_count_independent(rng):
    # 1797 x 40 = 71880 batch-norm inputs: several chunks, run in parallel with 2 threads
    problem = P.MLP(hidden=40)
    params = problem.parameters(_point(problem, rng, 0.1))
    out = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        loss = problem.loss_and_grad_(params)
        out.append((loss, params.grads.flat.copy()))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_mlp_float32_path_uses_optcore_batchnorm(monkeypatch):
    problem = P.MLP(*_digits_subset(100), hidden=4)
    calls = []
    original = optcore.kernels.batchnorm_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(optcore.kernels, "batchnorm_forward", spy)
    problem.loss_and_grad_(problem.parameters())
    assert calls == [1]


@pytest.mark.parametrize("cls", [P.LogisticRegression, P.SoftmaxRegression, P.MLP])
def test_minibatch_equals_problem_on_the_subset(cls, rng):
    X, y = _digits_subset(300)
    y = y % 2 if cls is P.LogisticRegression else y
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    full = cls(X, y, standardize=False)
    batch = rng.choice(300, size=64, replace=False)
    sub = cls(X[batch], y[batch], standardize=False)
    if cls is not P.LogisticRegression:
        assert sub.n_classes == full.n_classes  # all ten digits appear in the batch
    params = full.parameters(_point(full, rng, 0.1))
    loss = full.loss_and_grad_(params, batch)
    f, g = sub.fun_and_grad(full.x_of(params))
    assert loss == pytest.approx(f, rel=2e-5)
    assert np.linalg.norm(_grads_flat(full, params) - g) <= 2e-5 * np.linalg.norm(g)


def test_batches_are_seeded_epoch_permutations():
    problem = P.SoftmaxRegression(*_digits_subset(100))
    a = problem.batches(30, seed=4)
    b = problem.batches(30, seed=4)
    first = [next(a) for _ in range(4)]
    assert [len(i) for i in first] == [30, 30, 30, 10]
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(100))
    for i in first:
        np.testing.assert_array_equal(i, next(b))
    assert not np.array_equal(next(P.SoftmaxRegression(*_digits_subset(100)).batches(30, 5)),
                              first[0])
    assert next(problem.batches(None)) is None
    assert next(P.Rosenbrock().batches(10)) is None
    with pytest.raises(ValueError, match="batch_size"):
        problem.batches(0)


def test_parameters_round_trip():
    problem = P.MLP(*_digits_subset(100), hidden=3)
    params = problem.parameters()
    assert list(params) == ["W1", "gamma", "beta", "W2", "b2"]
    assert params["W1"].shape == (64, 3) and params["W2"].shape == (3, 10)
    np.testing.assert_array_equal(problem.x_of(params), problem.x0.astype(np.float32))
    problem.set_x(params, np.arange(problem.n, dtype=float))
    np.testing.assert_array_equal(problem.x_of(params), np.arange(problem.n))
    with pytest.raises(ValueError, match="params"):
        P.Rosenbrock(3).loss_and_grad_(params)
    with pytest.raises(TypeError, match="params"):
        problem.loss_and_grad_({"W1": 0})
    with pytest.raises(ValueError, match="x has"):
        problem.fun(np.zeros(problem.n + 1))


def test_bad_batch_is_rejected_before_writing():
    problem = P.SoftmaxRegression(*_digits_subset(50))
    params = problem.parameters()
    params.grads.flat[...] = 7.0
    for bad, match in [([50], "outside"), ([-1], "outside"), ([], "non-empty"),
                       ([[1, 2]], "1-D"), ([0.5], "indices")]:
        with pytest.raises(ValueError, match=match):
            problem.loss_and_grad_(params, np.array(bad))
    np.testing.assert_array_equal(params.grads.flat, 7.0)
    with pytest.raises(ValueError, match="no data"):
        P.Rosenbrock(2).loss_and_grad_(P.Rosenbrock(2).parameters(), [0])


@pytest.mark.parametrize("X, y, err, match", [
    (np.zeros(10), np.zeros(10), ValueError, "X must be 2-D"),
    (np.zeros((10, 2)), np.zeros((10, 1)), ValueError, "y must be 1-D"),
    (np.zeros((10, 2)), np.arange(9) % 2, ValueError, "10 samples but y has 9"),
    (np.full((4, 2), np.nan), np.arange(4) % 2, ValueError, "NaN"),
    (np.full((4, 2), np.inf), np.arange(4) % 2, ValueError, "NaN or infinity"),
    (np.ones((4, 2)), np.array([0, 1, np.nan, 1]), ValueError, "y contains NaN"),
    (np.ones((4, 2)), np.array([0, 1, 0.5, 1]), ValueError, "labels"),
    (np.ones((4, 2)), np.array([0, 1, -1, 1]), ValueError, "labels"),
    (np.ones((4, 2)), np.zeros(4), ValueError, "two classes"),
    (np.array([["a", "b"]] * 4), np.arange(4) % 2, TypeError, "X must be numeric"),
    (np.ones((4, 2)), np.array(["a"] * 4), TypeError, "y must be numeric"),
    (np.ones((0, 2)), np.zeros(0), ValueError, "at least 2 samples"),
])
def test_bad_data_is_rejected(X, y, err, match):
    with pytest.raises(err, match=match):
        P.check_data(X, y)
    for cls in (P.SoftmaxRegression, P.MLP):
        with pytest.raises(err, match=match):
            cls(X, y)


def test_logistic_needs_binary_labels_and_both_arrays():
    X, y = _digits_subset(50)
    with pytest.raises(ValueError, match="labels in 0..1"):
        P.LogisticRegression(X, y)
    with pytest.raises(ValueError, match="both X and y"):
        P.SoftmaxRegression(X, None)
    with pytest.raises(ValueError, match="alpha"):
        P.SoftmaxRegression(X, y, alpha=-1.0)
    with pytest.raises(ValueError, match="unknown problem"):
        P.make_problem("nope")
    with pytest.raises(ValueError, match="takes no data"):
        P.make_problem("rosenbrock", X, y)


def test_classifiers_report_accuracy():
    X, y = _digits_subset(200)
    problem = P.SoftmaxRegression(X, y)
    assert problem.accuracy(problem.x0) == pytest.approx(np.mean(y == 0))
    assert P.Rosenbrock().accuracy(np.zeros(10)) is None
