"""The optimizer classes: inputs (Parameters, pairs, group dicts, ``groups=``), per-group
hyper-parameters, step counting and lr changes, zero_grad, state_of, state_dict round trips
through ``np.savez`` and load errors, and convergence on a parabola and on Rosenbrock."""
import copy
import io

import numpy as np
import pytest

import optcore
from optcore import kernels

import reference as R
from test_kernels import assert_step, reference_with_sensitivity


CLASSES = ["SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaMax", "NAdam"]
# hyper-parameters that switch on every state buffer and scalar of each class
FULL = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "AdaGrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    "RMSProp": dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=0.01, amsgrad=True),
    "AdaMax": dict(lr=0.01, weight_decay=0.01),
    "NAdam": dict(lr=0.01, weight_decay=0.01, momentum_decay=0.01),
}
SHAPES = {"w1": (8, 5), "b1": (5,), "w2": (5, 40000), "b2": (1,)}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    p = optcore.Parameters(SHAPES)
    for n in p:
        p[n] = rng.standard_normal(p[n].shape)
    return p


def fill_grads(grads, rng):
    for g in grads:
        g[...] = rng.standard_normal(g.shape)


def kernel_step(cls, arrays, grads, state, t, h, scalars):
    """What one step of class ``cls`` must do, written with optcore.kernels."""
    h = dict(h)
    if cls == "SGD":
        kernels.sgd_(arrays, grads, state.get("momentum_buffer"), step=t, **h)
    elif cls == "AdaGrad":
        h.pop("initial_accumulator_value", None)
        kernels.adagrad_(arrays, grads, state["sum"], step=t, **h)
    elif cls == "RMSProp":
        kernels.rmsprop_(arrays, grads, **state, **h)
    elif cls in ("Adam", "AdamW"):
        b1, b2 = h.pop("betas", (0.9, 0.999))
        h.pop("amsgrad", None)
        if cls == "AdamW":
            h.setdefault("weight_decay", 1e-2)
            h["decoupled"] = True
        kernels.adam_(arrays, grads, **state, step=t, beta1=b1, beta2=b2, **h)
    elif cls == "AdaMax":
        b1, b2 = h.pop("betas", (0.9, 0.999))
        kernels.adamax_(arrays, grads, **state, step=t, beta1=b1, beta2=b2, **h)
    else:
        b1, b2 = h.pop("betas", (0.9, 0.999))
        scalars["mu"] = kernels.nadam_(arrays, grads, **state, step=t, beta1=b1, beta2=b2,
                                       mu_product=scalars.get("mu", 1.0), **h)


def fresh_state(cls, shapes, h):
    rule = {"SGD": "sgd", "AdaGrad": "adagrad", "RMSProp": "rmsprop", "Adam": "adam",
            "AdamW": "adam", "AdaMax": "adamax", "NAdam": "nadam"}[cls]
    out = {}
    for s in shapes:
        for k, v in R.initial_state(rule, s, **h).items():
            out.setdefault(k, []).append(v.astype(np.float32))
    return out


@pytest.mark.parametrize("cls", CLASSES)
def test_parameters_input_equals_kernel_calls(cls):
    """A class over a Parameters arena is bitwise the sequence of kernel calls."""
    params = make_params()
    copies = [params[n].copy() for n in params]
    opt = getattr(optcore, cls)(params, **FULL[cls])
    state = fresh_state(cls, [a.shape for a in copies], FULL[cls])
    scalars = {}
    rng = np.random.default_rng(1)
    for t in range(1, 6):
        fill_grads([params.grads[n] for n in params], rng)
        grads = [params.grads[n].copy() for n in params]
        opt.step()
        kernel_step(cls, copies, grads, state, t, FULL[cls], scalars)
    for i, n in enumerate(params):
        np.testing.assert_array_equal(params[n], copies[i])
        for s, v in opt.state_of(n).items():
            np.testing.assert_array_equal(v, state[s][i])
    assert opt.state_steps == [5]


@pytest.mark.parametrize("cls", CLASSES)
def test_pairs_input_matches_reference(cls):
    """A list of (param, grad) pairs, updated in place without copies, checked step by step
    against the float64 reference (same tolerance as tests/test_kernels.py: 4 eps of the
    buffer's magnitude plus the reference's sensitivity to 2-eps input perturbations)."""
    rng = np.random.default_rng(2)
    shapes = [(3, 4), (17,), (1,)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gs = [np.zeros(s, np.float32) for s in shapes]
    opt = getattr(optcore, cls)(list(zip(ps, gs)), **FULL[cls])
    h = dict(getattr(optcore, cls).rule.defaults, **FULL[cls])
    rule = opt.rule.name if opt.rule.name != "adamw" else "adam"
    # l1 (0 here) is optcore's extension, tested in tests/test_regularization.py
    ref_h = {k: v for k, v in h.items() if k not in ("betas", "decoupled_weight_decay", "l1")}
    if "betas" in h:
        ref_h["beta1"], ref_h["beta2"] = h["betas"]
    if rule in ("adam", "nadam"):
        ref_h["decoupled"] = h["decoupled_weight_decay"]
    state = [R.initial_state(rule, s, **ref_h) for s in shapes]
    mu = 1.0
    for t in range(1, 8):
        fill_grads(gs, rng)
        before = [p.copy() for p in ps]
        expected = [reference_with_sensitivity(rule, p, g, s, step=t, h=ref_h, mu_product=mu,
                                               grad_scale=1.0)
                    for p, g, s in zip(ps, gs, state)]
        opt.step()
        for i, ((ep, es, _), extra) in enumerate(expected):
            assert_step(f"step {t} param {i}", ps[i], ep, before[i], 4, extra["param"])
            new = opt.state_of(i)
            assert set(new) == set(es)
            for k in es:
                assert_step(f"step {t} {k} {i}", new[k], es[k], state[i][k], 4, extra[k])
            state[i] = {k: v.astype(np.float64) for k, v in new.items()}
        mu = expected[0][0][2]


@pytest.mark.parametrize("cls", CLASSES)
def test_numpy_scalar_hyper_parameters_are_float64(cls):
    """Regression: hyper-parameters given as NumPy float32 scalars made the step scalars
    (bias corrections, NAdam's schedule) float32 under NumPy 2's promotion rules, changing
    the update by up to 1%. They must give bitwise the same as the equal Python floats."""
    h = dict(FULL[cls])
    if "betas" in getattr(optcore, cls).rule.defaults:
        h["betas"] = (0.9, 0.999)
    as_np = {k: (np.float32(v) if isinstance(v, float) else
                 tuple(np.float32(x) for x in v) if isinstance(v, tuple) else np.bool_(v))
             for k, v in h.items()}
    as_py = {k: (float(v) if not isinstance(v, tuple) else tuple(float(x) for x in v))
             if not isinstance(v, np.bool_) else bool(v) for k, v in as_np.items()}
    out = []
    for hyper in (as_np, as_py):
        rng = np.random.default_rng(0)
        p, g = np.ones(100, np.float32), np.zeros(100, np.float32)
        opt = getattr(optcore, cls)([(p, g)], **hyper)
        for _ in range(5):
            g[...] = rng.standard_normal(100) * 1e-3
            opt.step()
        out.append(p)
    np.testing.assert_array_equal(out[0], out[1])


def test_group_dicts_with_their_own_hyper_parameters():
    rng = np.random.default_rng(3)
    a = [(rng.standard_normal(10).astype(np.float32), rng.standard_normal(10).astype(np.float32))
         for _ in range(2)]
    b = [(rng.standard_normal((2, 3)).astype(np.float32),
          rng.standard_normal((2, 3)).astype(np.float32))]
    a0 = [p.copy() for p, _ in a]
    b0 = [p.copy() for p, _ in b]
    opt = optcore.Adam([{"params": a}, {"params": b, "lr": 0.1, "betas": (0.5, 0.9),
                                        "weight_decay": 0.2}], lr=0.01)
    assert [len(pg["params"]) for pg in opt.param_groups] == [2, 1]
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[0]["lr"] == 0.01
    opt.step()
    ma, va = [np.zeros(10, np.float32) for _ in a], [np.zeros(10, np.float32) for _ in a]
    kernels.adam_(a0, [g for _, g in a], ma, va, step=1, lr=0.01)
    mb, vb = [np.zeros((2, 3), np.float32)], [np.zeros((2, 3), np.float32)]
    kernels.adam_(b0, [g for _, g in b], mb, vb, step=1, lr=0.1, beta1=0.5, beta2=0.9,
                  weight_decay=0.2)
    for (p, _), q in zip(a + b, a0 + b0):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state_of(0, group=1)["exp_avg"], mb[0])


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW", "NAdam"])
def test_no_weight_decay_on_biases(cls):
    """groups=: biases in a group with weight_decay=0 change exactly as with a zero-decay
    optimizer (only by the gradient); weights feel the decay."""
    params, plain = make_params(), make_params()
    wd = 0.5
    opt = getattr(optcore, cls)(params, groups=[{"params": ["b1", "b2"], "weight_decay": 0.0}],
                                lr=0.01, weight_decay=wd)
    ref = getattr(optcore, cls)(plain, lr=0.01, weight_decay=0.0)
    assert [pg["params"] for pg in opt.param_groups] == [["b1", "b2"], ["w1", "w2"]]
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[1]["weight_decay"] == wd
    rng = np.random.default_rng(4)
    for _ in range(5):
        fill_grads([params.grads.flat], rng)
        plain.grads.flat[...] = params.grads.flat
        opt.step()
        ref.step()
    for n in ("b1", "b2"):
        np.testing.assert_array_equal(params[n], plain[n])
    for n in ("w1", "w2"):
        assert not np.array_equal(params[n], plain[n])


def test_bias_update_is_the_plain_sgd_step():
    params = make_params()
    b0 = params["b1"].copy()
    opt = optcore.SGD(params, groups=[{"params": ["b1"], "weight_decay": 0.0}], lr=0.1,
                      weight_decay=0.3)
    params.grads["b1"][...] = 2.0
    opt.step()
    np.testing.assert_array_equal(params["b1"], b0 - np.float32(0.1) * np.float32(2.0))


def test_step_counting_and_lr_changes():
    """Each step counts; step(lr=...) sets lr in every group; param_groups[i]['lr'] changes
    between steps take effect; the bias correction follows the group's step count."""
    params = make_params()
    copies = [params[n].copy() for n in params]
    opt = optcore.Adam(params, groups=[{"params": ["b1"], "lr": 0.5}], lr=0.01)
    state = fresh_state("Adam", [a.shape for a in copies], {})
    rng = np.random.default_rng(5)
    names = list(params)
    groups = [[names.index("b1")], [i for i, n in enumerate(names) if n != "b1"]]
    # lr of (group 0, group 1) at each step
    lrs = {1: (0.5, 0.01), 2: (0.5, 0.01), 3: (0.2, 0.2), 4: (0.2, 0.2), 5: (0.03, 0.2),
           6: (0.03, 0.2)}
    for t in range(1, 7):
        fill_grads([params.grads.flat], rng)
        grads = [params.grads[n].copy() for n in params]
        if t == 3:
            opt.step(lr=0.2)
        else:
            if t == 5:
                opt.param_groups[0]["lr"] = 0.03
            opt.step()
        assert tuple(pg["lr"] for pg in opt.param_groups) == lrs[t]
        assert opt.state_steps == [t, t]
        for gi, idx in enumerate(groups):
            kernels.adam_([copies[i] for i in idx], [grads[i] for i in idx],
                          [state["exp_avg"][i] for i in idx], [state["exp_avg_sq"][i] for i in idx],
                          step=t, lr=lrs[t][gi])
    for i, n in enumerate(params):
        np.testing.assert_array_equal(params[n], copies[i])


def test_extra_keys_in_param_groups_are_ignored():
    """Keys a user or a scheduler adds to param_groups (torch's schedulers add
    'initial_lr'; users tag groups with names) do not disturb the step."""
    params, plain = make_params(), make_params()
    opt = optcore.Adam(params, lr=0.01)
    ref = optcore.Adam(plain, lr=0.01)
    opt.param_groups[0]["name"] = "all"
    opt.param_groups[0]["initial_lr"] = 0.01
    params.grads.flat[...] = 1.0
    plain.grads.flat[...] = 1.0
    opt.step()
    ref.step()
    assert params.flat.tobytes() == plain.flat.tobytes()
    assert opt.param_groups[0]["name"] == "all"


def test_zero_grad():
    params = make_params()
    params.grads.flat[...] = 1.0
    optcore.SGD(params, lr=0.1).zero_grad()
    assert (params.grads.flat == 0).all()
    pairs = [(np.ones(n, np.float32), np.ones(n, np.float32)) for n in (3, 40000, 1)]
    opt = optcore.Adam([{"params": pairs[:1]}, {"params": pairs[1:]}])
    opt.zero_grad()
    assert all((g == 0).all() and (p == 1).all() for p, g in pairs)


def test_state_of():
    params = make_params()
    opt = optcore.RMSProp(params, groups=[{"params": ["b1"]}], momentum=0.9, centered=True)
    params.grads.flat[...] = 1.0
    opt.step()
    st = opt.state_of("w2")
    assert set(st) == {"square_avg", "grad_avg", "momentum_buffer"}
    assert all(v.shape == SHAPES["w2"] and v.dtype == np.float32 for v in st.values())
    np.testing.assert_allclose(st["square_avg"], 0.01, rtol=1e-6)
    assert set(opt.state_of("b1")) == set(st)
    with pytest.raises(KeyError, match="nope"):
        opt.state_of("nope")
    assert opt.state_of("w1")["square_avg"].flags.writeable  # views of the optimizer's state
    assert optcore.SGD(params).state_of("w1") == {}


def run_steps(opt, params, seed, n):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        fill_grads([params.grads.flat], rng)
        opt.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_through_savez(cls, tmp_path):
    """Save after 4 steps, load into a fresh optimizer (and fresh Parameters), continue:
    bitwise identical to the uninterrupted run."""
    groups = [{"params": ["b1", "b2"], "weight_decay": 0.0, "lr": 0.02}]
    params = make_params()
    opt = getattr(optcore, cls)(params, groups=groups, **FULL[cls])
    run_steps(opt, params, 10, 4)
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    np.savez(tmp_path / "params.npz", **params.state_dict())
    run_steps(opt, params, 11, 4)

    params2 = make_params(seed=99)
    opt2 = getattr(optcore, cls)(params2, groups=copy.deepcopy(groups), **FULL[cls])
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as f:
        opt2.load_state_dict(f)
    with np.load(tmp_path / "params.npz", allow_pickle=False) as f:
        params2.load_state_dict(f)
    assert opt2.state_steps == [4, 4]
    run_steps(opt2, params2, 11, 4)
    assert params2.flat.tobytes() == params.flat.tobytes()
    a, b = opt.state_dict(), opt2.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
    assert opt2.param_groups == opt.param_groups


def test_state_dict_is_plain_arrays_and_numbers():
    params = make_params()
    opt = optcore.NAdam(params)
    run_steps(opt, params, 1, 2)
    buf = io.BytesIO()
    np.savez(buf, **opt.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        for k in f.files:
            assert f[k].dtype != object
        assert "group0.scalar.mu_product" in f.files


def test_betas_given_as_a_list_round_trip():
    """Regression: with betas passed as a list, load_state_dict took them for a scalar."""
    x, g = np.zeros(3, np.float32), np.ones(3, np.float32)
    opt = optcore.NAdam([(x, g)], betas=[0.8, 0.99])
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert tuple(opt.param_groups[0]["betas"]) == (0.8, 0.99)


def test_nadam_load_needs_its_mu_product():
    """Without (or with a bad) mu_product NAdam would silently restart its momentum
    schedule: loading is refused and nothing changes."""
    params = make_params()
    opt = optcore.NAdam(params)
    run_steps(opt, params, 1, 3)
    sd = opt.state_dict()
    fresh_params = make_params()
    fresh = optcore.NAdam(fresh_params)
    snap = _snapshot(fresh, fresh_params)
    for bad in (_modified(sd, **{"group0.scalar.mu_product": None}),
                _modified(sd, **{"group0.scalar.mu_product": np.array(np.nan)}),
                _modified(sd, **{"group0.scalar.mu_product": np.array(1.5)})):
        with pytest.raises(ValueError, match="mu_product"):
            fresh.load_state_dict(bad)
        _check(fresh, fresh_params, snap)
    fresh.load_state_dict(sd)
    assert fresh.state_dict()["group0.scalar.mu_product"] == sd["group0.scalar.mu_product"]
    # a state saved before the first step has no mu_product and needs none
    fresh.load_state_dict(optcore.NAdam(make_params()).state_dict())
    assert fresh.state_steps == [0]


def test_load_restores_hyper_parameters():
    params = make_params()
    opt = optcore.Adam(params, lr=0.1, betas=(0.5, 0.6))
    sd = opt.state_dict()
    opt2 = optcore.Adam(make_params(), lr=0.2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert tuple(opt2.param_groups[0]["betas"]) == (0.5, 0.6)


def _snapshot(opt, params):
    return (params.flat.tobytes(), params.grads.flat.tobytes(),
            {k: np.array(v, copy=True) for k, v in opt.state_dict().items()},
            copy.deepcopy(opt.param_groups), list(opt.state_steps))


def _check(opt, params, snap):
    flat, grads, state, groups, steps = snap
    assert params.flat.tobytes() == flat and params.grads.flat.tobytes() == grads
    now = opt.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert np.asarray(now[k]).tobytes() == v.tobytes(), k
    assert opt.param_groups == groups and opt.state_steps == steps


def _modified(sd, **changes):
    out = dict(sd)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_load_state_dict_errors_change_nothing():
    params = make_params()
    opt = optcore.Adam(params, groups=[{"params": ["b1"]}], amsgrad=True)
    run_steps(opt, params, 1, 2)
    good = optcore.Adam(make_params(), groups=[{"params": ["b1"]}], amsgrad=True,
                        lr=0.5)
    run_steps(good, params, 2, 3)
    sd = good.state_dict()
    snap = _snapshot(opt, params)
    n = sd["group1.state.exp_avg"].size
    other = optcore.Parameters({"w1": (8, 5), "b1": (5,), "w2": (5, 40000), "b3": (1,)})
    bad = {
        "wrong optimizer": (optcore.SGD(params, momentum=0.9).state_dict(), ValueError, "sgd"),
        "no amsgrad": (optcore.Adam(make_params(), groups=[{"params": ["b1"]}]).state_dict(),
                       ValueError, "amsgrad"),
        "groups": (optcore.Adam(make_params(), amsgrad=True).state_dict(), ValueError, "groups"),
        "names": (optcore.Adam(other, groups=[{"params": ["b1"]}], amsgrad=True).state_dict(),
                  ValueError, "names"),
        "sizes": (_modified(sd, **{"group1.sizes": np.array([40, 200000, 2])}), ValueError,
                  "sizes"),
        "state shape": (_modified(sd, **{"group1.state.exp_avg": np.zeros(n - 16, np.float32)}),
                        ValueError, "exp_avg"),
        "state dtype": (_modified(sd, **{"group1.state.exp_avg_sq": np.zeros(n)}), TypeError,
                        "exp_avg_sq"),
        "missing state": (_modified(sd, **{"group1.state.max_exp_avg_sq": None}), ValueError,
                          "max_exp_avg_sq"),
        "missing hyper": (_modified(sd, **{"group0.hyper.eps": None}), ValueError, "eps"),
        "bad hyper": (_modified(sd, **{"group1.hyper.lr": np.array(-1.0)}), ValueError, "lr"),
        "bad step": (_modified(sd, **{"group0.step": np.array(-3)}), ValueError, "step"),
        "float step": (_modified(sd, **{"group0.step": np.array(2.5)}), ValueError, "step"),
    }
    for what, (state, exc, pattern) in bad.items():
        with pytest.raises(exc, match=pattern):
            opt.load_state_dict(state)
        _check(opt, params, snap)
    opt.load_state_dict(sd)  # the good one still loads
    assert opt.state_steps == [3, 3]


# -- convergence (optax-style invariants) ------------------------------------------------------

CONVERGE = {
    "SGD": (dict(lr=1e-3, momentum=0.9), 4000),
    "AdaGrad": (dict(lr=0.1), 10000),
    "RMSProp": (dict(lr=1e-3, momentum=0.9), 4000),
    "Adam": (dict(lr=1e-2), 4000),
    "AdamW": (dict(lr=1e-2, weight_decay=1e-4), 4000),
    "AdaMax": (dict(lr=2e-2), 4000),
    "NAdam": (dict(lr=1e-2), 4000),
}


def rosenbrock_grad(x):
    a, b = float(x[0]), float(x[1])
    return (-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a))


@pytest.mark.parametrize("cls", CLASSES)
def test_converges_on_rosenbrock(cls):
    """Minimum at (1, 1) from (0, 0); 1e-2 is far from the start and well outside the
    float32 noise and (for AdamW) the 1e-4 shift of the minimum by the weight decay."""
    h, steps = CONVERGE[cls]
    x, g = np.zeros(2, np.float32), np.zeros(2, np.float32)
    opt = getattr(optcore, cls)([(x, g)], **h)
    for _ in range(steps):
        g[...] = rosenbrock_grad(x)
        opt.step()
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-2)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("cls", CLASSES)
def test_converges_on_parabola(cls, maximize):
    """f(x) = 0.5 sum a_i (x_i - c_i)^2 (or its negative, maximized): within 1e-2 of c."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, 50).astype(np.float32)
    c = rng.uniform(-2, 2, 50).astype(np.float32)
    x, g = np.zeros(50, np.float32), np.zeros(50, np.float32)
    h = {"SGD": dict(lr=0.1, momentum=0.5), "AdaGrad": dict(lr=0.5),
         "RMSProp": dict(lr=1e-2), "Adam": dict(lr=0.05), "AdamW": dict(lr=0.05, weight_decay=0.0),
         "AdaMax": dict(lr=0.05), "NAdam": dict(lr=0.05)}[cls]
    opt = getattr(optcore, cls)([(x, g)], maximize=maximize, **h)
    for _ in range(1500):
        g[...] = a * (x - c) * (-1 if maximize else 1)
        opt.step()
    np.testing.assert_allclose(x, c, atol=1e-2)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_allocates_nothing_the_size_of_the_parameters(cls):
    """One step allocates O(groups) Python objects, never a parameter-sized temporary
    (NumPy reports its buffers to tracemalloc)."""
    import tracemalloc

    params = optcore.Parameters({"w": (1000, 1000), "b": (1000,)})
    opt = getattr(optcore, cls)(params, groups=[{"params": ["b"], "weight_decay": 0.0}],
                                **FULL[cls])
    opt.step()
    tracemalloc.start()
    try:
        opt.step()
        opt.zero_grad()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak  # the parameters are 4 MB
