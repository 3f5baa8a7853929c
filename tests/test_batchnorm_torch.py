"""Differential tests of batch normalization against torch.nn.functional.batch_norm."""
import numpy as np
import pytest

from optcore import BatchNorm
from optcore.kernels import (
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = {"NC": (24, 6), "NCHW": (4, 6, 5, 3), "NHWC": (4, 5, 3, 6)}


def to_torch(a, layout, dtype=torch.float64):
    """An optcore-layout array as the NC / NCHW torch tensor (NHWC through channels_last)."""
    t = torch.tensor(a, dtype=dtype)
    if layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
        assert t.is_contiguous(memory_format=torch.channels_last)
    return t


def from_torch(t, layout):
    if layout == "NHWC":
        t = t.permute(0, 2, 3, 1)
    return t.detach().numpy()


def data(layout, rng):
    shape = SHAPES[layout]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2, 6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    return x, dy, gamma, beta


@pytest.mark.parametrize("layout", list(SHAPES))
def test_training_forward_and_backward(layout, rng):
    x, dy, gamma, beta = data(layout, rng)
    # torch in float64 on the same float32 values is the reference
    xt = to_torch(x, layout).requires_grad_()
    gt = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    rmt, rvt = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(to_torch(dy, layout))
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout, running_mean=rm,
                                        running_var=rv, momentum=0.1)
    dx, dg, db = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout)
    # float32 results against float64: a few ulps of O(1)-O(10) values
    np.testing.assert_allclose(y, from_torch(yt, layout), rtol=0, atol=4e-6)
    np.testing.assert_allclose(dx, from_torch(xt.grad, layout), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-6)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_against_torch_float32_saved_statistics(layout, rng):
    """torch's own float32 forward: its saved mean/invstd feed our backward."""
    x, dy, gamma, beta = data(layout, rng)
    xt = to_torch(x, layout, torch.float32)
    out = torch.native_batch_norm(xt, torch.tensor(gamma), torch.tensor(beta), None, None, True,
                                  0.1, 1e-5)
    y, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout)
    np.testing.assert_allclose(y, from_torch(out[0], layout), rtol=0, atol=1e-5)
    np.testing.assert_allclose(mean, out[1].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd, out[2].numpy(), rtol=1e-5)
    dx, _, _ = batchnorm_backward(dy, x, gamma, out[1].numpy(), out[2].numpy(), layout=layout)
    dx2, _, _ = batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout)
    np.testing.assert_allclose(dx, dx2, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_inference_forward_and_backward(layout, rng):
    x, dy, gamma, beta = data(layout, rng)
    rm = rng.standard_normal(6).astype(np.float32)
    rv = rng.uniform(0.5, 2, 6).astype(np.float32)
    xt = to_torch(x, layout).requires_grad_()
    gt = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    yt = F.batch_norm(xt, torch.tensor(rm, dtype=torch.float64),
                      torch.tensor(rv, dtype=torch.float64), gt, bt, training=False, eps=1e-5)
    yt.backward(to_torch(dy, layout))
    y = batchnorm_inference(x, gamma, beta, rm, rv, layout=layout)
    dx, dg, db = batchnorm_inference_backward(dy, x, gamma, rm, rv, layout=layout)
    np.testing.assert_allclose(y, from_torch(yt, layout), rtol=0, atol=5e-6)
    np.testing.assert_allclose(dx, from_torch(xt.grad, layout), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_running_statistics_match_torch_module(layout, momentum, rng):
    ours = BatchNorm(6, layout=layout, momentum=momentum)
    ref = (torch.nn.BatchNorm1d if layout == "NC" else torch.nn.BatchNorm2d)(
        6, momentum=momentum).double()
    gamma = rng.uniform(0.5, 2, 6).astype(np.float32)
    ours.weight[...] = gamma
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(gamma))
    ref.train()
    for step in range(5):
        x, dy, _, _ = data(layout, rng)
        x = x + step
        xt = to_torch(x, layout).requires_grad_()
        yt = ref(xt)
        yt.backward(to_torch(dy, layout))
        y = ours.forward(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, from_torch(yt, layout), rtol=0, atol=4e-6)
        np.testing.assert_allclose(dx, from_torch(xt.grad, layout), rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours.weight_grad, ref.weight.grad.numpy(), rtol=1e-5,
                                   atol=1e-5)
        ref.zero_grad()
    # float32 state updated 5 times vs float64 state
    np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=1e-6)
    assert ours.num_batches_tracked == int(ref.num_batches_tracked)
    ref.eval()
    x, _, _, _ = data(layout, rng)
    np.testing.assert_allclose(ours.forward(x, training=False),
                               from_torch(ref(to_torch(x, layout)), layout), rtol=0, atol=5e-6)
    # state dicts have the same keys and values
    sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        np.testing.assert_allclose(v, sd[k].numpy(), rtol=1e-6, atol=1e-6)


def test_fold_into_matches_torch_fuse(rng):
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    bn = BatchNorm(4, layout="NCHW")
    bn.weight[...] = rng.uniform(0.5, 2, 4)
    bn.bias[...] = rng.standard_normal(4)
    for _ in range(3):
        bn.forward((rng.standard_normal((3, 4, 2, 2)) + 2).astype(np.float32))
    tbn = torch.nn.BatchNorm2d(4).eval()
    tbn.load_state_dict({k: torch.tensor(v) for k, v in bn.state_dict().items()})
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    fused = fuse_conv_bn_eval(conv, tbn)
    w, b = bn.fold_into(conv.weight.detach().numpy(), conv.bias.detach().numpy(), layout="conv")
    np.testing.assert_allclose(w, fused.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-6)
    tbn1 = torch.nn.BatchNorm1d(4).eval()
    tbn1.load_state_dict(tbn.state_dict())
    lin = torch.nn.Linear(5, 4).eval()
    fused = fuse_linear_bn_eval(lin, tbn1)
    w, b = bn.fold_into(lin.weight.detach().numpy(), lin.bias.detach().numpy(), layout="linear")
    np.testing.assert_allclose(w, fused.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, fused.bias.detach().numpy(), rtol=1e-6, atol=1e-6)
