import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore.kernels import max_norm_


def max_norm_ref(w, c, axis):
    """float64 reference: units whose L2 norm over ``axis`` exceeds c scaled by c/(norm+1e-7)."""
    x = w.astype(np.float64)
    norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
    factor = np.where(norm > c, c / (norm + 1e-7), 1.0)
    return x * factor, norm


# (shape, axis): dense (in, out); torch Linear (out, in); conv (out, in, kh, kw);
# Keras conv (kh, kw, in, out); a vector.
LAYOUTS = [((60, 40), 0), ((40, 60), 1), ((8, 4, 3, 3), (1, 2, 3)), ((3, 3, 4, 8), (0, 1, 2)),
           ((100,), 0), ((5, 7), (0, 1)), ((6, 2, 5), (-2, -1))]


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), c=st.floats(0.05, 20.0), scale=st.floats(0.01, 10.0),
       seed=st.integers(0, 2**32 - 1))
def test_max_norm_matches_float64(layout, c, scale, seed):
    shape, axis = layout
    w = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    want, norm = max_norm_ref(w, c, axis)
    inside = np.broadcast_to(norm < c * (1 - 1e-5), w.shape)
    before = w.copy()
    max_norm_(w, c, axis)
    # The factor is computed in float64 and applied in float32: 1 ulp of the factor plus 1 of
    # the product -> 2.5e-7 relative; units clearly within the bound are untouched bitwise.
    np.testing.assert_allclose(w, want, rtol=2.5e-7, atol=0)
    np.testing.assert_array_equal(w[inside], before[inside])
    new = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axis))
    assert np.all(new <= c * (1 + 1e-6))


@pytest.mark.parametrize("shape, axis, dim", [((50, 30), 0, 1), ((30, 50), 1, 0), ((16, 8, 3, 3), (1, 2, 3), 0)])
def test_max_norm_matches_torch_renorm(rng, shape, axis, dim):
    torch = pytest.importorskip("torch")
    w = (rng.standard_normal(shape) * 2).astype(np.float32)
    want = torch.renorm(torch.from_numpy(w.copy()), 2, dim, 3.0).numpy()
    max_norm_(w, 3.0, axis)
    # torch sums the squares in its own order in float32: a few ulps of the factor.
    np.testing.assert_allclose(w, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape, axis", [((2000, 300), 0), ((300, 2000), 1), ((512, 64, 3, 3), (1, 2, 3))])
def test_max_norm_threads_bitwise(rng, shape, axis):
    w0 = rng.standard_normal(shape).astype(np.float32)
    outs = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        w = w0.copy()
        max_norm_(w, 5.0, axis)
        outs.append(w)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], w0)


def test_max_norm_bad_input_changes_nothing(rng):
    w = (rng.standard_normal((6, 5)) * 5).astype(np.float32)
    w0 = w.copy()
    ro = w.copy()
    ro.flags.writeable = False
    cases = [
        (lambda: max_norm_(w, 0.0), ValueError, "max_value"),
        (lambda: max_norm_(w, -1.0), ValueError, "max_value"),
        (lambda: max_norm_(w, float("nan")), ValueError, "max_value"),
        (lambda: max_norm_(w, float("inf")), ValueError, "max_value"),
        (lambda: max_norm_(w, 1.0, axis=2), ValueError, "out of range"),
        (lambda: max_norm_(w, 1.0, axis=(0, 0)), ValueError, "repeated"),
        (lambda: max_norm_(w, 1.0, axis=1.5), TypeError, "axis"),
        (lambda: max_norm_(np.zeros((2, 3, 4), np.float32), 1.0, axis=1), ValueError, "block"),
        (lambda: max_norm_(w.astype(np.float64), 1.0), TypeError, "float32"),
        (lambda: max_norm_(w.T, 1.0), ValueError, "contiguous"),
        (lambda: max_norm_(ro, 1.0), ValueError, "read-only"),
        (lambda: max_norm_(np.zeros((), np.float32), 1.0), ValueError, "dimension"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
        np.testing.assert_array_equal(w, w0)


def test_max_norm_constraint_via_optimizer(rng):
    params = optcore.Parameters({"w1": (20, 10), "b1": (10,), "k": (4, 3, 2, 2)})
    for n in params:
        params[n] = rng.standard_normal(params[n].shape) * 3
    params.grads.flat[...] = rng.standard_normal(params.grads.flat.size).astype(np.float32)
    ref = optcore.Parameters.from_arrays({n: params[n] for n in params})
    ref.grads.flat[...] = params.grads.flat
    opt = optcore.SGD(params, lr=0.1, constraints={"w1": optcore.MaxNorm(3.0),
                                                   "k": optcore.MaxNorm(1.0, axis=(1, 2, 3))})
    plain = optcore.SGD(ref, lr=0.1)
    opt.step()
    plain.step()
    max_norm_(ref["w1"], 3.0, 0)
    max_norm_(ref["k"], 1.0, (1, 2, 3))
    np.testing.assert_array_equal(params.flat, ref.flat)
    assert np.all(np.linalg.norm(params["w1"], axis=0) <= 3.0 * (1 + 1e-6))


def test_constraints_with_array_pairs_and_errors(rng):
    w = (rng.standard_normal((8, 4)) * 5).astype(np.float32)
    pairs = [(w, np.zeros_like(w)), (np.zeros(3, np.float32), np.zeros(3, np.float32))]
    opt = optcore.Adam(pairs, constraints={0: optcore.MaxNorm(1.0)})
    opt.step()
    assert np.all(np.linalg.norm(w, axis=0) <= 1.0 + 1e-6)
    params = optcore.Parameters({"w1": (4, 3), "b1": (3,)})
    with pytest.raises(ValueError, match="unknown parameter 'w9'"):
        optcore.SGD(params, constraints={"w9": optcore.MaxNorm()})
    with pytest.raises(ValueError, match="out of range"):
        optcore.SGD(params, constraints={"b1": optcore.MaxNorm(axis=1)})
    with pytest.raises(TypeError, match="callable"):
        optcore.SGD(params, constraints={"w1": 3.0})
    with pytest.raises(TypeError, match="dict"):
        optcore.SGD(params, constraints=[optcore.MaxNorm()])
    with pytest.raises(ValueError, match="max_value"):
        optcore.MaxNorm(0.0)
    with pytest.raises(TypeError, match="axis"):
        optcore.MaxNorm(1.0, axis="0")


# -- L1 ---------------------------------------------------------------------------------------

def soft(p, t):
    return np.sign(p) * np.maximum(np.abs(p) - t, 0.0)


@pytest.mark.parametrize("cls, kw", [(optcore.SGD, {}), (optcore.SGD, {"momentum": 0.9}),
                                     (optcore.Adam, {}), (optcore.AdamW, {}), (optcore.RMSProp, {}),
                                     (optcore.AdaGrad, {}), (optcore.AdaMax, {}), (optcore.NAdam, {})])
def test_l1_gives_exact_zeros_on_every_optimizer(rng, cls, kw):
    p = rng.standard_normal(5000).astype(np.float32)
    g = (rng.standard_normal(5000) * 0.01).astype(np.float32)
    opt = cls([(p, g)], lr=0.05, l1=10.0, **kw)
    opt.step()
    # threshold lr * l1 = 0.5: about 38% of standard normal values fall inside it.
    zeros = np.count_nonzero(p == 0.0)
    assert 1000 < zeros < 3000
    assert np.all(np.abs(p[p != 0]) > 0)


def test_l1_sgd_is_prox_of_plain_step(rng):
    p = rng.standard_normal(3000).astype(np.float32)
    g = rng.standard_normal(3000).astype(np.float32)
    q = p.copy()
    optcore.kernels.sgd_(p, g, step=1, lr=0.1, l1=2.0)
    want = soft((q - np.float32(0.1) * g).astype(np.float32), np.float32(0.1 * 2.0))
    # the kernel evaluates the same float32 expressions: |p| - t, then copysign.
    np.testing.assert_array_equal(p, want.astype(np.float32))


@pytest.mark.parametrize("cls, kw", [(optcore.SGD, {"momentum": 0.9, "nesterov": True}),
                                     (optcore.Adam, {"amsgrad": True}), (optcore.AdamW, {}),
                                     (optcore.RMSProp, {"centered": True}), (optcore.AdaGrad, {}),
                                     (optcore.AdaMax, {}), (optcore.NAdam, {})])
def test_l1_is_soft_threshold_after_each_update(rng, cls, kw):
    """Fused l1 == the same optimizer without l1 followed by the float32 soft threshold."""
    n = 70_000  # several chunks and tiles
    p1 = rng.standard_normal(n).astype(np.float32)
    p2 = p1.copy()
    g = np.empty(n, np.float32)
    lr, l1 = 0.01, 3.0
    fused = cls([(p1, g)], lr=lr, l1=l1, **kw)
    plain = cls([(p2, g)], lr=lr, **kw)
    t = np.float32(lr * l1)
    for _ in range(4):
        g[...] = rng.standard_normal(n)
        fused.step()
        plain.step()
        a = np.abs(p2) - t
        p2[...] = np.where(a <= 0, np.float32(0), np.copysign(a, p2))
        # Same float32 operations in the same order: bitwise.
        np.testing.assert_array_equal(p1, p2)
    assert np.count_nonzero(p1 == 0) > 0


def test_l1_bad_value_changes_nothing(rng):
    p = rng.standard_normal(10).astype(np.float32)
    p0 = p.copy()
    with pytest.raises(ValueError, match="l1"):
        optcore.kernels.adam_(p, p0.copy(), np.zeros(10, np.float32), np.zeros(10, np.float32),
                              step=1, l1=-1.0)
    with pytest.raises(ValueError, match="l1"):
        optcore.SGD([(p, p0.copy())], l1=float("nan"))
    np.testing.assert_array_equal(p, p0)
    assert optcore.SGD([(p, p0.copy())]).param_groups[0]["l1"] == 0.0


def test_lasso_matches_sklearn(rng):
    sklearn = pytest.importorskip("sklearn.linear_model")
    n, d, alpha = 200, 40, 0.1
    X = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    w_true[:5] = [3.0, -2.0, 1.5, 1.0, -0.5]
    y = X @ w_true + 0.1 * rng.standard_normal(n)
    ref = sklearn.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X, y).coef_

    def objective(w):
        return 0.5 / n * np.sum((X @ w - y) ** 2) + alpha * np.sum(np.abs(w))

    L = np.linalg.eigvalsh(X.T @ X / n).max()
    w = np.zeros(d, np.float32)
    g = np.zeros(d, np.float32)
    opt = optcore.SGD([(w, g)], lr=1.0 / L, l1=alpha)   # proximal gradient (ISTA)
    values = [objective(w.astype(np.float64))]
    for _ in range(600):
        g[...] = X.T @ (X @ w.astype(np.float64) - y) / n
        opt.step()
        values.append(objective(w.astype(np.float64)))
    values = np.array(values)
    # ISTA with step 1/L decreases the objective monotonically; float32 rounding of w allows
    # ~1e-7 relative wiggle once converged.
    assert np.all(np.diff(values) <= 1e-6 * values[:-1])
    # float32 iterates: the solution agrees to ~1e-5; the support is the same, zeros exact.
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-4)
    assert np.array_equal(w == 0, ref == 0)
    assert np.count_nonzero(w == 0) > d // 2
    assert values[-1] <= objective(ref) * (1 + 1e-6)
