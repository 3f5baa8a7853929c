"""optcore.torch optimizers: checkpoints interchange with torch.optim, structural options."""
import copy
import io

import pytest

torch = pytest.importorskip("torch")

import optcore.torch as ot  # noqa: E402
from torch_helpers import (  # noqa: E402
    assert_models_close, assert_states_close, batches, pair, train,
)

CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1)),
    ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2)),
    ("Adamax", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=1e-2)),
]


def drop_l2(t, model, opt):
    """l2 misses every fourth step: per-parameter step counts differ in the checkpoint."""
    if t % 4 == 3:
        for p in model.l2.parameters():
            p.grad = None


def roundtrip(sd, via_file):
    if not via_file:
        return copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch-to-optcore", "optcore-to-torch"])
@pytest.mark.parametrize("name, kw", CASES, ids=[n for n, _ in CASES])
def test_checkpoint_interchange_mid_training(name, kw, direction):
    """Train 25 steps with one library, load its state_dict into the other, train 25 more:
    equal to torch.optim training all 50 steps itself."""
    ours_first = direction == "optcore-to-torch"
    ma, mb = pair()
    first = getattr(ot if ours_first else torch.optim, name)
    second = getattr(torch.optim if ours_first else ot, name)
    torch_kw = dict(kw, foreach=False)
    oa = first(ma.parameters(), **(kw if ours_first else torch_kw))
    ob = getattr(torch.optim, name)(mb.parameters(), **torch_kw)
    data = batches(50)
    train(ma, oa, data[:25], hook=drop_l2)
    sd = roundtrip(oa.state_dict(), via_file=name in ("Adam", "NAdam"))
    oa2 = second(ma.parameters(), **(torch_kw if ours_first else kw))
    oa2.load_state_dict(sd)
    train(ma, oa2, data[25:], hook=drop_l2, start=25)
    train(mb, ob, data, hook=drop_l2)
    assert_models_close(ma, mb)
    assert_states_close(oa2, ob)


@pytest.mark.parametrize("name, kw", CASES, ids=[n for n, _ in CASES])
def test_load_state_dict_replaces_cached_tables(name, kw):
    """After load_state_dict the state tensors are new objects: the next step must update
    them (not the ones the cached tables pointed at)."""
    ma, mb = pair()
    oa = getattr(ot, name)(ma.parameters(), **kw)
    ob = getattr(torch.optim, name)(mb.parameters(), foreach=False, **kw)
    data = batches(30)
    train(ma, oa, data[:10])
    train(mb, ob, data[:10])
    saved = copy.deepcopy(oa.state_dict())
    params = [p.detach().clone() for p in ma.parameters()]
    train(ma, oa, data[10:20])  # then go back to step 10
    with torch.no_grad():
        for p, q in zip(ma.parameters(), params):
            p.copy_(q)
    oa.load_state_dict(saved)
    train(ma, oa, data[20:30])
    train(mb, ob, data[20:30])
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)


def test_state_of_another_memory_format_is_converted():
    """A checkpoint from a contiguous model loaded into its channels_last copy: the state is
    rewritten in the parameters' memory format (once, at the next step), results as torch."""
    def conv():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))

    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 4, 4, 4, generator=g))
            for _ in range(20)]
    ma, mb = conv(), conv()
    oa = torch.optim.Adam(ma.parameters(), lr=1e-2, foreach=False)
    ob = torch.optim.Adam(mb.parameters(), lr=1e-2, foreach=False)
    train(ma, oa, data[:10])
    train(mb, ob, data)
    ma = ma.to(memory_format=torch.channels_last)
    oc = ot.Adam(ma.parameters(), lr=1e-2)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    train(ma, oc, data[10:])
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert oc.state[ma[0].weight]["exp_avg"].stride() == ma[0].weight.stride()


def test_state_uses_torch_types_and_keys():
    m, _ = pair()
    opt = ot.NAdam(m.parameters())
    train(m, opt, batches(3))
    st = opt.state[m.l1.weight]
    assert sorted(st) == ["exp_avg", "exp_avg_sq", "mu_product", "step"]
    assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and st["step"].item() == 3
    assert st["mu_product"].dtype == torch.float32 and st["mu_product"].dim() == 0
    sgd = ot.SGD(m.parameters(), lr=0.1)
    train(m, sgd, batches(2))
    assert len(sgd.state) == 0  # momentum == 0: torch keeps no state either
    ada = ot.Adagrad(m.parameters(), initial_accumulator_value=0.5)
    st = ada.state[m.unused.weight]  # created at construction, for every parameter
    assert st["step"].item() == 0 and torch.equal(st["sum"], torch.full_like(m.unused.weight, 0.5))


def test_sgd_momentum_switched_on_mid_training():
    """torch starts the buffers (b = g) when momentum becomes nonzero; so does optcore."""
    ma, mb = pair()
    oa, ob = ot.SGD(ma.parameters(), lr=0.05), torch.optim.SGD(mb.parameters(), lr=0.05, foreach=False)
    data = batches(30)
    for o, m in ((oa, ma), (ob, mb)):
        train(m, o, data[:10])
        o.param_groups[0]["momentum"] = 0.9
        train(m, o, data[10:20])
        o.param_groups[0]["momentum"] = 0.0
        train(m, o, data[20:])
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)


@pytest.mark.parametrize("name, key, value, buffer", [
    ("Adam", "amsgrad", True, "max_exp_avg_sq"),
    ("AdamW", "amsgrad", True, "max_exp_avg_sq"),
    ("RMSprop", "centered", True, "grad_avg"),
    ("RMSprop", "momentum", 0.9, "momentum_buffer"),
])
def test_switching_on_a_state_buffer_after_the_first_step_raises(name, key, value, buffer):
    """torch fails with a KeyError here; optcore raises a ValueError naming the buffer,
    before anything is written. Switching it off again keeps working."""
    m, _ = pair()
    opt = getattr(ot, name)(m.parameters())
    train(m, opt, batches(2))
    opt.param_groups[0][key] = value
    m.zero_grad()
    torch.nn.functional.mse_loss(m(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=buffer):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt.param_groups[0][key] = type(value)(0)
    opt.step()


@pytest.mark.parametrize("how", ["assign", "assign-tensor-dict", "replace-all"])
def test_state_replaced_outside_load_state_dict(how):
    """ZeroRedundancyOptimizer.load_state_dict assigns ``optim.state[p] = ...`` directly; a
    user may replace ``opt.state`` as a whole: the next step uses the new tensors."""
    ma, mb = pair()
    oa = ot.NAdam(ma.parameters(), lr=1e-2)
    ob = torch.optim.NAdam(mb.parameters(), lr=1e-2, foreach=False)
    data = batches(30)
    train(ma, oa, data[:10])
    train(mb, ob, data[:10])
    saved = copy.deepcopy({i: oa.state[p] for i, p in enumerate(ma.parameters()) if p in oa.state})
    params = [p.detach().clone() for p in ma.parameters()]
    train(ma, oa, data[10:20])
    with torch.no_grad():
        for p, q in zip(ma.parameters(), params):
            p.copy_(q)
    ps = list(ma.parameters())
    if how == "replace-all":
        fresh = __import__("collections").defaultdict(dict)
        fresh.update({ps[i]: st for i, st in saved.items()})
        oa.state = fresh
    else:
        for i, st in saved.items():
            oa.state[ps[i]] = st if how == "assign" else {k: v.clone() for k, v in st.items()}
    train(ma, oa, data[20:])
    train(mb, ob, data[20:])
    assert_models_close(ma, mb)
    assert_states_close(oa, ob)
