"""optcore.torch optimizers: clipping fused into the step, nonfinite, torch.amp.GradScaler."""
import math

import pytest

torch = pytest.importorskip("torch")

import optcore  # noqa: E402
import optcore.torch as ot  # noqa: E402
from optcore.clip import Adaptive, GlobalNorm, PerTensorNorm, Value  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_models_close, assert_states_close, assert_unchanged, batches, loss_of, pair,
    snapshot, train, wide,
)


def clip_reference(policy, params):
    """The policy applied to the ``.grad`` of ``params`` with torch operations, in float64
    for the factors (the documented formulas of optcore.clip); returns (norm, factor)."""
    params = [p for p in params if p.grad is not None]
    if isinstance(policy, GlobalNorm):
        norm = torch.nn.utils.clip_grad_norm_(params, policy.max_norm, policy.norm_type,
                                              foreach=False).item()
        return norm, min(1.0, policy.max_norm / (norm + 1e-6))
    if isinstance(policy, Value):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        torch.nn.utils.clip_grad_value_(params, policy.limit)
        return norm, 1.0
    if isinstance(policy, PerTensorNorm):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], policy.norm_type).item()
        smallest = 1.0
        for p in params:
            f = policy.max_norm / (torch.linalg.vector_norm(p.grad.double(), policy.norm_type).item() + 1e-6)
            if f < 1.0:
                p.grad.mul_(f)
                smallest = min(smallest, f)
        return norm, smallest
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    smallest = 1.0
    for p in params:  # Adaptive: rows along dim 0 are the units
        w = p.detach().double().reshape(p.shape[0], -1) if p.dim() >= 2 else p.detach().double().reshape(1, -1)
        g = p.grad.double().reshape(w.shape)
        max_norm = policy.clipping * w.norm(dim=1).clamp_min(policy.eps)
        gn = g.norm(dim=1)
        f = torch.where(gn > max_norm, max_norm / gn.clamp_min(1e-6), torch.ones_like(gn))
        smallest = min(smallest, f.min().item())
        p.grad.copy_((g * f[:, None]).reshape(p.shape).float())
    return norm, smallest


POLICIES = [GlobalNorm(0.5), GlobalNorm(0.3, norm_type=math.inf), PerTensorNorm(0.2),
            PerTensorNorm(0.1, norm_type=math.inf), Value(0.02), Adaptive(0.05, 1e-3)]


@pytest.mark.parametrize("name", ["Adam", "SGD", "NAdam"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_fused_clip_equals_clipping_then_step(policy, name):
    ma, mb = pair()
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    oa = getattr(ot, name)(ma.parameters(), clip=policy, **kw)
    ob = getattr(torch.optim, name)(mb.parameters(), foreach=False, **kw)
    results = []

    def clip_b(t, model, opt):
        results.append(clip_reference(policy, model.parameters()))

    data = batches(40)
    grads = []

    def keep(t, model, opt):
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])

    for t, batch in enumerate(data):
        ma.zero_grad()
        loss_of(ma, batch).backward()
        keep(t, ma, oa)
        oa.step()
        # the gradient buffers are read, never rewritten
        assert all(torch.equal(p.grad, g) for p, g in
                   zip([p for p in ma.parameters() if p.grad is not None], grads[-1]))
        r = oa.last_result
        train(mb, ob, [batch], hook=clip_b)
        norm, factor = results[-1]
        assert r.applied and not r.skipped and r.loss_scale is None
        if isinstance(policy, Value):  # no norm pass: no norm reported
            assert r.grad_norm is None
        else:
            assert r.grad_norm == pytest.approx(norm, rel=1e-5)
        assert r.clip_factor == pytest.approx(factor, rel=1e-5)
    if not isinstance(policy, Value):
        assert min(f for _, f in results) < 0.5  # clipping was active
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)


def test_global_norm_spans_all_groups():
    ma, mb = pair()
    oa = ot.Adam([{"params": ma.l1.parameters()}, {"params": ma.l2.parameters(), "lr": 1e-3}],
                 lr=1e-2, clip=GlobalNorm(0.3))
    ob = torch.optim.Adam([{"params": mb.l1.parameters()}, {"params": mb.l2.parameters(), "lr": 1e-3}],
                          lr=1e-2, foreach=False)
    data = batches(30)
    train(ma, oa, data)
    train(mb, ob, data, hook=lambda t, m, o: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3))
    assert_models_close(ma, mb)


def inject(bad_steps, value=math.nan):
    def hook(t, model, opt):
        if t in bad_steps:
            model.l2.weight.grad[0, 0] = value
    return hook


def test_nonfinite_skip_leaves_everything_unchanged():
    ma, mb = pair()
    oa = ot.Adam(ma.parameters(), lr=1e-2, nonfinite="skip")
    ob = torch.optim.Adam(mb.parameters(), lr=1e-2, foreach=False)
    data = batches(30)
    bad = {0, 7, 8, 20}
    for t, batch in enumerate(data):
        ma.zero_grad()
        loss_of(ma, batch).backward()
        inject(bad, math.inf if t == 8 else math.nan)(t, ma, oa)
        before = snapshot(ma, oa)
        oa.step()
        if t in bad:
            assert oa.last_result.skipped and not oa.last_result.applied
            if t > 0:  # the first step created the state (zeros) only
                assert_unchanged(before, ma, oa)
        else:
            train(mb, ob, [batch])
    assert oa.skipped_steps == len(bad)
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)


def test_nonfinite_raise_names_the_tensor_and_changes_nothing():
    m, _ = pair()
    opt = ot.RMSprop([{"params": m.l1.parameters()}, {"params": m.l2.parameters()}],
                     nonfinite="raise")
    train(m, opt, batches(3))
    m.zero_grad()
    loss_of(m, batches(1)[0]).backward()
    m.l2.bias.grad[1] = math.inf
    before = snapshot(m, opt)
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\] param 1"):
        opt.step()
    assert_unchanged(before, m, opt)


def test_nonfinite_propagate_is_torch_behaviour():
    ma, mb = pair()
    oa = ot.SGD(ma.parameters(), lr=0.05)
    ob = torch.optim.SGD(mb.parameters(), lr=0.05, foreach=False)
    data = batches(3)
    train(ma, oa, data, hook=inject({1}))
    train(mb, ob, data, hook=inject({1}))
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a.isnan(), b.isnan())
    assert oa.last_result.grad_norm is None and oa.last_result.applied


def scaler_run(model, opt, data, bad, *, clip_torch=None):
    """A torch.amp loop on CPU; returns the scale after every update. ``clip_torch`` clips
    after ``scaler.unscale_`` (the torch recipe)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scales = []
    for t, batch in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        inject(bad, math.inf)(t, model, opt)
        if clip_torch is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_torch)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("fused", [True, False], ids=["torch-fused", "torch-unfused"])
@pytest.mark.parametrize("name, kw", [("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, amsgrad=True)),
                                      ("SGD", dict(lr=0.05, momentum=0.9))])
def test_grad_scaler_sequence_equals_torch(name, kw, fused):
    """GradScaler hands its scale and overflow flag to the optimizer (fused unscale) and
    skips overflowing steps: same scales, parameters, state and step counters as torch's
    fused optimizer driven by the same scaler (and as torch's unfused one, which the scaler
    unscales in place and does not call on overflow)."""
    ma, mb = pair()
    oa = getattr(ot, name)(ma.parameters(), **kw)
    ob = getattr(torch.optim, name)(mb.parameters(), **kw, **({"fused": True} if fused else {"foreach": False}))
    assert oa._step_supports_amp_scaling
    data = batches(30)
    # torch's fused SGD leaves its momentum buffers uninitialised (torch.empty_like) when the
    # very first step overflows, so that case is compared with the unfused reference only
    bad = {4, 5, 13} | ({0} if name != "SGD" or not fused else set())
    sa = scaler_run(ma, oa, data, bad)
    sb = scaler_run(mb, ob, data, bad)
    assert sa == sb and len(set(sa)) > 2
    assert_models_close(ma, mb)
    if fused:  # (torch's unfused optimizers create no state on a skipped first step)
        assert_states_close(oa, ob)
    assert oa.skipped_steps == len(bad)
    assert oa.last_result.loss_scale == sa[-2]  # the scale this step's gradients carried
    assert not hasattr(oa, "grad_scale") and not hasattr(oa, "found_inf")


def test_grad_scaler_with_fused_clip_equals_unscale_then_clip():
    ma, mb = pair()
    oa = ot.Adam(ma.parameters(), lr=1e-2, clip=GlobalNorm(0.5))
    ob = torch.optim.Adam(mb.parameters(), lr=1e-2, fused=True)
    data = batches(30)
    bad = {3, 9}
    sa = scaler_run(ma, oa, data, bad)
    sb = scaler_run(mb, ob, data, bad, clip_torch=0.5)
    assert sa == sb
    assert_models_close(ma, mb)
    assert oa.last_result.clip_factor < 1.0  # the norm was computed on unscaled gradients


def test_grad_scaler_with_user_unscale():
    """scaler.unscale_(opt) before the step (to clip by hand): the optimizer then gets no
    grad_scale and must not unscale again."""
    ma, mb = pair()
    oa = ot.Adam(ma.parameters(), lr=1e-2)
    ob = torch.optim.Adam(mb.parameters(), lr=1e-2, fused=True)
    data = batches(20)
    sa = scaler_run(ma, oa, data, {2}, clip_torch=1.0)
    sb = scaler_run(mb, ob, data, {2}, clip_torch=1.0)
    assert sa == sb
    assert_models_close(ma, mb)


def test_threads_do_not_change_fused_results():
    out = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        m = wide()
        opt = ot.Adam(m.parameters(), lr=1e-2, clip=PerTensorNorm(0.1))
        train(m, opt, batches(4))
        out.append([p.detach().clone() for p in m.parameters()] + [opt.last_result])
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(*out))
