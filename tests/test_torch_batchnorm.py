"""optcore.torch batch-norm modules against torch's own modules (run in float64 on the same
float32 values), conversion, fallback, bad input and thread-count determinism."""
import copy

import numpy as np
import pytest

import optcore

torch = pytest.importorskip("torch")
ot = pytest.importorskip("optcore.torch")
nn = torch.nn

C = 6
# name: (optcore class, torch class, shape, how the input is laid out in memory)
LAYOUTS = {
    "NC": (ot.BatchNorm1d, nn.BatchNorm1d, (24, C), "contiguous"),
    "NCL": (ot.BatchNorm1d, nn.BatchNorm1d, (5, C, 7), "contiguous"),
    "NCL-channels-inner": (ot.BatchNorm1d, nn.BatchNorm1d, (5, C, 7), "channels_last"),
    "NCHW": (ot.BatchNorm2d, nn.BatchNorm2d, (4, C, 5, 3), "contiguous"),
    "channels_last": (ot.BatchNorm2d, nn.BatchNorm2d, (4, C, 5, 3), "channels_last"),
}
FUSED = {ot.BatchNorm1d: ot.BatchNormReLU1d, ot.BatchNorm2d: ot.BatchNormReLU2d}
CONFIGS = {  # constructor keywords
    "default": {},
    "momentum-None": {"momentum": None},
    "affine-off": {"affine": False},
    "no-running-stats": {"track_running_stats": False},
    "no-bias": {"bias": False},
}


def lay_out(t, how):
    """``t`` with the memory format ``how``: contiguous, or channels innermost."""
    if how == "contiguous":
        return t.contiguous()
    order = (0, *range(2, t.dim()), 1)
    inverse = tuple(int(i) for i in np.argsort(order))
    return t.permute(order).contiguous().permute(inverse)


def make_pair(name, config, rng, fused=False):
    """An optcore module and a torch module (float64) with the same random parameters."""
    cls, tcls, _, _ = LAYOUTS[name]
    mine = (FUSED[cls] if fused else cls)(C, **CONFIGS[config])
    ref = tcls(C, dtype=torch.float64, **CONFIGS[config])
    with torch.no_grad():
        if mine.weight is not None:
            mine.weight.copy_(torch.tensor(rng.uniform(0.5, 2.0, C), dtype=torch.float32))
        if mine.bias is not None:
            mine.bias.copy_(torch.tensor(rng.standard_normal(C), dtype=torch.float32))
        for p, q in zip(mine.parameters(), ref.parameters()):
            q.copy_(p)
    return mine, ref


def batches(name, rng, steps):
    _, _, shape, how = LAYOUTS[name]
    xs = [lay_out(torch.tensor(rng.standard_normal(shape) * 2 + 0.5 + i, dtype=torch.float32),
                  how) for i in range(steps)]
    dys = [lay_out(torch.tensor(rng.standard_normal(shape), dtype=torch.float32), how)
           for _ in range(steps)]
    return xs, dys


def run(module, xs, dys, fused=False, dtype=None):
    """Forward and backward over the batches; returns what each step produced."""
    out = []
    for x, dy in zip(xs, dys):
        x = (x if dtype is None else x.to(dtype)).detach().requires_grad_()
        for p in module.parameters():
            p.grad = None
        y = module(x)
        if fused and dtype is not None:  # torch's reference: BN then ReLU
            y = torch.relu(y)
        y.backward(dy if dtype is None else dy.to(dtype))
        rec = {"y": y, "dx": x.grad}
        if module.weight is not None:
            rec["dgamma"] = module.weight.grad
        if module.bias is not None:
            rec["dbeta"] = module.bias.grad
        if module.running_mean is not None:
            rec["running_mean"] = module.running_mean.clone()
            rec["running_var"] = module.running_var.clone()
        out.append(rec)
    return out


def assert_matches(mine, ref):
    """float32 results against torch in float64: outputs and gradients are O(1)-O(10) values
    computed from float64 statistics with float32 sweeps (a few ulps, < 1e-6 relative); the
    parameter gradients are sums over the batch (float64 accumulation). 1e-5 relative with
    an absolute floor of 1e-5 times the values' scale (for entries near zero)."""
    assert mine.keys() == ref.keys()
    for k in mine:
        a, b = mine[k].detach().double(), ref[k].detach()
        scale = float(b.abs().max()) + 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=k)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn-relu"])
def test_train_then_eval_matches_torch(name, config, fused, rng):
    mine, ref = make_pair(name, config, rng, fused=fused)
    xs, dys = batches(name, rng, 4)
    # three training steps (the cumulative average of momentum=None needs more than one)
    for a, b in zip(run(mine, xs[:3], dys[:3]), run(ref, xs[:3], dys[:3], fused, torch.float64)):
        assert_matches(a, b)
    if mine.num_batches_tracked is not None:
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    mine.eval()
    ref.eval()
    (a,), (b,) = run(mine, xs[3:], dys[3:]), run(ref, xs[3:], dys[3:], fused, torch.float64)
    assert_matches(a, b)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn-relu"])
def test_runs_on_optcore_kernels_in_the_input_memory_format(name, fused, rng):
    mine, _ = make_pair(name, "default", rng, fused=fused)
    (x,), _ = batches(name, rng, 1)
    x.requires_grad_()
    y = mine(x)
    assert type(y.grad_fn).__name__ == "_BatchNormFunctionBackward"
    assert y.stride() == x.stride()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_inplace_relu_after_the_module(name, rng):
    """The output is a plain tensor (not a view), so an in-place ReLU may follow, as in
    torchvision's ResNets."""
    mine, ref = make_pair(name, "default", rng)
    xs, dys = batches(name, rng, 1)
    mine.forward = lambda x, f=mine.forward: torch.relu_(f(x))
    assert_matches(run(mine, xs, dys)[0], run(ref, xs, dys, True, torch.float64)[0])


def test_gradient_in_another_memory_format(rng):
    """A channels_last input whose incoming gradient is contiguous: converted once, correct."""
    mine, ref = make_pair("channels_last", "default", rng)
    xs, dys = batches("channels_last", rng, 1)
    dys = [dys[0].contiguous()]
    assert_matches(run(mine, xs, dys)[0], run(ref, xs, dys, dtype=torch.float64)[0])
    xs, _ = batches("NCHW", rng, 1)
    dy = torch.ones(1).expand(xs[0].shape)  # stride 0 everywhere: from y.sum().backward()
    mine, ref = make_pair("NCHW", "default", rng)
    assert_matches(run(mine, xs, [dy])[0], run(ref, xs, [dy], dtype=torch.float64)[0])


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # float32 on purpose (see below)
def test_gradcheck_float32_kernels(rng):
    """torch.autograd.gradcheck of the float32 kernels (optcore has no float64 path: a float64
    input falls back to torch). Central differences with step 1e-2 on O(1) inputs and outputs:
    float32 rounding contributes ~1e-7 / 1e-2 = 1e-5 per entry and the truncation error is
    O(step^2 * third derivative) ~ 1e-4 on this well-conditioned case (variance ~ 1); tolerance
    2e-3 absolute and relative, which a wrong term in the gradient (O(1) error) cannot meet."""
    for cls, shape in ((ot.BatchNorm1d, (6, 3)), (ot.BatchNorm2d, (2, 3, 2, 2)),
                       (ot.BatchNormReLU2d, (2, 3, 2, 2))):
        m = cls(3)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([0.7, 1.3, 1.1]))
            m.bias.copy_(torch.tensor([0.5, 0.25, 0.75]))
        x = torch.tensor(rng.standard_normal(shape), dtype=torch.float32, requires_grad=True)
        for mode in ("train", "eval"):
            getattr(m, mode)()

            def fn(x, w, b):  # momentum 0: the running statistics stay put between calls
                return ot.batchnorm._BatchNormFunction.apply(
                    x, w, b, m.running_mean, m.running_var, mode == "train", 0.0, m.eps,
                    cls is ot.BatchNormReLU2d, ot.batchnorm._plan(x))
            assert torch.autograd.gradcheck(fn, (x, m.weight, m.bias), eps=1e-2, atol=2e-3,
                                            rtol=2e-3)


def test_double_backward_raises_a_clear_error(rng):
    m = ot.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


@pytest.mark.parametrize("case", ["float64", "strided", "transposed"])
def test_fallback_to_torch(case, rng):
    """Inputs the kernels do not take go to torch.nn.functional.batch_norm and still match."""
    mine, ref = make_pair("NCHW", "default", rng, fused=True)
    (x,), (dy,) = batches("NCHW", rng, 1)
    if case == "float64":
        mine.double()
        x = x.double()
    elif case == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]  # every other column: not dense
    else:
        mine, ref = make_pair("NC", "default", rng, fused=True)
        (x,), (dy,) = batches("NC", rng, 1)
        x = x.t().contiguous().t()  # (N, C) stored column by column
    xx = x.detach().requires_grad_()
    y = mine(xx)
    assert type(y.grad_fn).__name__ != "_BatchNormFunctionBackward"
    a, b = run(mine, [x], [dy])[0], run(ref, [x], [dy], True, torch.float64)[0]
    for rec in (a, b):  # compare the second step against the second step
        rec.pop("running_mean"), rec.pop("running_var")
    assert_matches(a, b)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None),
                      nn.ReLU(inplace=True)),
        nn.BatchNorm2d(8, affine=False),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_converted_model_same_outputs_and_state_dict(fuse_relu, rng):
    torch.manual_seed(0)
    model = small_cnn()
    model[3].eval()  # a submodule in eval mode keeps it
    x = torch.randn(8, 3, 4, 4)
    model(x)  # some running statistics
    before = copy.deepcopy(model)
    params = list(model.parameters())
    converted = ot.convert_batchnorm(model, "optcore", fuse_relu=fuse_relu)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in before.modules())
    ours = (ot.BatchNorm1d, ot.BatchNorm2d, ot.BatchNormReLU1d, ot.BatchNormReLU2d)
    assert sum(isinstance(m, ours) for m in converted.modules()) == n_bn
    assert sum(type(m) in (ot.BatchNormReLU1d, ot.BatchNormReLU2d)
               for m in converted.modules()) == (3 if fuse_relu else 0)
    assert list(converted.parameters()) == params  # the same Parameter objects
    assert converted[3].training is False and converted[3][1].training is False
    sd0, sd1 = before.state_dict(), converted.state_dict()
    assert list(sd0) == list(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    for mode in ("train", "eval"):
        getattr(before, mode)()
        getattr(converted, mode)()
        torch.testing.assert_close(converted(x), before(x), rtol=1e-5, atol=1e-5)
    for k, v in before.state_dict().items():  # the training step moved both alike
        torch.testing.assert_close(converted.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    back = ot.convert_batchnorm(converted, "torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in before.modules()]
    assert list(back.state_dict()) == list(sd0)


def test_convert_single_module_and_bad_direction():
    bn = nn.BatchNorm2d(4, momentum=None, eps=1e-3).eval()
    mine = ot.convert_batchnorm(bn)
    assert type(mine) is ot.BatchNorm2d and not mine.training
    assert (mine.momentum, mine.eps, mine.weight) == (None, 1e-3, bn.weight)
    assert type(ot.convert_batchnorm(mine, "torch")) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="direction"):
        ot.convert_batchnorm(bn, "jax")
    with pytest.raises(ValueError, match="no single torch module"):
        ot.convert_batchnorm(ot.BatchNormReLU2d(4), "torch")


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


BAD = {  # name: (module, input, torch's exception)
    "wrong channel count": (lambda: ot.BatchNorm2d(C), lambda: torch.randn(4, C + 1, 3, 3),
                            RuntimeError),
    "wrong channel count 1d": (lambda: ot.BatchNormReLU1d(C), lambda: torch.randn(4, C + 1),
                               RuntimeError),
    "batch of one": (lambda: ot.BatchNorm1d(C), lambda: torch.randn(1, C), ValueError),
    "one value per channel": (lambda: ot.BatchNorm2d(C), lambda: torch.randn(1, C, 1, 1),
                              ValueError),
    "3-D input to 2d": (lambda: ot.BatchNorm2d(C), lambda: torch.randn(4, C, 3), ValueError),
    "4-D input to 1d": (lambda: ot.BatchNorm1d(C), lambda: torch.randn(4, C, 3, 3), ValueError),
    "float64 input, float32 module": (lambda: ot.BatchNorm2d(C),
                                      lambda: torch.randn(4, C, 3, 3, dtype=torch.float64),
                                      RuntimeError),
    "int input": (lambda: ot.BatchNorm1d(C), lambda: torch.ones(4, C, dtype=torch.int64),
                  RuntimeError),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bad_input_raises_torch_error_and_changes_no_buffer(case, momentum):
    make_module, make_x, exc = BAD[case]
    m = make_module()
    m.momentum = momentum
    m(torch.randn(4, C, 3, 3) if isinstance(m, (ot.BatchNorm2d, ot.BatchNormReLU2d))
      else torch.randn(4, C))
    before = _state(m)
    with pytest.raises(exc):
        m(make_x())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # torch's module raises the same kind of error
    t = (nn.BatchNorm2d if isinstance(m, (ot.BatchNorm2d, ot.BatchNormReLU2d))
         else nn.BatchNorm1d)(C)
    with pytest.raises(exc):
        t(make_x())


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn-relu"])
def test_one_and_two_threads_bitwise_identical(name, fused):
    cls, _, shape, how = LAYOUTS[name]
    # more than 32768 elements, so that the kernels run on a team of threads
    big = {2: (1500, 48), 3: (64, 48, 81), 4: (64, 48, 9, 9)}[len(shape)]

    def once(threads):
        optcore.set_num_threads(threads)
        r = np.random.default_rng(7)
        m = (FUSED[cls] if fused else cls)(48)
        x = lay_out(torch.tensor(r.standard_normal(big), dtype=torch.float32), how)
        dy = lay_out(torch.tensor(r.standard_normal(big), dtype=torch.float32), how)
        x.requires_grad_()
        y = m(x)
        y.backward(dy)
        m.eval()
        x2 = x.detach().clone().requires_grad_()
        y2 = m(x2)
        y2.backward(dy)
        return [y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, y2,
                x2.grad]

    for a, b in zip(once(1), once(2)):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()
