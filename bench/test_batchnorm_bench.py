"""Batch normalization: optcore beside torch (same layout) and NumPy, per shape, layout and mode.

Run ``pytest bench/test_batchnorm_bench.py``; ``OPTCORE_BENCH_SMOKE=1`` shrinks every shape so
the suite only checks that each benchmark runs. Groups are ``batchnorm-<mode>-<layout>-<shape>``
with one entry per implementation.

``extra_info["bytes"]`` is the memory traffic of the minimal sweeps, per call:
- inference forward: read x, write y (8 bytes per element): the "copy" pattern;
- training forward: read x for the statistics, then read x and write y (12 bytes): the
  "triad" pattern (same traffic as a STREAM triad);
- forward + backward: the forward's 12, then read dy and x for the sums (8) and read dy, x and
  write dx (12): 32 bytes, also reported against the "triad" pattern (two reads per write).
"""
import os

import numpy as np
import pytest

import optcore
from optcore.kernels import batchnorm_backward, batchnorm_forward, batchnorm_inference

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")

if SMOKE:
    SHAPES_2D = [(16, 64), (64, 32)]
    SHAPES_4D = [(2, 8, 6, 6), (4, 16, 3, 3)]
else:
    SHAPES_2D = [(256, 1024), (4096, 1024)]
    SHAPES_4D = [(32, 64, 56, 56), (128, 256, 14, 14)]  # (N, C, H, W)

CASES = [("NC", s) for s in SHAPES_2D] + [(lay, s) for s in SHAPES_4D for lay in ("NCHW", "NHWC")]
MODES = {"inference": (8, "copy"), "forward": (12, "triad"), "forward_backward": (32, "triad")}
IMPLS = ["optcore", "numpy", "torch"]


def _ids(case):
    layout, shape = case
    return f"{layout}-{'x'.join(map(str, shape))}"


def make_inputs(layout, shape):
    """x and dy in the layout (NHWC: (N, H, W, C)), with per-channel vectors."""
    rng = np.random.default_rng(0)
    C = shape[1]
    arr_shape = (shape[0], shape[2], shape[3], C) if layout == "NHWC" else shape
    x = rng.standard_normal(arr_shape, dtype=np.float32)
    dy = rng.standard_normal(arr_shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    rm = rng.standard_normal(C).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32)
    return x, dy, gamma, beta, rm, rv


def optcore_fn(mode, layout, x, dy, gamma, beta, rm, rv):
    y = np.empty_like(x)
    dx = np.empty_like(x)
    dg = np.empty_like(gamma)
    db = np.empty_like(beta)
    if mode == "inference":
        return lambda: batchnorm_inference(x, gamma, beta, rm, rv, layout=layout, out=y)
    if mode == "forward":
        return lambda: batchnorm_forward(x, gamma, beta, layout=layout, out=y)

    def step():
        _, mean, invstd = batchnorm_forward(x, gamma, beta, layout=layout, out=y)
        batchnorm_backward(dy, x, gamma, mean, invstd, layout=layout, dx=dx, dgamma=dg, dbeta=db)
    return step


def numpy_fn(mode, layout, x, dy, gamma, beta, rm, rv, eps=1e-5):
    """The textbook NumPy implementation (float32 arithmetic, as a NumPy user writes it)."""
    axes = (0, 2, 3) if layout == "NCHW" else tuple(range(x.ndim - 1))
    bshape = (1, -1, 1, 1) if layout == "NCHW" else (-1,)
    g, b = gamma.reshape(bshape), beta.reshape(bshape)
    y = np.empty_like(x)
    if mode == "inference":
        a = (gamma / np.sqrt(rv + eps)).reshape(bshape)
        c = beta.reshape(bshape) - rm.reshape(bshape) * a

        def infer():
            np.multiply(x, a, out=y)
            np.add(y, c, out=y)
        return infer

    def forward():
        mean = x.mean(axis=axes, keepdims=True)
        xmu = x - mean
        invstd = 1.0 / np.sqrt((xmu * xmu).mean(axis=axes, keepdims=True) + eps)
        xhat = xmu * invstd
        np.multiply(xhat, g, out=y)
        np.add(y, b, out=y)
        return xhat, invstd

    if mode == "forward":
        return forward

    def step():
        xhat, invstd = forward()
        dbeta = dy.sum(axis=axes, keepdims=True)
        dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
        n = x.size // gamma.size
        return g * invstd * (dy - dbeta / n - xhat * dgamma / n)
    return step


def torch_fn(mode, layout, x, dy, gamma, beta, rm, rv):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    torch.set_num_threads(optcore.get_num_threads())
    perm = (lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)) if layout == "NHWC" else torch.from_numpy
    xt, dyt = perm(x), perm(dy)  # NHWC arrays become channels_last NCHW tensors, no copy
    w, b = torch.from_numpy(gamma), torch.from_numpy(beta)
    rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
    if mode == "inference":
        def infer():
            with torch.no_grad():
                return F.batch_norm(xt, rmt, rvt, w, b, training=False)
        return infer
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return F.batch_norm(xt, None, None, w, b, training=True)
        return forward
    xr = xt.detach().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()

    def step():
        xr.grad = wr.grad = br.grad = None
        F.batch_norm(xr, None, None, wr, br, training=True).backward(dyt)
    return step


BUILDERS = {"optcore": optcore_fn, "numpy": numpy_fn, "torch": torch_fn}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_batchnorm(benchmark, case, mode, impl):
    layout, shape = case
    inputs = make_inputs(layout, shape)
    fn = BUILDERS[impl](mode, layout, *inputs)
    per_elem, pattern = MODES[mode]
    elements = int(np.prod(shape))
    benchmark.group = f"batchnorm-{mode}-{_ids(case)}"
    benchmark.extra_info.update({
        "elements": elements,
        "bytes": per_elem * elements,
        "pattern": pattern,
        "threads": optcore.get_num_threads(),
        "isa": optcore.config()["isa"],
    })
    benchmark(fn)
