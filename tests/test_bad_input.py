"""Bad input to the kernels and the optimizer classes: a TypeError/ValueError naming the
argument, raised before anything is written (every buffer is checked bitwise afterwards)."""
import copy
import re

import numpy as np
import pytest

import optcore
from optcore import kernels

SHAPES = [(5,), (40000,), (2, 3)]

# a valid call of each kernel using every state buffer it has
BASE = {
    "sgd": (dict(step=2, lr=0.1, momentum=0.9), ["momentum_buffer"]),
    "adagrad": (dict(step=2, lr=0.1), ["sum"]),
    "rmsprop": (dict(lr=0.1, centered=True, momentum=0.9), ["square_avg", "grad_avg",
                                                            "momentum_buffer"]),
    "adam": (dict(step=2, lr=0.1), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    "adamax": (dict(step=2, lr=0.1), ["exp_avg", "exp_inf"]),
    "nadam": (dict(step=2, lr=0.1, mu_product=0.5), ["exp_avg", "exp_avg_sq"]),
}
RULES = list(BASE)


def buffers(rule, rng):
    """{"param": [...], "grad": [...], <state>: [...]} of float32 arrays (states > 0)."""
    names = ["param", "grad"] + BASE[rule][1]
    return {n: [(rng.random(s) + 0.1).astype(np.float32) for s in SHAPES] for n in names}


def all_arrays(bufs):
    out = []
    for v in bufs.values():
        if isinstance(v, np.ndarray):
            out.append(v)
        elif isinstance(v, list):
            out.extend(a for a in v if isinstance(a, np.ndarray))
    return out


class Snapshot:
    """Bitwise copies of arrays (and of whatever they view) to prove nothing was written."""

    def __init__(self, arrays):
        self.items = [(a, a.tobytes(), None if a.base is None else np.asarray(a.base).tobytes())
                      for a in arrays]

    def check(self):
        for a, data, base in self.items:
            assert a.tobytes() == data
            if base is not None:
                assert np.asarray(a.base).tobytes() == base


def call(rule, bufs, **hyper):
    kw = dict(BASE[rule][0], **hyper)
    return getattr(kernels, rule + "_")(**bufs, **kw)


def expect_error(rule, bufs, exc, pattern, extra=(), **hyper):
    snap = Snapshot(all_arrays(bufs) + list(extra))
    with pytest.raises(exc, match=pattern):
        call(rule, bufs, **hyper)
    snap.check()


def test_base_calls_are_valid(rng):
    for rule in RULES:
        call(rule, buffers(rule, rng))


# -- arrays ---------------------------------------------------------------------------------

def _float64(a):
    return a.astype(np.float64)


def _int32(a):
    return a.astype(np.int32)


def _strided(a):
    return np.zeros(2 * a.size, np.float32)[::2].reshape(a.shape)


def _transposed(a):
    return np.zeros(a.shape[::-1], np.float32).T


def _readonly(a):
    b = a.copy()
    b.flags.writeable = False
    return b


def _wrong_size(a):
    return np.zeros(a.size + 1, np.float32)


def _pylist(a):
    return a.tolist()


MUTATIONS = {
    "float64": (_float64, TypeError),
    "int32": (_int32, TypeError),
    "strided": (_strided, ValueError),
    "transposed": (_transposed, ValueError),
    "readonly": (_readonly, ValueError),
    "wrong_size": (_wrong_size, ValueError),
    "pylist": (_pylist, TypeError),
}
BUFFER_CASES = [(r, n) for r in RULES for n in ["param", "grad"] + BASE[r][1]]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("rule,name", BUFFER_CASES)
def test_bad_array_in_list(rule, name, mutation, rng):
    """The last tensor (2-D, so transposition applies) of one list is bad."""
    make, exc = MUTATIONS[mutation]
    bufs = buffers(rule, rng)
    bufs[name][2] = make(bufs[name][2])
    if name == "grad" and mutation == "readonly":
        call(rule, bufs)  # gradients are only read: a read-only gradient is fine
        return
    expect_error(rule, bufs, exc, re.escape(f"{name}[2]"))


@pytest.mark.parametrize("mutation", ["float64", "strided", "readonly", "wrong_size"])
@pytest.mark.parametrize("rule,name", BUFFER_CASES)
def test_bad_single_array(rule, name, mutation, rng):
    make, exc = MUTATIONS[mutation]
    bufs = {k: v[1] for k, v in buffers(rule, rng).items()}
    bufs[name] = make(bufs[name])
    if name == "grad" and mutation == "readonly":
        call(rule, bufs)
        return
    expect_error(rule, bufs, exc, rf"\b{name}\b")


@pytest.mark.parametrize("rule,name", BUFFER_CASES)
def test_mismatched_list_lengths(rule, name, rng):
    bufs = buffers(rule, rng)
    if name == "param":
        bufs["param"] = bufs["param"][:2]
        expect_error(rule, bufs, ValueError, r"has 3 tensors but param has 2")
    else:
        bufs[name] = bufs[name] + [np.zeros(3, np.float32)]
        expect_error(rule, bufs, ValueError, rf"\b{name} has 4 tensors")


def test_not_an_array(rng):
    bufs = buffers("adam", rng)
    bufs["param"] = 3.0
    expect_error("adam", bufs, TypeError, r"\bparam\b")
    bufs = buffers("adam", rng)
    bufs["grad"] = {"a": 1}
    expect_error("adam", bufs, TypeError, r"\bgrad\b")


@pytest.mark.parametrize("rule", RULES)
def test_missing_state(rule, rng):
    # (Adam's max_exp_avg_sq is optional: None means no AMSGrad)
    for name in BASE[rule][1][:1] + (BASE[rule][1][1:] if rule == "rmsprop" else []):
        bufs = buffers(rule, rng)
        bufs[name] = None
        expect_error(rule, bufs, TypeError, rf"\b{name}\b")


# -- aliasing -------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_grad_is_param(rule, rng):
    bufs = buffers(rule, rng)
    bufs["grad"][1] = bufs["param"][1]
    expect_error(rule, bufs, ValueError, r"param\[1\] and grad\[1\] share memory|"
                                         r"grad\[1\] and param\[1\] share memory")


@pytest.mark.parametrize("rule", RULES)
def test_grad_overlaps_param(rule, rng):
    """Overlapping views of one buffer (neither contains the other)."""
    bufs = buffers(rule, rng)
    big = rng.random(40100).astype(np.float32)
    bufs["param"][1] = big[:40000]
    bufs["grad"][1] = big[100:]
    expect_error(rule, bufs, ValueError, "share memory", extra=[big])


@pytest.mark.parametrize("rule", RULES)
def test_same_param_twice(rule, rng):
    bufs = buffers(rule, rng)
    for n in bufs:
        bufs[n][2] = bufs[n][0] if n == "param" else bufs[n][0].copy()
    expect_error(rule, bufs, ValueError, r"param\[0\] and param\[2\] share memory")


@pytest.mark.parametrize("rule", RULES)
def test_state_aliasing(rule, rng):
    names = BASE[rule][1]
    # a state buffer that is the parameter, the gradient, or another state buffer
    for other in ["param", "grad"] + names[1:]:
        bufs = buffers(rule, rng)
        bufs[names[0]][1] = bufs[other][1]
        expect_error(rule, bufs, ValueError, "share memory")
        bufs = buffers(rule, rng)
        bufs[names[0]] = bufs[other][1]  # a different list shape: list vs single
        with pytest.raises((ValueError, TypeError)):
            call(rule, bufs)


# -- hyper-parameters -------------------------------------------------------------------------

COMMON_BAD = [
    ("lr", -1.0, ValueError), ("lr", float("nan"), ValueError), ("lr", "0.1", TypeError),
    ("weight_decay", -0.1, ValueError), ("weight_decay", float("nan"), ValueError),
    ("grad_scale", float("nan"), ValueError), ("grad_scale", float("inf"), ValueError),
    ("maximize", "yes", TypeError), ("maximize", 1, TypeError),
]
STEP_BAD = [("step", 0, ValueError), ("step", -1, ValueError), ("step", 1.5, TypeError),
            ("step", None, TypeError), ("step", True, TypeError), ("step", "2", TypeError)]
BETAS_BAD = [("beta1", 1.0, ValueError), ("beta1", -0.1, ValueError),
             ("beta1", float("nan"), ValueError), ("beta2", 1.0, ValueError),
             ("beta2", 1.5, ValueError), ("eps", -1e-8, ValueError),
             ("eps", float("nan"), ValueError)]
RULE_BAD = {
    "sgd": [("momentum", -0.5, ValueError), ("dampening", float("nan"), ValueError),
            ("nesterov", "no", TypeError)],
    "adagrad": [("lr_decay", -0.1, ValueError), ("eps", -1.0, ValueError)],
    "rmsprop": [("alpha", 1.5, ValueError), ("alpha", -0.1, ValueError),
                ("eps", -1.0, ValueError), ("momentum", -0.1, ValueError),
                ("centered", 1, TypeError)],
    "adam": BETAS_BAD + [("decoupled", "yes", TypeError)],
    "adamax": BETAS_BAD,
    "nadam": BETAS_BAD + [("momentum_decay", -1.0, ValueError), ("mu_product", 1.5, ValueError),
                          ("mu_product", float("nan"), ValueError),
                          ("decoupled", 0, TypeError)],
}
HYPER_CASES = [(r, *c) for r in RULES
               for c in COMMON_BAD + (STEP_BAD if r != "rmsprop" else []) + RULE_BAD[r]]


@pytest.mark.parametrize("rule,name,value,exc", HYPER_CASES)
def test_bad_hyper_parameter(rule, name, value, exc, rng):
    expect_error(rule, buffers(rule, rng), exc, rf"\b{name}\b", **{name: value})


@pytest.mark.parametrize("hyper", [dict(nesterov=True, momentum=0.0),
                                   dict(nesterov=True, momentum=0.9, dampening=0.1)])
def test_nesterov_needs_momentum_and_no_dampening(hyper, rng):
    bufs = buffers("sgd", rng)
    if hyper["momentum"] == 0:
        bufs.pop("momentum_buffer")
    expect_error("sgd", bufs, ValueError, "nesterov", **hyper)


# -- classes ----------------------------------------------------------------------------------

CLASSES = ["SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaMax", "NAdam"]
CLASS_HYPER = {"SGD": dict(lr=0.1, momentum=0.9), "RMSProp": dict(centered=True, momentum=0.9),
               "Adam": dict(amsgrad=True)}


def make_pairs(rng):
    return [((rng.random(s) + 0.1).astype(np.float32), (rng.random(s) + 0.1).astype(np.float32))
            for s in SHAPES]


def expect_ctor_error(cls, params, exc, pattern, extra=(), **hyper):
    arrays = [a for p in params for a in p] if isinstance(params, list) else []
    snap = Snapshot(arrays + list(extra))
    with pytest.raises(exc, match=pattern):
        getattr(optcore, cls)(params, **dict(CLASS_HYPER.get(cls, {}), **hyper))
    snap.check()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("mutation", ["float64", "int32", "strided", "transposed", "readonly"])
def test_class_bad_pair(cls, which, mutation, rng):
    make, exc = MUTATIONS[mutation]
    pairs = make_pairs(rng)
    p, g = pairs[2]
    pairs[2] = (make(p), g) if which == 0 else (p, make(g))
    if which == 1 and mutation == "readonly":
        getattr(optcore, cls)(pairs)  # read-only gradients are accepted
        return
    expect_ctor_error(cls, pairs, exc, re.escape(f"params[2][{which}]"))


@pytest.mark.parametrize("cls", CLASSES)
def test_class_shape_mismatch_and_aliasing(cls, rng):
    pairs = make_pairs(rng)
    pairs[1] = (pairs[1][0], pairs[1][1][:-1])
    expect_ctor_error(cls, pairs, ValueError, r"params\[1\]")
    pairs = make_pairs(rng)
    pairs[1] = (pairs[1][0], pairs[1][0])
    expect_ctor_error(cls, pairs, ValueError, "share memory")
    pairs = make_pairs(rng)
    pairs.append(pairs[0])
    expect_ctor_error(cls, pairs, ValueError, "share memory")
    pairs = make_pairs(rng)
    big = np.zeros(40100, np.float32)
    pairs[1] = (big[:40000], big[100:])
    expect_ctor_error(cls, pairs, ValueError, "share memory", extra=[big])
    with pytest.raises(TypeError, match="params"):
        getattr(optcore, cls)([(np.zeros(3, np.float32),)])


@pytest.mark.parametrize("cls", CLASSES)
def test_class_bad_hyper_parameters(cls, rng):
    rule = getattr(optcore, cls).rule
    cases = [("lr", -1.0, ValueError), ("lr", float("nan"), ValueError),
             ("weight_decay", -0.5, ValueError), ("maximize", 2, TypeError)]
    if "betas" in rule.defaults:
        cases += [("betas", (1.0, 0.9), ValueError, r"betas\[0\]"),
                  ("betas", (0.9, -0.1), ValueError, r"betas\[1\]"),
                  ("betas", 0.9, TypeError, "betas")]
    if "eps" in rule.defaults:
        cases += [("eps", -1e-8, ValueError)]
    for case in cases:
        name, value, exc = case[:3]
        pattern = case[3] if len(case) > 3 else rf"\b{name}\b"
        expect_ctor_error(cls, make_pairs(rng), exc, pattern, **{name: value})
    expect_ctor_error(cls, make_pairs(rng), TypeError, "foo", foo=1)


def test_class_nesterov_without_momentum(rng):
    expect_ctor_error("SGD", make_pairs(rng), ValueError, "nesterov", momentum=0.0, nesterov=True)


def test_adamw_is_always_decoupled(rng):
    expect_ctor_error("AdamW", make_pairs(rng), ValueError, "decoupled_weight_decay",
                      decoupled_weight_decay=False)


def test_group_dict_errors(rng):
    pairs = make_pairs(rng)
    with pytest.raises(ValueError, match="betaz"):
        optcore.Adam([{"params": pairs[:1]}, {"params": pairs[1:], "betaz": (0.9, 0.9)}])
    with pytest.raises(ValueError, match="lr"):
        optcore.Adam([{"params": pairs[:1]}, {"params": pairs[1:], "lr": -1.0}])
    with pytest.raises(TypeError, match=r"params\[1\]"):
        optcore.Adam([{"params": pairs[:1]}, {"lr": 0.1}])
    with pytest.raises(ValueError, match="share memory"):
        optcore.Adam([{"params": pairs[:2]}, {"params": pairs[1:]}])
    with pytest.raises(TypeError, match="groups"):
        optcore.Adam(pairs, groups=[{"params": ["0"]}])


def arena(rng):
    p = optcore.Parameters({"w": (4, 3), "b": (3,), "v": (40000,)})
    p.flat[...] = rng.random(p.flat.size)
    p.grads.flat[...] = rng.random(p.flat.size)
    return p


def test_groups_errors_on_parameters(rng):
    params = arena(rng)
    snap = Snapshot([params.flat, params.grads.flat])
    with pytest.raises(ValueError, match="'nope'"):
        optcore.Adam(params, groups=[{"params": ["w", "nope"]}])
    with pytest.raises(ValueError, match="'w'"):
        optcore.Adam(params, groups=[{"params": ["w"]}, {"params": ["b", "w"]}])
    with pytest.raises(ValueError, match="'w'"):
        optcore.Adam(params, groups=[{"params": ["w", "w"]}])
    with pytest.raises(ValueError, match="momentum"):
        optcore.Adam(params, groups=[{"params": ["w"], "momentum": 0.9}])
    with pytest.raises(ValueError, match="weight_decay"):
        optcore.Adam(params, groups=[{"params": ["b"], "weight_decay": -1.0}])
    with pytest.raises(TypeError, match=r"groups\[0\]"):
        optcore.Adam(params, groups=[["w"]])
    with pytest.raises(TypeError, match=r"groups\[0\]"):
        optcore.Adam(params, groups=[{"params": "w"}])  # a name, not a list of names
    snap.check()


def opt_snapshot(opt, params):
    return (Snapshot([params.flat, params.grads.flat]),
            {k: np.array(v, copy=True) for k, v in opt.state_dict().items()},
            copy.deepcopy(opt.param_groups), list(opt.state_steps))


def check_opt_snapshot(opt, snap):
    arrays, state, groups, steps = snap
    arrays.check()
    now = opt.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert np.asarray(now[k]).tobytes() == v.tobytes(), k
    assert opt.param_groups == groups
    assert opt.state_steps == steps


@pytest.mark.parametrize("cls", CLASSES)
def test_step_errors_change_nothing(cls, rng):
    params = arena(rng)
    opt = getattr(optcore, cls)(params, groups=[{"params": ["b"], "weight_decay": 0.0}],
                                **CLASS_HYPER.get(cls, {}))
    opt.step()
    snap = opt_snapshot(opt, params)
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises((ValueError, TypeError), match="lr"):
            opt.step(lr=bad)
        check_opt_snapshot(opt, snap)
    # a bad value in the LAST group: the first group must not have been stepped either
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[1]["lr"] = snap[2][1]["lr"]
    check_opt_snapshot(opt, snap)
    if "betas" in opt.defaults:
        opt.param_groups[1]["betas"] = (0.9, 1.0)
        with pytest.raises(ValueError, match=r"betas\[1\]"):
            opt.step()
        opt.param_groups[1]["betas"] = snap[2][1]["betas"]
        check_opt_snapshot(opt, snap)
    opt.step()  # still usable


@pytest.mark.parametrize("cls,key,value", [("SGD", "momentum", 0.0),
                                           ("RMSProp", "centered", False),
                                           ("RMSProp", "momentum", 0.0),
                                           ("Adam", "amsgrad", False)])
def test_structural_hyper_change_rejected(cls, key, value, rng):
    params = arena(rng)
    opt = getattr(optcore, cls)(params, **CLASS_HYPER[cls])
    opt.step()
    snap = opt_snapshot(opt, params)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step()
    opt.param_groups[0][key] = snap[2][0][key]
    check_opt_snapshot(opt, snap)


def test_zero_grad_with_read_only_grad(rng):
    """The optimizer only reads gradients, so a read-only one is accepted; zero_grad must
    then refuse instead of writing through the read-only array."""
    pairs = make_pairs(rng)
    g = pairs[1][1]
    g.flags.writeable = False
    opt = optcore.SGD(pairs, lr=0.1)
    snap = Snapshot([a for p in pairs for a in p])
    with pytest.raises(ValueError, match="read-only"):
        opt.zero_grad()
    snap.check()
