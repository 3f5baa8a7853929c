"""The BatchNorm layer: running statistics, Parameters arena, state_dict, folding."""
import io

import numpy as np
import pytest

import optcore
from optcore import BatchNorm


def batch(rng, shape, loc=1.0, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(np.float32)


def chan_axes(layout, ndim):
    return tuple(a for a in range(ndim) if a != (1 if layout == "NCHW" else ndim - 1))


@pytest.mark.parametrize("layout,shape", [("NC", (16, 5)), ("NCHW", (4, 5, 3, 2)),
                                          ("NHWC", (4, 3, 2, 5))])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_statistics_after_several_steps(layout, shape, momentum, rng):
    bn = BatchNorm(5, momentum=momentum, layout=layout)
    rm, rv = np.zeros(5), np.ones(5)
    ax = chan_axes(layout, len(shape))
    for t in range(1, 6):
        x = batch(rng, shape, loc=t)
        bn.forward(x)
        x64 = x.astype(np.float64)
        m = 1.0 / t if momentum is None else momentum
        rm = (1 - m) * rm + m * x64.mean(axis=ax)
        rv = (1 - m) * rv + m * x64.var(axis=ax, ddof=1)
        # float32 state: one rounding per step, errors of ~1e-7 relative accumulate over 5 steps
        np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var, rv, rtol=1e-6)
    assert bn.num_batches_tracked == 5
    x = batch(rng, shape)
    y = bn.forward(x, training=False)
    b = [1] * len(shape)
    b[1 if layout == "NCHW" else -1] = -1
    ref = (x - rm.reshape(b)) / np.sqrt(rv.reshape(b) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
    assert bn.num_batches_tracked == 5  # inference does not count


def test_arena_views_and_gradients(rng):
    shapes = {"w1": (3, 4), **BatchNorm.param_shapes(4, prefix="bn1")}
    assert list(shapes) == ["w1", "bn1.weight", "bn1.bias"]
    params = optcore.Parameters(shapes)
    bn = BatchNorm(4, params=params, prefix="bn1")
    assert np.shares_memory(bn.weight, params.flat) and np.shares_memory(bn.bias_grad,
                                                                         params.grads.flat)
    np.testing.assert_array_equal(params["bn1.weight"], 1.0)
    x = batch(rng, (10, 4))
    dy = rng.standard_normal((10, 4)).astype(np.float32)
    y = bn.forward(x)
    dx = bn.backward(dy)
    xhat = (x - x.mean(0, dtype=np.float64)) / np.sqrt(x.var(0, dtype=np.float64) + 1e-5)
    np.testing.assert_allclose(params.grads["bn1.weight"], (dy * xhat).sum(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(params.grads["bn1.bias"], dy.sum(0, dtype=np.float64), rtol=1e-5)
    assert dx.shape == x.shape and y.shape == x.shape
    # an optimizer over the arena updates the scale and shift with everything else
    opt = optcore.SGD(params, lr=0.1)
    before = params["bn1.bias"].copy()
    opt.step()
    np.testing.assert_allclose(params["bn1.bias"], before - 0.1 * params.grads["bn1.bias"],
                               rtol=1e-6)


def test_arena_errors():
    params = optcore.Parameters({"bn.weight": (4,), "bn.bias": (3,)})
    with pytest.raises(ValueError, match="bn.bias"):
        BatchNorm(4, params=params)
    with pytest.raises(ValueError, match="bn2.weight"):
        BatchNorm(4, params=params, prefix="bn2")
    with pytest.raises(ValueError, match="affine"):
        BatchNorm(4, params=params, affine=False)
    with pytest.raises(TypeError, match="params"):
        BatchNorm(4, params={"bn.weight": np.ones(4, np.float32)})


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=4, eps=0.0), ValueError, "eps"),
    (dict(num_features=4, momentum=1.5), ValueError, "momentum"),
    (dict(num_features=4, momentum=float("nan")), ValueError, "momentum"),
    (dict(num_features=4, layout="NWC"), ValueError, "layout"),
    (dict(num_features=4, affine=1), TypeError, "affine"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchNorm(**kwargs)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        BatchNorm(3).backward(np.zeros((2, 3), np.float32))


def test_failed_forward_changes_nothing(rng):
    bn = BatchNorm(3)
    bn.forward(batch(rng, (8, 3)))
    state = bn.state_dict()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(batch(rng, (1, 3)))
    with pytest.raises(ValueError, match="gamma|channel"):
        bn.forward(batch(rng, (8, 4)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_eval_mode_backward_uses_running_statistics(rng):
    bn = BatchNorm(3)
    for _ in range(3):
        bn.forward(batch(rng, (8, 3)))
    bn.weight[...] = [0.5, 2.0, -1.0]
    x = batch(rng, (6, 3))
    dy = rng.standard_normal((6, 3)).astype(np.float32)
    bn.forward(x, training=False)
    dx = bn.backward(dy)
    inv = 1.0 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    np.testing.assert_allclose(dx, dy * bn.weight * inv, rtol=1e-6)
    np.testing.assert_allclose(bn.weight_grad, (dy * (x - bn.running_mean) * inv).sum(0),
                               rtol=1e-5, atol=1e-6)


def test_without_running_statistics_eval_uses_batch_statistics(rng):
    bn = BatchNorm(3, track_running_stats=False, affine=False)
    x = batch(rng, (9, 3))
    np.testing.assert_array_equal(bn.forward(x, training=False), bn.forward(x, training=True))
    assert bn.running_mean is None and bn.state_dict() == {}
    with pytest.raises(ValueError, match="running"):
        bn.fold_into(np.ones((2, 3), np.float32))


def test_state_dict_round_trip_through_savez(rng):
    bn = BatchNorm(4, layout="NCHW", momentum=0.3)
    bn.weight[...] = rng.uniform(0.5, 2, 4)
    bn.bias[...] = rng.standard_normal(4)
    for _ in range(3):
        bn.forward(batch(rng, (3, 4, 2, 2)))
    buf = io.BytesIO()
    np.savez(buf, **bn.state_dict())
    buf.seek(0)
    loaded = dict(np.load(buf, allow_pickle=False))
    assert set(loaded) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    other = BatchNorm(4, layout="NCHW", momentum=0.3)
    other.load_state_dict(loaded)
    assert other.num_batches_tracked == 3
    x = batch(rng, (2, 4, 3, 3))
    np.testing.assert_array_equal(other.forward(x, training=False), bn.forward(x, training=False))


def test_load_state_dict_checks_before_writing(rng):
    bn = BatchNorm(4)
    bn.forward(batch(rng, (5, 4)))
    state = bn.state_dict()
    before = bn.state_dict()
    bad = dict(state, running_var=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="running_var"):
        bn.load_state_dict(bad)
    bad = dict(state, num_batches_tracked=np.array(-1))
    bad["weight"] = np.full(4, 9.0, np.float32)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.load_state_dict(bad)
    bad = {k: v for k, v in state.items() if k != "bias"}
    with pytest.raises(ValueError, match="bias"):
        bn.load_state_dict(bad)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def _trained_bn(rng, C, layout, shape):
    bn = BatchNorm(C, layout=layout)
    bn.weight[...] = rng.uniform(0.5, 2, C)
    bn.bias[...] = rng.standard_normal(C)
    for _ in range(4):
        bn.forward(batch(rng, shape, loc=3.0))
    return bn


@pytest.mark.parametrize("layout", ["dense", "linear"])
def test_fold_into_dense_layer(layout, rng):
    W = rng.standard_normal((6, 4)).astype(np.float32)  # (in, out)
    b = rng.standard_normal(4).astype(np.float32)
    bn = _trained_bn(rng, 4, "NC", (10, 4))
    x = rng.standard_normal((7, 6)).astype(np.float32)
    expected = bn.forward(np.ascontiguousarray(x @ W + b), training=False)
    if layout == "dense":
        Wf, bf = bn.fold_into(W, b, layout="dense")
        folded = x.astype(np.float64) @ Wf + bf
    else:  # torch nn.Linear convention (out, in), y = x @ W.T + b
        Wf, bf = bn.fold_into(np.ascontiguousarray(W.T), b, layout="linear")
        folded = x.astype(np.float64) @ Wf.T + bf
    assert Wf.dtype == np.float32 and bf.dtype == np.float32
    # two float32 roundings of O(10) values on each side
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)


def conv2d(x, w, b):
    """Reference 'valid' convolution, NCHW input, (out, in, kh, kw) weight, float64."""
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (kh, kw), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64)) + b.reshape(1, -1, 1, 1)


def test_fold_into_conv_layer(rng):
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    bn = _trained_bn(rng, 5, "NCHW", (4, 5, 3, 3))
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    expected = bn.forward(conv2d(x, w, b).astype(np.float32), training=False)
    wf, bf = bn.fold_into(w, b)  # default for 4-D: "conv" (out, in, kh, kw)
    np.testing.assert_allclose(conv2d(x, wf, bf), expected, rtol=1e-5, atol=1e-5)
    wf0, bf0 = bn.fold_into(w, None, layout="conv")
    np.testing.assert_allclose(wf0, wf)
    np.testing.assert_allclose(bf0, bf - (bn.weight / np.sqrt(bn.running_var + bn.eps)) * b,
                               rtol=1e-5, atol=1e-6)


def test_fold_into_errors(rng):
    bn = BatchNorm(4)
    with pytest.raises(ValueError, match="output channels"):
        bn.fold_into(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="layout"):
        bn.fold_into(np.ones((3, 4), np.float32), layout="hwio")
    with pytest.raises(ValueError, match="bias"):
        bn.fold_into(np.ones((3, 4), np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="weight"):
        bn.fold_into(np.ones((3, 4), np.int64))
