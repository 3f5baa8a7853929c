import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore import schedules as S

# Closed-form values are float64 expressions of the same formula: exact up to a few ulps.
REL = 1e-12


def close(a, b, rel=REL):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


# -- closed-form tables, computed by hand -------------------------------------------------

TABLES = [
    (S.Constant(0.3), [(0, 0.3), (1000, 0.3)]),
    (S.PowerDecay(0.1, 10), [(0, 0.1), (10, 0.05), (30, 0.025), (5, 0.1 / 1.5)]),
    (S.PowerDecay(0.1, 10, power=2.0), [(10, 0.025), (20, 0.1 / 9)]),
    (S.ExponentialDecay(1.0, 10), [(0, 1.0), (5, 0.31622776601683794), (10, 0.1), (20, 0.01)]),
    (S.ExponentialDecay(2.0, 10, 0.5, staircase=True), [(9, 2.0), (10, 1.0), (19, 1.0), (20, 0.5)]),
    (S.PiecewiseConstant([5, 15], [1.0, 0.5, 0.1]),
     [(0, 1.0), (4, 1.0), (5, 0.5), (14, 0.5), (15, 0.1), (100, 0.1)]),
    (S.OneCycle(1.0, 10), [(0, 0.04), (1, 0.52), (2, 1.0), (9, 4e-6),
                           (5.5, 4e-6 + (1.0 - 4e-6) / 2)]),
    (S.OneCycle(1.0, 10, anneal_strategy="linear"), [(1, 0.52), (4, 1.0 + (4e-6 - 1.0) * 2 / 7)]),
    (S.LinearWarmup(1.0, 4), [(0, 0.0), (1, 0.25), (4, 1.0), (10, 1.0)]),
    (S.LinearWarmup(1.0, 4, start_lr=0.2), [(0, 0.2), (2, 0.6)]),
    (S.CosineDecay(1.0, 10, min_lr=0.1, warmup_steps=5),
     [(0, 0.0), (1, 0.2), (5, 1.0), (10, 0.55), (15, 0.1), (100, 0.1)]),
    (S.SGDR(1.0, 10, t_mult=2), [(0, 1.0), (5, 0.5), (10, 1.0), (20, 0.5), (30, 1.0), (50, 0.5)]),
    (S.SGDR(1.0, 10, cycle_decay=0.5, min_lr=0.0), [(5, 0.5), (10, 0.5), (15, 0.25), (20, 0.25)]),
    (S.SGDR(1.0, 10, warmup_steps=2), [(1, 0.5), (2, 1.0), (7, 0.5), (12, 1.0)]),
    (S.join([S.LinearWarmup(1.0, 5), S.ExponentialDecay(1.0, 10)], [5]),
     [(3, 0.6), (5, 1.0), (15, 0.1), (25, 0.01)]),
]


@pytest.mark.parametrize("sched, table", TABLES, ids=lambda x: repr(x)[:40])
def test_closed_form_table(sched, table):
    for t, want in table:
        assert close(sched(t), want), (t, sched(t), want)


def test_onecycle_momentum_table():
    s = S.OneCycle(1.0, 10)
    assert close(s.momentum(0), 0.95) and close(s.momentum(2), 0.85) and close(s.momentum(9), 0.95)
    assert close(s.momentum(1), 0.9)
    assert S.OneCycle(1.0, 10, cycle_momentum=False).momentum(3) is None
    three = S.OneCycle(1.0, 10, three_phase=True)  # phases end at 2, 4, 9
    assert close(three(4), 0.04) and close(three.momentum(4), 0.95) and close(three(9), 4e-6)


def test_plateau_table():
    s = S.ReduceLROnPlateau(0.1, patience=2)
    lrs = [s.step(m) for m in [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]]
    assert lrs[:3] == [0.1] * 3 and close(lrs[3], 0.01)   # 3 bad evaluations > patience 2
    assert close(lrs[4], 0.01) and close(lrs[7], 0.001)
    assert s(12345) == s.lr
    s = S.ReduceLROnPlateau(1.0, mode="max", patience=0, cooldown=1, factor=0.5, min_lr=0.3)
    lrs = [s.step(m) for m in [1.0, 0.0, 0.0, 0.0, 0.0]]
    # bad -> halve; cooldown swallows the next bad one; then halve again, floored at min_lr
    assert lrs == [1.0, 0.5, 0.5, 0.3, 0.3]


def test_join_shifts_step_and_routes_momentum():
    oc = S.OneCycle(1.0, 10)
    j = S.join([S.Constant(0.5), oc], [3])
    assert j(0) == 0.5 and close(j(3), oc(0)) and close(j(8), oc(5))
    assert j.momentum(0) is None and close(j.momentum(5), oc.momentum(2))
    assert j.cycles_momentum


def test_pickle_and_state_dict():
    for sched, table in TABLES:
        clone = pickle.loads(pickle.dumps(sched))
        assert [clone(t) for t, _ in table] == [sched(t) for t, _ in table]
        assert sched.state_dict() == {}
    s = S.ReduceLROnPlateau(1.0, patience=1)
    for m in [3.0, 3.0, 3.0, 2.0]:
        s.step(m)
    r = S.ReduceLROnPlateau(1.0, patience=1)
    r.load_state_dict(s.state_dict())
    assert [r.step(m) for m in [2.5, 2.5, 2.5]] == [s.step(m) for m in [2.5, 2.5, 2.5]]
    r2 = pickle.loads(pickle.dumps(s))
    assert r2.lr == s.lr and r2.best == s.best


# -- bad arguments ------------------------------------------------------------------------

BAD = [
    (lambda: S.PowerDecay(-0.1, 10), ValueError, "initial_lr"),
    (lambda: S.PowerDecay(0.1, 0), ValueError, "decay_steps"),
    (lambda: S.PowerDecay(0.1, 10, power=float("nan")), ValueError, "power"),
    (lambda: S.ExponentialDecay(0.1, 10, decay_rate=1.5), ValueError, "decay_rate"),
    (lambda: S.ExponentialDecay(0.1, 10, decay_rate=-0.1), ValueError, "decay_rate"),
    (lambda: S.ExponentialDecay(0.1, -1), ValueError, "decay_steps"),
    (lambda: S.ExponentialDecay(0.1, 10, staircase=1), TypeError, "staircase"),
    (lambda: S.PiecewiseConstant([], [0.1]), ValueError, "boundaries"),
    (lambda: S.PiecewiseConstant([5, 5], [1, 2, 3]), ValueError, "increasing"),
    (lambda: S.PiecewiseConstant([5, 3], [1, 2, 3]), ValueError, "increasing"),
    (lambda: S.PiecewiseConstant([-1], [1, 2]), ValueError, "boundaries"),
    (lambda: S.PiecewiseConstant([5], [1.0]), ValueError, "values"),
    (lambda: S.PiecewiseConstant([5], [1.0, -2.0]), ValueError, "values"),
    (lambda: S.ReduceLROnPlateau(0.1, mode="lowest"), ValueError, "mode"),
    (lambda: S.ReduceLROnPlateau(0.1, factor=1.0), ValueError, "factor"),
    (lambda: S.ReduceLROnPlateau(0.1, patience=-1), ValueError, "patience"),
    (lambda: S.ReduceLROnPlateau(0.1, threshold_mode="x"), ValueError, "threshold_mode"),
    (lambda: S.ReduceLROnPlateau(0.1, cooldown=1.5), TypeError, "cooldown"),
    (lambda: S.OneCycle(1.0, 0), ValueError, "total_steps"),
    (lambda: S.OneCycle(1.0, 10, pct_start=1.5), ValueError, "pct_start"),
    (lambda: S.OneCycle(1.0, 10, anneal_strategy="exp"), ValueError, "anneal_strategy"),
    (lambda: S.OneCycle(1.0, 10, base_momentum=1.0), ValueError, "base_momentum"),
    (lambda: S.OneCycle(1.0, 10, div_factor=0), ValueError, "div_factor"),
    (lambda: S.LinearWarmup(1.0, -5), ValueError, "warmup_steps"),
    (lambda: S.CosineDecay(1.0, 0), ValueError, "decay_steps"),
    (lambda: S.CosineDecay(1.0, 10, warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: S.SGDR(1.0, 10, t_mult=0), ValueError, "t_mult"),
    (lambda: S.SGDR(1.0, 10, cycle_decay=0.0), ValueError, "cycle_decay"),
    (lambda: S.join([], []), ValueError, "schedules"),
    (lambda: S.join([S.Constant(1.0)], [3]), ValueError, "boundaries"),
    (lambda: S.join([S.Constant(1.0), S.Constant(2.0)], []), ValueError, "boundaries"),
    (lambda: S.join([S.Constant(1.0), lambda t: 1.0], [3]), TypeError, "schedules"),
    (lambda: S.join([S.Constant(1.0), S.ReduceLROnPlateau(1.0)], [3]), TypeError, "ReduceLROnPlateau"),
]


@pytest.mark.parametrize("make, exc, word", BAD)
def test_bad_arguments_raise_at_construction(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_bad_steps():
    s = S.PowerDecay(0.1, 10)
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(ValueError, match="step"):
        s(float("nan"))
    with pytest.raises(TypeError, match="step"):
        s("3")
    with pytest.raises(ValueError, match="total_steps"):
        S.OneCycle(1.0, 10)(11)
    with pytest.raises(TypeError, match="metric"):
        S.ReduceLROnPlateau(1.0).step(None)


# -- attached to an optimizer -------------------------------------------------------------

def _pair(n=8):
    return [(np.zeros(n, np.float32), np.ones(n, np.float32))]


def test_attached_schedule_sets_lr_and_matches_explicit_lr():
    sched = S.join([S.LinearWarmup(0.1, 3), S.CosineDecay(0.1, 7)], [3])
    a, b = _pair(), _pair()
    oa, ob = optcore.SGD(a, momentum=0.9), optcore.SGD(b, momentum=0.9)
    oa.schedule = sched
    for t in range(12):
        oa.step()
        ob.step(lr=sched(t))
        assert oa.param_groups[0]["lr"] == sched(t)
    np.testing.assert_array_equal(a[0][0], b[0][0])


def test_attached_onecycle_cycles_momentum_and_beta1():
    s = S.OneCycle(1.0, 20)
    sgd = optcore.SGD(_pair(), momentum=0.9)
    adam = optcore.Adam(_pair())
    sgd.schedule = s
    adam.schedule = s
    for t in range(20):
        sgd.step()
        adam.step()
        assert sgd.param_groups[0]["momentum"] == s.momentum(t)
        assert adam.param_groups[0]["betas"] == (s.momentum(t), 0.999)
    joined = optcore.SGD(_pair(), momentum=0.5)
    joined.schedule = S.join([S.Constant(0.1), s], [3])
    for t in range(6):
        joined.step()
        assert joined.param_groups[0]["momentum"] == (0.5 if t < 3 else s.momentum(t - 3))
    with pytest.raises(ValueError, match="momentum"):
        optcore.SGD(_pair()).schedule = s            # momentum 0: no buffer to cycle
    with pytest.raises(ValueError, match="momentum"):
        optcore.AdaGrad(_pair()).schedule = s
    with pytest.raises(TypeError, match="schedule"):
        optcore.SGD(_pair()).schedule = 0.1


# -- against torch.optim.lr_scheduler -----------------------------------------------------

def _torch_lrs(make_sched, steps, optim="sgd", momentum=0.9, lr=1.0):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    if optim == "sgd":
        opt = torch.optim.SGD([p], lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam([p], lr=lr)
    sched = make_sched(opt)
    lrs, moms = [], []
    for _ in range(steps):
        g = opt.param_groups[0]
        lrs.append(g["lr"])
        moms.append(g["momentum"] if "momentum" in g else g["betas"][0])
        opt.step()
        sched.step()
    return lrs, moms


# torch's schedulers are recursive (chainable) for most classes: float64 drift of a few ulps
# per step, so 1e-9 relative over a few hundred steps.
TORCH_REL = 1e-9


def _match(ours, theirs):
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert math.isclose(a, b, rel_tol=TORCH_REL, abs_tol=1e-15), (t, a, b)


def test_torch_exponential_and_step():
    L = pytest.importorskip("torch.optim.lr_scheduler")
    _match([S.ExponentialDecay(1.0, 1, 0.95)(t) for t in range(200)],
           _torch_lrs(lambda o: L.ExponentialLR(o, 0.95), 200)[0])
    _match([S.ExponentialDecay(1.0, 7, 0.5, staircase=True)(t) for t in range(60)],
           _torch_lrs(lambda o: L.StepLR(o, 7, 0.5), 60)[0])


def test_torch_multistep():
    L = pytest.importorskip("torch.optim.lr_scheduler")
    ours = S.PiecewiseConstant([3, 10, 11], [1.0, 0.1, 0.01, 0.001])
    _match([ours(t) for t in range(20)], _torch_lrs(lambda o: L.MultiStepLR(o, [3, 10, 11], 0.1), 20)[0])


def test_torch_linear_warmup():
    L = pytest.importorskip("torch.optim.lr_scheduler")
    ours = S.LinearWarmup(2.0, 10, start_lr=0.5)
    _match([ours(t) for t in range(30)],
           _torch_lrs(lambda o: L.LinearLR(o, 0.25, 1.0, 10), 30, lr=2.0)[0])


def test_torch_cosine_annealing():
    L = pytest.importorskip("torch.optim.lr_scheduler")
    ours = S.CosineDecay(1.0, 50, min_lr=0.01)
    _match([ours(t) for t in range(51)], _torch_lrs(lambda o: L.CosineAnnealingLR(o, 50, 0.01), 51)[0])


@pytest.mark.parametrize("t0, mult", [(10, 1), (5, 2), (3, 3)])
def test_torch_sgdr(t0, mult):
    L = pytest.importorskip("torch.optim.lr_scheduler")
    ours = S.SGDR(1.0, t0, t_mult=mult, min_lr=0.05)
    _match([ours(t) for t in range(100)],
           _torch_lrs(lambda o: L.CosineAnnealingWarmRestarts(o, t0, mult, 0.05), 100)[0])


@settings(max_examples=25, deadline=None)
@given(total=st.integers(5, 300), pct=st.floats(0.05, 0.6), strategy=st.sampled_from(["cos", "linear"]),
       three=st.booleans(), div=st.floats(2.0, 50.0), final=st.floats(2.0, 1e5),
       optim=st.sampled_from(["sgd", "adam"]))
def test_torch_onecycle(total, pct, strategy, three, div, final, optim):
    L = pytest.importorskip("torch.optim.lr_scheduler")
    if three and 2 * pct * total - 2 <= pct * total - 1:
        return  # torch divides by zero on a degenerate middle phase
    if pct * total - 1 <= 0:
        return
    ours = S.OneCycle(0.7, total, pct_start=pct, anneal_strategy=strategy, div_factor=div,
                      final_div_factor=final, three_phase=three)
    lrs, moms = _torch_lrs(
        lambda o: L.OneCycleLR(o, 0.7, total_steps=total, pct_start=pct, anneal_strategy=strategy,
                               div_factor=div, final_div_factor=final, three_phase=three),
        total, optim=optim)
    _match([ours(t) for t in range(total)], lrs)
    _match([ours.momentum(t) for t in range(total)], moms)


@settings(max_examples=25, deadline=None)
@given(metrics=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=60),
       mode=st.sampled_from(["min", "max"]), tmode=st.sampled_from(["rel", "abs"]),
       patience=st.integers(0, 4), cooldown=st.integers(0, 3), threshold=st.floats(0.0, 0.2))
def test_torch_reduce_on_plateau(metrics, mode, tmode, patience, cooldown, threshold):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, threshold=threshold, threshold_mode=tmode,
        cooldown=cooldown, min_lr=0.01)
    ours = S.ReduceLROnPlateau(1.0, mode=mode, factor=0.5, patience=patience, threshold=threshold,
                               threshold_mode=tmode, cooldown=cooldown, min_lr=0.01)
    for m in metrics:
        opt.step()
        theirs.step(m)
        assert ours.step(m) == opt.param_groups[0]["lr"]


def test_attached_plateau_follows_metric():
    plateau = S.ReduceLROnPlateau(0.5, patience=0)
    opt = optcore.SGD(_pair())
    opt.schedule = plateau
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.5
    plateau.step(1.0)
    plateau.step(2.0)          # worse, more than patience=0 bad evaluations: lr * 0.1
    opt.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.05)
