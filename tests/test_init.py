import math

import numpy as np
import pytest

import optcore
from optcore import init

# (function, distribution, default gain, default fan mode)
INITS = [
    (init.glorot_uniform_, "uniform", 1.0, "fan_avg"),
    (init.glorot_normal_, "normal", 1.0, "fan_avg"),
    (init.he_uniform_, "uniform", math.sqrt(2.0), "fan_in"),
    (init.he_normal_, "normal", math.sqrt(2.0), "fan_in"),
    (init.lecun_uniform_, "uniform", 1.0, "fan_in"),
    (init.lecun_normal_, "normal", 1.0, "fan_in"),
]


def expected_var(shape, gain, mode):
    """Independent reference: fans from the documented shape conventions."""
    if len(shape) == 2:
        fi, fo = shape[0], shape[1]                     # dense (in, out)
    else:
        r = int(np.prod(shape[2:]))                     # conv (out, in, *kernel)
        fi, fo = shape[1] * r, shape[0] * r
    n = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
    return gain**2 / n


@pytest.mark.parametrize("fn, dist, gain, mode", INITS, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("shape", [(300, 500), (64, 32, 3, 3)])
def test_sample_variance_matches_formula(fn, dist, gain, mode, shape):
    w = np.empty(shape, np.float32)
    out = fn(w, rng=7)
    assert out is w
    var = expected_var(shape, gain, mode)
    n = w.size
    # Sample variance of n draws has relative standard deviation sqrt((kurtosis - 1) / n):
    # kurtosis 3 (normal) or 9/5 (uniform). Allow 5 standard deviations.
    kurt = 3.0 if dist == "normal" else 1.8
    tol = 5 * math.sqrt((kurt - 1) / n)
    x = w.astype(np.float64)
    assert abs(np.mean(x**2) / var - 1) < tol
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    if dist == "uniform":
        b = math.sqrt(3 * var)
        assert x.min() >= -b * (1 + 1e-6) and x.max() <= b * (1 + 1e-6)
        assert x.min() < -0.99 * b and x.max() > 0.99 * b


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
def test_modes_and_gain(mode):
    w = np.empty((200, 800), np.float32)
    init.variance_scaling_(w, gain=3.0, mode=mode, distribution="normal", rng=1)
    var = expected_var(w.shape, 3.0, mode)
    assert abs(np.mean(w.astype(np.float64) ** 2) / var - 1) < 5 * math.sqrt(2 / w.size)


def test_fans():
    assert init.fans((7,)) == (7, 7)
    assert init.fans((3, 5)) == (3, 5)
    assert init.fans((16, 8, 3, 3)) == (72, 144)
    assert init.fans((16, 8, 5)) == (40, 80)
    with pytest.raises(ValueError, match="scalar"):
        init.fans(())


def test_calculate_gain_matches_torch():
    torch = pytest.importorskip("torch")
    for name in ["linear", "conv2d", "sigmoid", "tanh", "relu", "selu"]:
        assert init.calculate_gain(name) == pytest.approx(torch.nn.init.calculate_gain(name), rel=1e-15)
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu", 0.2), rel=1e-15)
    with pytest.raises(ValueError, match="nonlinearity"):
        init.calculate_gain("swishy")


def test_rng_reproducible_and_writes_into_views():
    params = optcore.Parameters({"w1": (30, 20), "b1": (20,), "w2": (20, 4)})
    params.flat[...] = 5.0
    init.he_normal_(params["w1"], rng=123)
    init.glorot_uniform_(params["w2"], rng=np.random.default_rng(9))
    np.testing.assert_array_equal(params["b1"], 5.0)        # neighbours untouched
    w = np.empty((30, 20), np.float32)
    init.he_normal_(w, rng=123)
    np.testing.assert_array_equal(w, params["w1"])           # same seed, same values
    v = np.empty((20, 4), np.float32)
    init.glorot_uniform_(v, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(v, params["w2"])
    a, b = np.empty(100, np.float32), np.empty(100, np.float32)
    init.lecun_normal_(a, rng=1)
    init.lecun_normal_(b, rng=2)
    assert not np.array_equal(a, b)
    assert init.kaiming_normal_ is init.he_normal_ and init.xavier_uniform_ is init.glorot_uniform_


@pytest.mark.parametrize("target, exc, word", [
    (np.zeros((4, 4)), TypeError, "float32"),
    (np.zeros((4, 8), np.float32)[:, ::2], ValueError, "contiguous"),
    ([[0.0]], TypeError, "ndarray"),
])
def test_bad_targets_raise_and_change_nothing(target, exc, word):
    before = np.array(target, copy=True)
    with pytest.raises(exc, match=word):
        init.he_normal_(target, rng=0)
    np.testing.assert_array_equal(np.asarray(target), before)


def test_bad_arguments_raise_before_writing():
    w = np.full((4, 4), 3.0, np.float32)
    ro = np.zeros((4, 4), np.float32)
    ro.flags.writeable = False
    cases = [
        (lambda: init.he_normal_(w, mode="fan_max"), ValueError, "mode"),
        (lambda: init.he_normal_(w, gain=-1.0), ValueError, "gain"),
        (lambda: init.he_normal_(w, gain=float("nan")), ValueError, "gain"),
        (lambda: init.variance_scaling_(w, distribution="cauchy"), ValueError, "distribution"),
        (lambda: init.he_normal_(w, rng="seed"), TypeError, "rng"),
        (lambda: init.he_normal_(np.zeros((), np.float32)), ValueError, "scalar"),
        (lambda: init.he_normal_(ro), ValueError, "read-only"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
        np.testing.assert_array_equal(w, 3.0)
