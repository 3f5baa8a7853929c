"""The held-out split of the data problems: stratified, seeded, disjoint; the validation loss
and accuracy against float64 references computed another way (sklearn-free NumPy formulas and
torch's batch norm in inference form)."""
import numpy as np
import pytest
from scipy.special import log_softmax

from optcore import problems as P


def test_split_is_stratified_disjoint_and_covering():
    _, y = P.load_digits()
    train, held = P.stratified_split(y, 0.2, seed=0)
    assert np.array_equal(np.union1d(train, held), np.arange(y.size))
    assert np.intersect1d(train, held).size == 0
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    counts = np.bincount(y)
    # each class contributes round(0.2 m_c) (round half to even): exact, not approximately
    np.testing.assert_array_equal(np.bincount(y[held], minlength=10), np.round(0.2 * counts))
    assert held.size == 359 and train.size == 1438


def test_split_is_reproducible_and_depends_on_the_seed():
    _, y = P.load_digits()
    a = P.stratified_split(y, 0.2, seed=0)
    b = P.stratified_split(y.copy(), 0.2, seed=0)
    c = P.stratified_split(y, 0.2, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    # the same per-class counts for any seed
    np.testing.assert_array_equal(np.bincount(y[a[1]]), np.bincount(y[c[1]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"fraction": 0.0}, "fraction"), ({"fraction": 1.0}, "fraction"),
    ({"fraction": float("nan")}, "fraction"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
])
def test_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.stratified_split(np.arange(10) % 2, **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        P.stratified_split(np.zeros((4, 2)))


def _raw_split():
    X, y = P.load_digits()
    train, held = P.stratified_split(y, 0.2, seed=0)
    mu, sd = X[train].mean(axis=0), X[train].std(axis=0)
    sd[sd == 0] = 1.0
    return (X[train] - mu) / sd, y[train], (X[held] - mu) / sd, y[held]


def test_problems_train_on_the_training_part_standardized_by_its_statistics():
    Xt, yt, Xv, yv = _raw_split()
    for cls in (P.LogisticRegression, P.SoftmaxRegression):
        p = cls(holdout=0.2)
        labels = (yt % 2, yv % 2) if cls is P.LogisticRegression else (yt, yv)
        assert p.n_samples == 1438 and p.n_val == 359
        np.testing.assert_allclose(p.X, Xt, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p.X_val, Xv, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(p.y, labels[0])
        np.testing.assert_array_equal(p.y_val, labels[1])
    assert P.SoftmaxRegression().validation(np.zeros(650)) is None
    assert P.SoftmaxRegression().n_val == 0
    assert P.Rosenbrock(4).validation(np.zeros(4)) is None


def test_validation_of_linear_models_matches_numpy(rng):
    _, _, Xv, yv = _raw_split()
    p = P.SoftmaxRegression(holdout=0.2)
    x = 0.1 * rng.standard_normal(p.n)
    W, b = x[:640].reshape(64, 10), x[640:]
    logp = log_softmax(Xv @ W + b, axis=1)
    loss, acc = p.validation(x)
    # float64 on both sides, the same products in another order: rounding ~1e-15
    assert loss == pytest.approx(-logp[np.arange(yv.size), yv].mean(), rel=1e-12)
    assert acc == np.mean(np.argmax(logp, axis=1) == yv)
    p = P.LogisticRegression(holdout=0.2)
    x = 0.1 * rng.standard_normal(p.n)
    z = Xv @ x[:-1] + x[-1]
    prob = 1 / (1 + np.exp(-z))
    t = yv % 2
    loss, acc = p.validation(x)
    assert loss == pytest.approx(-np.mean(t * np.log(prob) + (1 - t) * np.log1p(-prob)),
                                 rel=1e-10)
    assert acc == np.mean((prob > 0.5) == (t == 1))


def test_mlp_validation_uses_batch_norm_with_training_statistics(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    Xt, _, Xv, yv = _raw_split()
    p = P.MLP(hidden=8, holdout=0.2, seed=3)
    x = p.x0 + 0.1 * rng.standard_normal(p.n)
    s = p._split(x)
    t = {k: torch.tensor(v) for k, v in s.items()}
    Ht = torch.tensor(Xt) @ t["W1"]
    Hv = torch.tensor(Xv) @ t["W1"]
    A = torch.tanh(F.batch_norm(Hv, Ht.mean(0), Ht.var(0, unbiased=False), t["gamma"],
                                t["beta"], training=False, eps=p.eps))
    Z = A @ t["W2"] + t["b2"]
    ref = F.cross_entropy(Z, torch.tensor(yv)).item()
    loss, acc = p.validation(x)
    assert loss == pytest.approx(ref, rel=1e-10)  # float64 on both sides
    assert acc == (Z.argmax(1).numpy() == yv).mean()


def test_user_data_holdout_and_a_class_missing_from_training():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    y = np.arange(50) % 2
    p = P.SoftmaxRegression(X, y, holdout=0.2, split_seed=4)
    tr, held = P.stratified_split(y, 0.2, 4)
    assert p.n_val == held.size == 10 and p.n_samples == tr.size
    # a class of one sample: round(0.2) = 0 go to the held-out set, so it trains
    y2 = np.r_[np.zeros(20, int), np.ones(20, int), [2]]
    assert P.SoftmaxRegression(rng.standard_normal((41, 3)), y2, holdout=0.2).n_classes == 3
    # a class only in the held-out part: the split holds out 3 of 3 at fraction 0.9
    y3 = np.r_[np.zeros(30, int), np.ones(30, int), [2, 2, 2]]
    with pytest.raises(ValueError, match="held-out samples have label 2"):
        P.SoftmaxRegression(rng.standard_normal((63, 3)), y3, holdout=0.9)
