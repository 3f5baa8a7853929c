"""Batch-normalization kernels against float64 NumPy references of the documented formulas."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore.kernels import (
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)

LAYOUTS = ("NC", "NCHW", "NHWC")
SHAPES = {  # small shapes per layout; (64, 300) spans several 16-row float32 blocks
    "NC": [(37, 5), (64, 300)],
    "NCHW": [(3, 4, 5, 7), (2, 3, 1, 1), (1, 2, 130, 131)],  # planes > 16384 are segmented
    "NHWC": [(3, 5, 7, 4), (2, 1, 1, 3)],
}


# ---- references (float64, independent of optcore) -----------------------------------------

def channel_axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def bshape(layout, ndim):
    """Shape that broadcasts a per-channel vector against x."""
    s = [1] * ndim
    s[channel_axis(layout, ndim)] = -1
    return tuple(s)


def red_axes(layout, ndim):
    return tuple(a for a in range(ndim) if a != channel_axis(layout, ndim))


def ref_stats(x, layout):
    x = x.astype(np.float64)
    ax = red_axes(layout, x.ndim)
    mean = x.mean(axis=ax)
    var = ((x - mean.reshape(bshape(layout, x.ndim))) ** 2).mean(axis=ax)
    return mean, var


def ref_forward(x, gamma, beta, layout, eps=1e-5):
    mean, var = ref_stats(x, layout)
    b = bshape(layout, x.ndim)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x.astype(np.float64) - mean.reshape(b)) * invstd.reshape(b)
    if gamma is not None:
        y = y * gamma.astype(np.float64).reshape(b)
    if beta is not None:
        y = y + beta.astype(np.float64).reshape(b)
    return y, mean, invstd, var


def ref_backward(dy, x, gamma, layout, eps=1e-5):
    """The analytic gradient written from the chain rule (Ioffe & Szegedy 2015, section 3)."""
    b = bshape(layout, x.ndim)
    ax = red_axes(layout, x.ndim)
    mean, var = ref_stats(x, layout)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x.astype(np.float64) - mean.reshape(b)) * invstd.reshape(b)
    dy = dy.astype(np.float64)
    g = np.ones_like(mean) if gamma is None else gamma.astype(np.float64)
    dxhat = dy * g.reshape(b)
    n = x.size // mean.size
    dvar = (dxhat * (x - mean.reshape(b))).sum(axis=ax) * -0.5 * invstd ** 3
    dmean = -(dxhat * invstd.reshape(b)).sum(axis=ax) + dvar * -2.0 * (
        x - mean.reshape(b)).sum(axis=ax) / n
    dx = dxhat * invstd.reshape(b) + dvar.reshape(b) * 2.0 * (
        x - mean.reshape(b)) / n + dmean.reshape(b) / n
    return dx, (dy * xhat).sum(axis=ax), dy.sum(axis=ax)


def ref_inference(x, gamma, beta, rm, rv, layout, eps=1e-5):
    b = bshape(layout, x.ndim)
    y = (x.astype(np.float64) - rm.reshape(b)) / np.sqrt(rv.astype(np.float64).reshape(b) + eps)
    return y * gamma.reshape(b) + beta.reshape(b)


def make(shape, layout, rng, loc=0.5, scale=2.0):
    C = shape[channel_axis(layout, len(shape))]
    x = (rng.standard_normal(shape) * scale + loc).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    return x, gamma, beta


def cases():
    return [(lay, s) for lay in LAYOUTS for s in SHAPES[lay]]


# ---- forward -----------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", cases())
@pytest.mark.parametrize("affine", [True, False])
def test_forward_matches_float64_reference(layout, shape, affine, rng):
    x, gamma, beta = make(shape, layout, rng)
    if not affine:
        gamma = beta = None
    y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    yr, mr, ir, var = ref_forward(x, gamma, beta, layout)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert mean.dtype == np.float64 and invstd.dtype == np.float64
    # statistics: float64 sums of float32 partials of <= 16 terms -> ~1e-7 relative of std
    np.testing.assert_allclose(mean, mr, rtol=0, atol=1e-6 * np.sqrt(var).max())
    np.testing.assert_allclose(invstd, ir, rtol=1e-6)
    # y is a handful of float32 operations on O(1) values: a few ulps of |y| <= ~10
    np.testing.assert_allclose(y, yr, rtol=0, atol=4e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_small_std_is_normalized_accurately(layout, rng):
    """mean 1e4, std 1e-2: y to 1e-4 of float64, where x * a + b in float32 is off by ~0.1."""
    shape = {"NC": (512, 6), "NCHW": (16, 6, 8, 8), "NHWC": (16, 8, 8, 6)}[layout]
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = batchnorm_forward(x, None, None, layout=layout)
    yr, mr, ir, _ = ref_forward(x, None, None, layout)
    assert np.abs(y - yr).max() < 1e-4
    np.testing.assert_allclose(invstd, ir, rtol=1e-4)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, _, _ = batchnorm_backward(dy, x, None, mean, invstd, layout=layout)
    dxr, _, _ = ref_backward(dy, x, None, layout)
    assert np.abs(dx - dxr).max() < 1e-4 * np.abs(dxr).max()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outlier_shift_takes_second_pass(layout, rng):
    """The first value of each channel (the shift) lies ~1000 std from the mean."""
    shape = {"NC": (512, 3), "NCHW": (16, 3, 8, 8), "NHWC": (16, 8, 8, 3)}[layout]
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    x.reshape(-1)[: 3 if layout != "NCHW" else 1] = 1e4 + 10.0
    if layout == "NCHW":
        x[0, :, 0, 0] = 1e4 + 10.0
    y, _, invstd = batchnorm_forward(x, None, None, layout=layout)
    yr, _, ir, _ = ref_forward(x, None, None, layout)
    assert np.abs(y - yr).max() < 1e-4 * np.abs(yr).max()
    np.testing.assert_allclose(invstd, ir, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_channel_has_zero_variance(layout):
    shape = {"NC": (40, 3), "NCHW": (4, 3, 5, 2), "NHWC": (4, 5, 2, 3)}[layout]
    x = np.full(shape, 3.1, dtype=np.float32)
    beta = np.array([1.0, -2.0, 0.5], np.float32)
    y, mean, invstd = batchnorm_forward(x, np.ones(3, np.float32), beta, layout=layout, eps=1e-3)
    np.testing.assert_array_equal(mean, np.float32(3.1))
    np.testing.assert_array_equal(invstd, 1.0 / np.sqrt(1e-3))
    np.testing.assert_array_equal(y, np.broadcast_to(beta.reshape(bshape(layout, x.ndim)), shape))


@pytest.mark.parametrize("layout,shape", cases())
def test_running_statistics_update(layout, shape, rng):
    x, gamma, beta = make(shape, layout, rng)
    C = gamma.size
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2, C).astype(np.float32)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    batchnorm_forward(x, gamma, beta, layout=layout, running_mean=rm, running_var=rv,
                      momentum=0.3)
    mean, var = ref_stats(x, layout)
    n = x.size // C
    # float64 update rounded once to float32; the variance itself carries ~1e-7 relative error
    # from the float32 partials (invstd is checked to 1e-6 above)
    np.testing.assert_allclose(rm, 0.7 * rm0 + 0.3 * mean, rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(rv, 0.7 * rv0 + 0.3 * var * n / (n - 1), rtol=1e-6)


# ---- inference ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", cases())
def test_inference_matches_reference(layout, shape, rng):
    x, gamma, beta = make(shape, layout, rng)
    C = gamma.size
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2, C).astype(np.float32)
    y = batchnorm_inference(x, gamma, beta, rm, rv, layout=layout)
    # y = x * a + b with a, b rounded to float32: error ~ ulp(|x * a|) + ulp(|b|)
    np.testing.assert_allclose(y, ref_inference(x, gamma, beta, rm, rv, layout), rtol=0, atol=5e-6)
    one = x[:1].copy()  # a batch of one is fine at inference
    batchnorm_inference(one, gamma, beta, rm, rv, layout=layout)


@pytest.mark.parametrize("layout,shape", cases())
def test_inference_backward_matches_reference(layout, shape, rng):
    x, gamma, beta = make(shape, layout, rng)
    C = gamma.size
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2, C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = batchnorm_inference_backward(dy, x, gamma, rm, rv, layout=layout)
    b = bshape(layout, x.ndim)
    inv = 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
    ax = red_axes(layout, x.ndim)
    np.testing.assert_allclose(dx, dy * (gamma * inv).reshape(b), rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(dg, (dy * (x - rm.reshape(b)) * inv.reshape(b)).sum(axis=ax),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=ax), rtol=1e-5, atol=1e-5)
    dx2, dg2, db2 = batchnorm_inference_backward(dy, x, None, rm, rv, layout=layout)
    assert dg2 is None and db2 is None
    np.testing.assert_allclose(dx2, dy * inv.reshape(b), rtol=2e-7, atol=1e-7)


# ---- backward ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", cases())
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_float64_reference(layout, shape, affine, rng):
    x, gamma, beta = make(shape, layout, rng)
    if not affine:
        gamma = None
    dy = rng.standard_normal(shape).astype(np.float32)
    _, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    dx, dg, db = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout)
    dxr, dgr, dbr = ref_backward(dy, x, gamma, layout)
    # dx = dy*k1 - d*k2 - k3 in float32: a few ulps of the largest term (|dy| * gamma * invstd)
    scale = np.abs(dy).max() * (1 if gamma is None else gamma.max()) * invstd.max()
    np.testing.assert_allclose(dx, dxr, rtol=0, atol=2e-6 * scale)
    if affine:
        # float64 sums of float32 products, rounded to float32
        np.testing.assert_allclose(dg, dgr, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(db, dbr, rtol=1e-5, atol=1e-5)
    else:
        assert dg is None and db is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_against_finite_differences(layout, rng):
    """Central differences of L = sum(w * y) through the float64 forward reference."""
    shape = {"NC": (6, 3), "NCHW": (2, 3, 2, 2), "NHWC": (2, 2, 2, 3)}[layout]
    x, gamma, beta = make(shape, layout, rng)
    w = rng.standard_normal(shape)
    x64, g64, b64 = x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)

    def loss(xx, gg, bb):
        return float((w * ref_forward(xx, gg, bb, layout)[0]).sum())

    h = 1e-6
    num_dx = np.zeros(shape)
    for i in np.ndindex(shape):
        e = np.zeros(shape)
        e[i] = h
        num_dx[i] = (loss(x64 + e, g64, b64) - loss(x64 - e, g64, b64)) / (2 * h)
    num_dg = np.array([(loss(x64, g64 + h * e, b64) - loss(x64, g64 - h * e, b64)) / (2 * h)
                       for e in np.eye(gamma.size)])
    num_db = np.array([(loss(x64, g64, b64 + h * e) - loss(x64, g64, b64 - h * e)) / (2 * h)
                       for e in np.eye(gamma.size)])
    _, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    dx, dg, db = batchnorm_backward(w.astype(np.float32), x, gamma, mean, invstd, layout=layout)
    # float32 kernel vs float64 differences (truncation ~1e-10): float32 rounding dominates
    np.testing.assert_allclose(dx, num_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dg, num_dg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, num_db, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_pair_against_its_own_finite_differences(layout, rng):
    """Central differences through the float32 forward kernel itself, on a few coordinates."""
    shape = {"NC": (8, 3), "NCHW": (2, 3, 2, 2), "NHWC": (2, 2, 2, 3)}[layout]
    x, gamma, beta = make(shape, layout, rng)
    w = rng.standard_normal(shape)

    def loss(xx):
        return float((w * batchnorm_forward(xx, gamma, beta, layout=layout)[0]).sum())

    _, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    dx, _, _ = batchnorm_backward(w.astype(np.float32), x, gamma, mean, invstd, layout=layout)
    h = 1e-2  # truncation ~h^2 * |d3L| ~ 1e-4; float32 rounding ~1e-7 * |L| / h ~ 1e-5
    for i in list(np.ndindex(shape))[::3]:
        e = np.zeros(shape, np.float32)
        e[i] = h
        num = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(num - dx[i]) <= 2e-3 * max(1.0, abs(dx[i]))


def test_outputs_written_into_given_arrays(rng):
    params = optcore.Parameters({"w": (3, 5), "bn.weight": (5,), "bn.bias": (5,)})
    params["bn.weight"] = rng.uniform(0.5, 2, 5)
    x, _, _ = make((20, 5), "NC", rng)
    dy = rng.standard_normal((20, 5)).astype(np.float32)
    out = np.empty_like(x)
    y, mean, invstd = batchnorm_forward(x, params["bn.weight"], params["bn.bias"], out=out)
    assert y is out
    dx = np.empty_like(x)
    r = batchnorm_backward(dy, x, params["bn.weight"], mean, invstd, dx=dx,
                           dgamma=params.grads["bn.weight"], dbeta=params.grads["bn.bias"])
    assert r[0] is dx and r[1] is params.grads["bn.weight"] and r[2] is params.grads["bn.bias"]
    np.testing.assert_allclose(params.grads["bn.bias"], dy.sum(axis=0), rtol=1e-5)


def test_backward_accepts_float32_saved_statistics(rng):
    x, gamma, beta = make((30, 4), "NC", rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = batchnorm_forward(x, gamma, beta)
    a = batchnorm_backward(dy, x, gamma, mean, invstd)
    b = batchnorm_backward(dy, x, gamma, mean.astype(np.float32), invstd.astype(np.float32))
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_layouts_agree(rng):
    x, gamma, beta = make((4, 3, 6, 5), "NCHW", rng)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y1, m1, i1 = batchnorm_forward(x, gamma, beta, layout="NCHW")
    y2, m2, i2 = batchnorm_forward(xl, gamma, beta, layout="NHWC")
    y3, m3, i3 = batchnorm_forward(xl.reshape(-1, 3), gamma, beta, layout="NC")
    np.testing.assert_allclose(y1.transpose(0, 2, 3, 1), y2, atol=2e-6)
    np.testing.assert_array_equal(y2.reshape(-1, 3), y3)  # NHWC is the (N*H*W, C) path
    np.testing.assert_allclose(m1, m2, rtol=0, atol=1e-7)  # std 2: partials summed in another order


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), n=st.integers(1, 5), c=st.integers(1, 9),
       h=st.integers(1, 4), w=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_hypothesis_shapes(layout, n, c, h, w, seed, eps):
    rng = np.random.default_rng(seed)
    shape = {"NC": (n * h, c), "NCHW": (n, c, h, w), "NHWC": (n, h, w, c)}[layout]
    if np.prod(shape) // c < 2:
        shape = (2,) + shape[1:]
    x, gamma, beta = make(shape, layout, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, eps=eps, layout=layout)
    yr, _, ir, _ = ref_forward(x, gamma, beta, layout, eps)
    np.testing.assert_allclose(y, yr, rtol=0, atol=4e-6)
    np.testing.assert_allclose(invstd, ir, rtol=1e-6)
    dx, dg, db = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout)
    dxr, dgr, dbr = ref_backward(dy, x, gamma, layout, eps)
    scale = np.abs(dy).max() * gamma.max() * invstd.max()
    np.testing.assert_allclose(dx, dxr, rtol=0, atol=4e-6 * scale)
    np.testing.assert_allclose(dg, dgr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, dbr, rtol=1e-5, atol=1e-5)


# ---- determinism -------------------------------------------------------------------------

BIG = {"NC": (700, 300), "NCHW": (8, 16, 40, 40), "NHWC": (8, 40, 40, 16),  # > 32768 elements
       "NCHW-segments": (1, 3, 130, 130)}  # 3 planes of 16900 elements, cut in 2 segments


def _run_all(layout, x, gamma, beta, dy, rm, rv):
    y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    dx, dg, db = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout)
    yi = batchnorm_inference(x, gamma, beta, rm, rv, layout=layout)
    dxi, dgi, dbi = batchnorm_inference_backward(dy, x, gamma, rm, rv, layout=layout)
    return [y, mean, invstd, dx, dg, db, yi, dxi, dgi, dbi]


@pytest.mark.parametrize("case", list(BIG))
@pytest.mark.parametrize("loc", [0.5, 1e4])  # 1e4 with the outlier shift takes the second pass
def test_one_and_two_threads_bitwise_identical(case, loc, rng):
    layout, shape = case.split("-")[0], BIG[case]
    x, gamma, beta = make(shape, layout, rng, loc=loc, scale=2.0 if loc < 1e3 else 1e-2)
    if loc > 1e3:
        x.reshape(-1)[:16] = loc + 10.0
    dy = rng.standard_normal(shape).astype(np.float32)
    C = gamma.size
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2, C).astype(np.float32)
    optcore.set_num_threads(1)
    one = _run_all(layout, x, gamma, beta, dy, rm, rv)
    optcore.set_num_threads(2)
    two = _run_all(layout, x, gamma, beta, dy, rm, rv)
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


# ---- bad input ---------------------------------------------------------------------------

def _buffers(rng):
    x, gamma, beta = make((8, 3), "NC", rng)
    return dict(
        x=x, gamma=gamma, beta=beta, dy=rng.standard_normal((8, 3)).astype(np.float32),
        out=np.full((8, 3), 7.0, np.float32), dx=np.full((8, 3), 7.0, np.float32),
        dgamma=np.full(3, 7.0, np.float32), dbeta=np.full(3, 7.0, np.float32),
        rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32),
        mean=np.zeros(3), invstd=np.ones(3),
    )


BAD_CALLS = {
    "x float64": (TypeError, "x", lambda b: batchnorm_forward(
        b["x"].astype(np.float64), b["gamma"], b["beta"], out=b["out"])),
    "x not an array": (TypeError, "x", lambda b: batchnorm_forward(
        b["x"].tolist(), b["gamma"], b["beta"], out=b["out"])),
    "x non-contiguous": (ValueError, "C-contiguous", lambda b: batchnorm_forward(
        np.asfortranarray(b["x"]), b["gamma"], b["beta"], out=b["out"])),
    "gamma wrong channels": (ValueError, "gamma", lambda b: batchnorm_forward(
        b["x"], b["gamma"][:2].copy(), b["beta"], out=b["out"])),
    "gamma float64": (TypeError, "gamma", lambda b: batchnorm_forward(
        b["x"], b["gamma"].astype(np.float64), b["beta"], out=b["out"])),
    "batch of one": (ValueError, "more than 1 value", lambda b: batchnorm_forward(
        b["x"][:1], b["gamma"], b["beta"], running_mean=b["rm"], running_var=b["rv"])),
    "eps zero": (ValueError, "eps", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], eps=0.0, out=b["out"])),
    "eps nan": (ValueError, "eps", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], eps=float("nan"), out=b["out"])),
    "momentum > 1": (ValueError, "momentum", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], running_mean=b["rm"], running_var=b["rv"],
        momentum=1.5)),
    "momentum < 0": (ValueError, "momentum", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], running_mean=b["rm"], running_var=b["rv"],
        momentum=-0.1)),
    "out aliases x": (ValueError, "share memory", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["x"])),
    "out read-only": (ValueError, "out", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=np.broadcast_to(b["out"], (8, 3)))),
    "out wrong shape": (ValueError, "out", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"][:4])),
    "bad layout": (ValueError, "layout", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], layout="CHW", out=b["out"])),
    "NCHW on 2-D": (ValueError, "layout", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], layout="NCHW", out=b["out"])),
    "running_mean alone": (ValueError, "together", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], running_mean=b["rm"])),
    "running_var aliases out": (ValueError, "share memory", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], running_mean=b["rm"],
        running_var=b["out"][0])),
    "inference eps": (ValueError, "eps", lambda b: batchnorm_inference(
        b["x"], b["gamma"], b["beta"], b["rm"], b["rv"], eps=-1.0, out=b["out"])),
    "inference out aliases x": (ValueError, "share memory", lambda b: batchnorm_inference(
        b["x"], b["gamma"], b["beta"], b["rm"], b["rv"], out=b["x"])),
    "inference running_var length": (ValueError, "running_var", lambda b: batchnorm_inference(
        b["x"], b["gamma"], b["beta"], b["rm"], b["rv"][:2].copy(), out=b["out"])),
    "backward dy shape": (ValueError, "dy", lambda b: batchnorm_backward(
        b["dy"][:4], b["x"], b["gamma"], b["mean"], b["invstd"], dx=b["dx"],
        dgamma=b["dgamma"], dbeta=b["dbeta"])),
    "backward mean int": (TypeError, "mean", lambda b: batchnorm_backward(
        b["dy"], b["x"], b["gamma"], np.zeros(3, np.int64), b["invstd"], dx=b["dx"],
        dgamma=b["dgamma"], dbeta=b["dbeta"])),
    "backward mean length": (ValueError, "mean", lambda b: batchnorm_backward(
        b["dy"], b["x"], b["gamma"], b["mean"][:2], b["invstd"], dx=b["dx"],
        dgamma=b["dgamma"], dbeta=b["dbeta"])),
    "backward dx aliases dy": (ValueError, "share memory", lambda b: batchnorm_backward(
        b["dy"], b["x"], b["gamma"], b["mean"], b["invstd"], dx=b["dy"],
        dgamma=b["dgamma"], dbeta=b["dbeta"])),
    "backward dgamma aliases dbeta": (ValueError, "share memory", lambda b: batchnorm_backward(
        b["dy"], b["x"], b["gamma"], b["mean"], b["invstd"], dx=b["dx"],
        dgamma=b["dgamma"], dbeta=b["dgamma"])),
    "backward dgamma float64": (TypeError, "dgamma", lambda b: batchnorm_backward(
        b["dy"], b["x"], b["gamma"], b["mean"], b["invstd"], dx=b["dx"],
        dgamma=np.zeros(3), dbeta=b["dbeta"])),
    "backward dgamma without gamma": (ValueError, "gamma", lambda b: batchnorm_backward(
        b["dy"], b["x"], None, b["mean"], b["invstd"], dx=b["dx"], dgamma=b["dgamma"])),
    "inference backward eps": (ValueError, "eps", lambda b: batchnorm_inference_backward(
        b["dy"], b["x"], b["gamma"], b["rm"], b["rv"], eps=0.0, dx=b["dx"],
        dgamma=b["dgamma"], dbeta=b["dbeta"])),
    "inference backward dx aliases x": (ValueError, "share memory",
                                        lambda b: batchnorm_inference_backward(
        b["dy"], b["x"], b["gamma"], b["rm"], b["rv"], dx=b["x"], dgamma=b["dgamma"],
        dbeta=b["dbeta"])),
}


def assert_rejected(exc, match, call, buffers):
    """``call(buffers)`` raises ``exc`` matching ``match`` and changes none of ``buffers``."""
    before = {k: v.copy() for k, v in buffers.items()}
    with pytest.raises(exc, match=match):
        call(buffers)
    for k, v in buffers.items():
        assert v.tobytes() == before[k].tobytes(), f"{k} changed"


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_writes_nothing(case, rng):
    assert_rejected(*BAD_CALLS[case], _buffers(rng))
