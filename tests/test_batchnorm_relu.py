"""Fused batch norm + ReLU kernels (activation="relu") against float64 NumPy references."""
import numpy as np
import pytest

import optcore
from optcore.kernels import (
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)
from test_batchnorm_kernels import (
    BIG,
    assert_rejected,
    bshape,
    cases,
    make,
    red_axes,
    ref_backward,
    ref_forward,
    ref_inference,
)


@pytest.mark.parametrize("layout,shape", cases())
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_match_float64_reference(layout, shape, affine, rng):
    x, gamma, beta = make(shape, layout, rng)
    if not affine:
        gamma = beta = None
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout, activation="relu")
    y_ref = np.maximum(ref_forward(x, gamma, beta, layout)[0], 0.0)
    # the output is BN's float32 output (a few ulps of O(1) values) clamped at 0
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=4e-6)
    assert (y >= 0).all()
    # the reference masks with the float32 y the kernel produced: the backward's contract
    # (positions where BN's output is within an ulp of 0 could go either way otherwise)
    dx, dg, db = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout,
                                    activation="relu", y=y)
    dy_masked = np.where(y > 0, dy, 0.0).astype(np.float32)
    dx_ref, dg_ref, db_ref = ref_backward(dy_masked, x, gamma, layout)
    # dx: O(1) values from float64 constants and float32 sweeps, as the unfused kernel's tests
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-5)
    if affine:
        # sums of n terms accumulated in float64 from float32 partials: relative ~1e-6
        scale = np.abs(dy).sum(axis=red_axes(layout, x.ndim))
        np.testing.assert_allclose(dg, dg_ref, rtol=0, atol=1e-5 * scale.max())
        np.testing.assert_allclose(db, db_ref, rtol=0, atol=1e-5 * scale.max())
    else:
        assert dg is None and db is None


@pytest.mark.parametrize("layout,shape", cases())
def test_fused_equals_unfused_then_relu(layout, shape, rng):
    """The fused kernels give exactly the unfused results followed by ReLU and its gradient
    (same float32 arithmetic, the clamp and the mask applied in the same sweep)."""
    x, gamma, beta = make(shape, layout, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    y0, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    y1, _, _ = batchnorm_forward(x, gamma, beta, layout=layout, activation="relu")
    assert y1.tobytes() == np.where(y0 > 0, y0, np.float32(0)).tobytes()
    dy_masked = np.where(y1 > 0, dy, np.float32(0))
    dx0, dg0, db0 = batchnorm_backward(dy_masked, x, gamma, mean, invstd, layout=layout)
    dx1, dg1, db1 = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout,
                                       activation="relu", y=y1)
    assert dg1.tobytes() == dg0.tobytes() and db1.tobytes() == db0.tobytes()
    assert dx1.tobytes() == dx0.tobytes()


@pytest.mark.parametrize("layout,shape", cases())
def test_inference_forward_and_backward(layout, shape, rng):
    x, gamma, beta = make(shape, layout, rng)
    C = gamma.size
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y = batchnorm_inference(x, gamma, beta, rm, rv, layout=layout, activation="relu")
    np.testing.assert_allclose(y, np.maximum(ref_inference(x, gamma, beta, rm, rv, layout), 0),
                               rtol=0, atol=1e-5)
    dx, dg, db = batchnorm_inference_backward(dy, x, gamma, rm, rv, layout=layout,
                                              activation="relu", y=y)
    b, ax = bshape(layout, x.ndim), red_axes(layout, x.ndim)
    dym = np.where(y > 0, dy, 0.0)
    r = 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(dx, dym * (gamma * r).reshape(b), rtol=0, atol=1e-5)
    xmu = x.astype(np.float64) - rm.reshape(b)
    np.testing.assert_allclose(dg, (dym * xmu).sum(axis=ax) * r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, dym.sum(axis=ax), rtol=1e-5, atol=1e-5)


def test_nan_output_position_is_clamped_and_masked():
    """y > 0 decides: a NaN from BN becomes 0 in the forward and blocks the gradient."""
    x = np.array([[1.0, 0.0], [np.nan, 1.0], [3.0, 2.0]], np.float32)
    gamma, beta = np.ones(2, np.float32), np.zeros(2, np.float32)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, activation="relu")
    assert (y[:, 0] == 0).all()  # the NaN channel: every output NaN, every one clamped to 0
    assert y[2, 1] > 0 and y[0, 1] == 0
    _, _, db = batchnorm_backward(np.ones_like(x), x, gamma, mean, invstd, activation="relu",
                                  y=y)
    assert db.tolist() == [0.0, 1.0]  # no dy passes in channel 0; one in channel 1


@pytest.mark.parametrize("case", list(BIG))
def test_one_and_two_threads_bitwise_identical(case, rng):
    layout, shape = case.split("-")[0], BIG[case]
    x, gamma, beta = make(shape, layout, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    rm, rv = np.zeros(gamma.size, np.float32), np.ones(gamma.size, np.float32)

    def run():
        y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout, activation="relu")
        out = [y, *batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout,
                                      activation="relu", y=y)]
        yi = batchnorm_inference(x, gamma, beta, rm, rv, layout=layout, activation="relu")
        return out + [yi, *batchnorm_inference_backward(dy, x, gamma, rm, rv, layout=layout,
                                                        activation="relu", y=yi)]

    optcore.set_num_threads(1)
    one = run()
    optcore.set_num_threads(2)
    two = run()
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


def _buffers(rng):
    x, gamma, beta = make((8, 3), "NC", rng)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, activation="relu")
    return dict(x=x, gamma=gamma, beta=beta, y=y, mean=mean, invstd=invstd,
                dy=rng.standard_normal((8, 3)).astype(np.float32),
                out=np.full((8, 3), 7.0, np.float32), dx=np.full((8, 3), 7.0, np.float32),
                dgamma=np.full(3, 7.0, np.float32), dbeta=np.full(3, 7.0, np.float32),
                rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32))


def _bwd(b, **kw):
    args = dict(dx=b["dx"], dgamma=b["dgamma"], dbeta=b["dbeta"], activation="relu", y=b["y"])
    args.update(kw)
    return batchnorm_backward(b["dy"], b["x"], b["gamma"], b["mean"], b["invstd"], **args)


BAD_CALLS = {
    "unknown activation": (ValueError, "activation", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], activation="tanh")),
    "activation not a string": (ValueError, "activation", lambda b: batchnorm_forward(
        b["x"], b["gamma"], b["beta"], out=b["out"], activation=1)),
    "inference unknown activation": (ValueError, "activation", lambda b: batchnorm_inference(
        b["x"], b["gamma"], b["beta"], b["rm"], b["rv"], out=b["out"], activation="gelu")),
    "backward relu without y": (ValueError, "needs y", lambda b: _bwd(b, y=None)),
    "backward y without relu": (ValueError, "only used", lambda b: _bwd(b, activation=None)),
    "backward y wrong shape": (ValueError, "y must have the shape", lambda b: _bwd(
        b, y=b["y"][:4])),
    "backward y float64": (TypeError, "y", lambda b: _bwd(b, y=b["y"].astype(np.float64))),
    "backward y non-contiguous": (ValueError, "C-contiguous", lambda b: _bwd(
        b, y=np.asfortranarray(b["y"]))),
    "backward dx aliases y": (ValueError, "share memory", lambda b: _bwd(b, dx=b["y"])),
    "inference backward relu without y": (ValueError, "needs y",
                                          lambda b: batchnorm_inference_backward(
        b["dy"], b["x"], b["gamma"], b["rm"], b["rv"], dx=b["dx"], dgamma=b["dgamma"],
        dbeta=b["dbeta"], activation="relu")),
    "inference backward dgamma aliases y": (ValueError, "share memory",
                                            lambda b: batchnorm_inference_backward(
        b["dy"], b["x"], b["gamma"], b["rm"], b["rv"], dx=b["dx"], dgamma=b["y"][0],
        dbeta=b["dbeta"], activation="relu", y=b["y"])),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_writes_nothing(case, rng):
    assert_rejected(*BAD_CALLS[case], _buffers(rng))
