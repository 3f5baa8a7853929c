"""optcore.torch optimizers train exactly as torch.optim (foreach=False, the reference loop).

Every class and option, frozen and unused parameters, per-parameter step counts,
add_param_group, schedulers, closures, both zero_grad modes, channels_last, threads.
"""
import copy

import pytest

torch = pytest.importorskip("torch")

import optcore  # noqa: E402
import optcore.torch as ot  # noqa: E402
from torch_helpers import (  # noqa: E402
    Net, assert_close, assert_models_close, assert_states_close, batches, pair, train, wide,
)

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    ("Adagrad", dict(lr=0.05)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-2, weight_decay=1e-2, initial_accumulator_value=0.1)),
    ("Adagrad", dict(lr=0.05, eps=1e-3, maximize=True)),
    ("RMSprop", dict(lr=1e-3)),
    ("RMSprop", dict(lr=1e-3, centered=True)),
    ("RMSprop", dict(lr=1e-3, momentum=0.9, weight_decay=1e-2)),
    ("RMSprop", dict(lr=1e-3, momentum=0.5, centered=True, alpha=0.9, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2, weight_decay=1e-2, betas=(0.7, 0.9), maximize=True)),
    ("NAdam", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2, momentum_decay=1e-2, weight_decay=1e-2)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]


def make(name, model, ours, **kw):
    cls = getattr(ot if ours else torch.optim, name)
    if not ours:
        kw["foreach"] = False
    return cls(model.parameters(), **kw)


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}-{'-'.join(k)}" for n, k in CASES])
def test_trains_like_torch(name, kw):
    ma, mb = pair()
    if kw.get("maximize"):
        ma.sign = mb.sign = -1
    oa, ob = make(name, ma, True, **kw), make(name, mb, False, **kw)
    frozen = [p.detach().clone() for p in ma.frozen.parameters()]
    unused = [p.detach().clone() for p in ma.unused.parameters()]
    data = batches(100)
    train(ma, oa, data)
    train(mb, ob, data)
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
    # frozen and unused parameters: untouched and without state, as in torch
    for p, p0 in zip(list(ma.frozen.parameters()) + list(ma.unused.parameters()), frozen + unused):
        assert torch.equal(p, p0)
        assert not oa.state.get(p) or name == "Adagrad"  # Adagrad creates state up front
    assert len(oa.state) == len(ob.state)
    assert isinstance(oa, torch.optim.Optimizer)
    assert type(oa).__name__ == name


@pytest.mark.parametrize("name, kw", [
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.05)),
    ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("Adamax", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2)),
])
def test_parameters_with_fewer_steps_have_their_own_step_count(name, kw):
    """l2 skips every third step (grad None): its step count, bias correction and NAdam
    momentum product lag behind l1's, as in torch; one kernel call per distinct count."""
    ma, mb = pair()
    oa, ob = make(name, ma, True, **kw), make(name, mb, False, **kw)

    def drop_l2(t, model, opt):
        if t % 3 == 1:
            for p in model.l2.parameters():
                p.grad = None
        if t == 40:  # l1 misses one step too: three distinct counts for a while
            model.l1.bias.grad = None

    data = batches(60)
    train(ma, oa, data, hook=drop_l2)
    train(mb, ob, data, hook=drop_l2)
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
    if name != "SGD":
        steps = {float(oa.state[p]["step"]) for p in ma.parameters() if p.grad is not None}
        assert steps == {60.0, 59.0, 40.0}


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_add_param_group_mid_training(name):
    ma, mb = pair()
    kw = dict(lr=1e-2, momentum=0.9) if name != "Adam" else dict(lr=1e-2)
    oa = getattr(ot, name)(ma.l1.parameters(), **kw)
    ob = getattr(torch.optim, name)(mb.l1.parameters(), foreach=False, **kw)
    data = batches(60)
    train(ma, oa, data[:30])
    train(mb, ob, data[:30])
    oa.add_param_group({"params": ma.l2.parameters(), "lr": 3e-3})
    ob.add_param_group({"params": mb.l2.parameters(), "lr": 3e-3})
    train(ma, oa, data[30:])
    train(mb, ob, data[30:])
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
    assert oa.param_groups[1]["lr"] == 3e-3
    assert oa.param_groups[1].get("momentum") == kw.get("momentum")


def test_per_group_hyperparameters_and_named_parameters():
    ma, mb = pair()
    groups = lambda m: [{"params": m.l1.named_parameters(), "weight_decay": 0.1, "betas": (0.5, 0.9)},
                        {"params": m.l2.named_parameters(), "lr": 1e-3, "amsgrad": True}]
    oa = ot.Adam(groups(ma), lr=1e-2)
    ob = torch.optim.Adam(groups(mb), lr=1e-2, foreach=False)
    data = batches(50)
    train(ma, oa, data)
    train(mb, ob, data)
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
    assert oa.state_dict()["param_groups"][1]["param_names"] == ["weight", "bias"]


@pytest.mark.parametrize("sched", ["step", "onecycle-adam", "onecycle-sgd", "plateau", "tensor-lr"])
def test_schedulers(sched):
    ma, mb = pair()
    if sched == "onecycle-sgd":
        oa = ot.SGD(ma.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        ob = torch.optim.SGD(mb.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=False)
    elif sched == "tensor-lr":
        oa = ot.Adam(ma.parameters(), lr=torch.tensor(0.01))
        ob = torch.optim.Adam(mb.parameters(), lr=torch.tensor(0.01), foreach=False)
    else:
        oa = ot.NAdam(ma.parameters(), lr=0.01) if sched == "onecycle-adam" else ot.Adam(ma.parameters(), lr=0.01)
        ob = (torch.optim.NAdam(mb.parameters(), lr=0.01, foreach=False) if sched == "onecycle-adam"
              else torch.optim.Adam(mb.parameters(), lr=0.01, foreach=False))

    def scheduler(opt):
        if sched == "step":
            s = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        elif sched.startswith("onecycle"):
            s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=100,
                                                    cycle_momentum=True, base_momentum=0.7,
                                                    max_momentum=0.95)
        elif sched == "plateau":
            s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
            return s.step
        else:
            s = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
        return lambda loss: s.step()

    data = batches(100)
    train(ma, oa, data, sched=scheduler(oa))
    train(mb, ob, data, sched=scheduler(ob))
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
    key = "momentum" if sched == "onecycle-sgd" else "betas"
    assert oa.param_groups[0][key] == ob.param_groups[0][key]
    assert float(oa.param_groups[0]["lr"]) == float(ob.param_groups[0]["lr"])
    assert float(ob.param_groups[0]["lr"]) != 0.01  # the schedule did change it


def test_closure_runs_with_grad_enabled_and_returns_the_loss():
    ma, mb = pair()
    oa, ob = ot.RMSprop(ma.parameters(), lr=1e-3), torch.optim.RMSprop(mb.parameters(), lr=1e-3, foreach=False)
    for batch in batches(20):
        for m, o in ((ma, oa), (mb, ob)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(batch[0]), batch[1])
                loss.backward()
                return loss
            with torch.no_grad():
                loss = o.step(closure)
            assert isinstance(loss, torch.Tensor)
    assert_models_close(ma, mb)


def test_zero_grad_to_zero_keeps_gradient_objects():
    """zero_grad(set_to_none=False): the same gradient tensors every step (the cached table
    is reused as is), results as torch."""
    ma, mb = pair()
    oa, ob = ot.Adam(ma.parameters(), lr=1e-2), torch.optim.Adam(mb.parameters(), lr=1e-2, foreach=False)
    for batch in batches(30):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(m(batch[0]), batch[1]).backward()
            o.step()
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)


def test_replaced_storage_is_noticed():
    """p.data = ... and p.grad.data = ... give new storage under the same objects: the next
    step must write and read the new memory."""
    ma, mb = pair()
    oa, ob = ot.Adam(ma.parameters(), lr=1e-2), torch.optim.Adam(mb.parameters(), lr=1e-2, foreach=False)
    data = batches(20)

    def swap(t, model, opt):
        if t in (5, 12):
            model.l1.weight.data = model.l1.weight.data.clone()
        if t in (8, 9):
            g = model.l2.weight.grad
            g.data = g.data.clone()

    for m, o in ((ma, oa), (mb, ob)):
        for t, batch in enumerate(data):
            o.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(m(batch[0]), batch[1]).backward()
            swap(t, m, o)
            o.step()
    assert_models_close(ma, mb)


def test_version_counter_is_bumped():
    """The step writes the parameters behind autograd's back: it bumps their version counters
    as torch's in-place updates do, so a graph saved before the step fails loudly."""
    m = Net()
    opt = ot.SGD(m.parameters(), lr=0.1)
    before = m.l1.weight._version
    train(m, opt, batches(1))
    assert m.l1.weight._version > before


def test_channels_last():
    def conv():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 4, 3))
        return m.to(memory_format=torch.channels_last)

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, 9, 9, generator=g).to(memory_format=torch.channels_last),
             torch.randn(4, 4, 5, 5, generator=g)) for _ in range(40)]
    for name, kw in [("Adam", dict(lr=1e-2)), ("SGD", dict(lr=0.05, momentum=0.9)),
                     ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5))]:
        ma, mb = conv(), conv()
        assert ma[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not ma[0].weight.is_contiguous()
        oa, ob = make(name, ma, True, **kw), make(name, mb, False, **kw)
        train(ma, oa, data)
        train(mb, ob, data)
        assert_models_close(ma, mb)
        assert_states_close(oa, ob)
        for s in oa.state[ma[0].weight].values():
            if s.dim() == 4:
                assert s.stride() == ma[0].weight.stride()


@pytest.mark.parametrize("name", ["Adam", "NAdam", "SGD"])
def test_one_and_two_threads_are_bitwise_equal(name):
    """A 512 x 512 layer, large enough for the kernels to split work across threads; clipping
    by global norm adds the reduction."""
    results = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        m = wide()
        kw = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
        opt = getattr(ot, name)(m.parameters(), clip=optcore.clip.GlobalNorm(0.5), **kw)
        train(m, opt, batches(5))
        results.append(([p.detach().clone() for p in m.parameters()], opt.last_result))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(how):
    """A deep copy or a pickle round trip of (model, optimizer) keeps the clip policy, the
    state and the per-parameter step views, and trains on exactly as the original."""
    import pickle
    m = Net()
    opt = ot.NAdam(m.parameters(), lr=1e-2, clip=optcore.clip.GlobalNorm(1.0), nonfinite="skip")
    data = batches(20)
    train(m, opt, data[:10])
    m2, opt2 = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    assert opt2.clip == opt.clip and opt2.nonfinite == "skip"
    train(m, opt, data[10:])
    train(m2, opt2, data[10:])
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt2.last_result == opt.last_result


def test_signatures_match_torch():
    import inspect
    for name in ot.__all__:
        if not hasattr(torch.optim, name):
            continue
        ours = inspect.signature(getattr(ot, name).__init__).parameters
        theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
        extra = [k for k in ours if k not in theirs]
        assert extra == ["clip", "nonfinite", "state_dtype", "min_8bit_size", "seed", "rounding",
                         "compensation", "model_copy"], name
        for k, p in theirs.items():
            assert ours[k].default == p.default and ours[k].kind == p.kind, (name, k)
        assert ours["clip"].kind is inspect.Parameter.KEYWORD_ONLY
        assert all(ours[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extra)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "Adamax", "NAdam"])
def test_scalar_and_empty_parameters(name):
    """0-d and empty parameters are tensors like the others (torch updates them too)."""
    def params():
        torch.manual_seed(0)
        return [torch.randn((), requires_grad=True), torch.zeros(0, 3, requires_grad=True),
                torch.randn(5, requires_grad=True)]

    pa, pb = params(), params()
    oa = getattr(ot, name)(pa, lr=1e-2)
    ob = getattr(torch.optim, name)(pb, lr=1e-2, foreach=False)
    for t in range(20):
        for ps, o in ((pa, oa), (pb, ob)):
            o.zero_grad()
            (ps[0] ** 2 * ps[2].sum() + ps[1].sum() + (ps[2] ** 3).sum()).backward()
            o.step()
    for a, b in zip(pa, pb):
        assert_close(a.detach(), b.detach())


def test_step_hooks_and_schedulers_see_a_torch_optimizer():
    m = Net()
    opt = ot.Adam(m.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(m, opt, batches(2))
    assert calls == ["pre", "post", "pre", "post"]
    assert opt.last_result.applied and opt.last_result.grad_norm is None


@pytest.mark.parametrize("policy", [None, optcore.clip.Adaptive()])
def test_gradients_are_freed_by_zero_grad(policy):
    """The cached tables keep no reference to a gradient between steps: zero_grad() frees
    them, as with torch.optim (else a second set of gradients would live through backward)."""
    import gc
    import weakref
    m = Net()
    opt = ot.Adam(m.parameters(), clip=policy)
    train(m, opt, batches(2))
    refs = [weakref.ref(p.grad) for p in m.parameters() if p.grad is not None]
    opt.zero_grad()
    gc.collect()
    assert refs and all(r() is None for r in refs)
