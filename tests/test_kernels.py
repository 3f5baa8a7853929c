"""The six public update kernels of ``optcore.kernels`` against the float64 references.

Method ("lockstep"): at every step the reference (tests/reference.py, float64) is applied to
the kernel's own float32 buffers before the call, and every buffer the kernel wrote is
compared with it; the next step continues from the kernel's buffers. Each step is then
checked tightly (no accumulated drift to allow for) while step-dependent scalars (bias
corrections, NAdam's mu product, AdaGrad's decayed rate, SGD's first-step buffer) are
exercised over many steps. A free-running comparison over 100 steps checks the drift too.

Tolerance (``assert_step``): every output element is a handful (<= ~8) of float32
operations on values no larger than the buffer's own magnitude, each rounding by at most
half an ulp; measured worst cases are ~1 eps x (|expected| + scale) where ``scale`` is the
largest magnitude of the buffer before and after the step. We allow 4 eps (8 eps for
hypothesis, which roams over wider hyper-parameters), i.e. |k - r| <= 4 eps (|r| + scale):
still ~1e-6 of the buffer's magnitude, far below any formula error (a wrong bias
correction or a missing term is off by >= 1e-3 relative).

Plus a backward-error term: the kernel's float32 gradient stage (``g * s + wd * p``) can
cancel, and a later step may amplify the cancelled value (AdaGrad's first step maps g to
~g / (|g| + eps), a slope of lr / eps near 0). The kernel is exact for inputs perturbed by
~1 ulp, so we add the reference's own change when its inputs are perturbed by 2 eps
(gradient and states one way, parameter the other, and the reverse): elementwise, this is
only large where the formula itself is that sensitive.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import optcore
from optcore import kernels

import reference as R

EPS32 = float(np.finfo(np.float32).eps)

# (rule, hyper-parameters in the names of optcore.kernels; ``amsgrad`` selects the
# max_exp_avg_sq buffer, ``initial_accumulator_value`` AdaGrad's initial sum)
CONFIGS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2,
                     eps=1e-6, maximize=True)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, centered=True, weight_decay=0.05)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, alpha=0.9)),
    ("rmsprop", dict(lr=0.01, momentum=0.5, centered=True, maximize=True)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, beta1=0.8, beta2=0.99, weight_decay=0.1, maximize=True)),
    ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    ("adam", dict(lr=0.01, decoupled=True, weight_decay=0.1)),
    ("adam", dict(lr=0.01, decoupled=True, weight_decay=0.1, amsgrad=True, eps=1e-4)),
    ("adamax", dict(lr=0.01)),
    ("adamax", dict(lr=0.01, beta1=0.5, beta2=0.9, weight_decay=0.1, maximize=True)),
    ("nadam", dict(lr=0.01)),
    ("nadam", dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01)),
    ("nadam", dict(lr=0.01, weight_decay=0.1, decoupled=True, maximize=True)),
]
CONFIG_IDS = [f"{r}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for r, h in CONFIGS]

SIZES = [0, 1, 15, 16, 17, 511, 513, 16383, 16384, 16385, 40000]
LIST_SHAPES = [(0,), (1,), (15,), (16,), (17,), (511,), (513,), (3, 7), (16383,), (16385,),
               (2, 16384), (40, 1000)]


def make_state(rule, h, shapes):
    """Kernel state: dict of name -> list of float32 arrays (same as the reference's)."""
    out = {}
    for shape in shapes:
        for k, v in R.initial_state(rule, shape, **h).items():
            out.setdefault(k, []).append(v.astype(np.float32))
    return out


def kernel_call(rule, params, grads, states, *, step, h, mu_product=1.0, grad_scale=1.0):
    """Call ``optcore.kernels.<rule>_`` with reference-style arguments; returns the new
    mu_product (NAdam) or ``mu_product`` unchanged."""
    kw = {k: v for k, v in h.items() if k not in ("amsgrad", "initial_accumulator_value")}
    if rule != "rmsprop":
        kw["step"] = step
    if rule == "nadam":
        kw["mu_product"] = mu_product
    out = getattr(kernels, rule + "_")(params, grads, **states, grad_scale=grad_scale, **kw)
    return out if rule == "nadam" else mu_product


def assert_step(name, actual, expected, before, k=4, extra=0.0):
    """|actual - expected| <= k eps32 (|expected| + scale) + extra, scale = buffer
    magnitude, extra = the reference's sensitivity to 2-eps input perturbations."""
    scale = max(float(np.max(np.abs(before), initial=0.0)),
                float(np.max(np.abs(expected), initial=0.0)))
    actual = np.asarray(actual, np.float64)
    bound = k * EPS32 * (np.abs(expected) + scale) + extra
    bad = ~(np.abs(actual - expected) <= bound)
    bad &= ~(np.isnan(actual) & np.isnan(expected))
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(
            f"{name}: {bad.sum()} of {bad.size} elements off; first at flat index {i}: "
            f"got {actual.reshape(-1)[i]!r}, expected {expected.reshape(-1)[i]!r}, "
            f"bound {np.broadcast_to(bound, bad.shape).reshape(-1)[i]!r}")


DELTA = 2 * EPS32


def reference_with_sensitivity(rule, p, g, state, *, step, h, mu_product, grad_scale):
    """The reference result and, per buffer, its largest change under 2-eps perturbations
    of the inputs (see the module docstring)."""
    nominal = R.apply(rule, p, g, state, step=step, h=h, mu_product=mu_product,
                      grad_scale=grad_scale)
    extra = {"param": 0.0, **{n: 0.0 for n in nominal[1]}}
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    for sign in (1.0, -1.0):
        st = {n: v.astype(np.float64) * (1 + sign * DELTA) for n, v in state.items()}
        pert = R.apply(rule, p64 * (1 - sign * DELTA), g64 * (1 + sign * DELTA), st, step=step,
                       h=h, mu_product=mu_product, grad_scale=grad_scale)
        with np.errstate(invalid="ignore"):
            extra["param"] = np.fmax(extra["param"], np.abs(pert[0] - nominal[0]))
            for n in nominal[1]:
                extra[n] = np.fmax(extra[n], np.abs(pert[1][n] - nominal[1][n]))
    return nominal, extra


def lockstep(rule, h, shapes, *, steps, rng, single=False, grad_scale=1.0, k=4, gmag=1.0):
    """Run ``steps`` kernel steps over tensors of ``shapes``, checking each against the
    reference. ``single``: pass bare arrays instead of lists (one tensor only)."""
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    states = make_state(rule, h, shapes)
    mu = 1.0
    for t in range(1, steps + 1):
        # gradients of mixed magnitudes (per step) so that small and large values both occur
        mag = gmag * rng.choice([1e-3, 1.0, 30.0])
        grads = [(mag * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        expected, extras = [], []
        for i in range(len(shapes)):
            si = {n: v[i] for n, v in states.items()}
            e, x = reference_with_sensitivity(rule, params[i], grads[i], si, step=t, h=h,
                                              mu_product=mu, grad_scale=grad_scale)
            expected.append(e)
            extras.append(x)
        before = [(params[i].copy(), {n: v[i].copy() for n, v in states.items()})
                  for i in range(len(shapes))]
        if single:
            mu_new = kernel_call(rule, params[0], grads[0], {n: v[0] for n, v in states.items()},
                                 step=t, h=h, mu_product=mu, grad_scale=grad_scale)
        else:
            mu_new = kernel_call(rule, params, grads, states, step=t, h=h, mu_product=mu,
                                 grad_scale=grad_scale)
        for i, (ep, es, emu) in enumerate(expected):
            assert_step(f"step {t} param[{i}]", params[i], ep, before[i][0], k,
                        extras[i]["param"])
            assert set(es) == set(states), (set(es), set(states))
            for n in es:
                assert_step(f"step {t} {n}[{i}]", states[n][i], es[n], before[i][1][n], k,
                            extras[i][n])
        if rule == "nadam":
            # the mu product is a float64 scalar: same formula, same float64 operations
            assert mu_new == pytest.approx(expected[0][2], rel=1e-15)
        mu = mu_new
    return params, states


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_single_array_matches_reference(rule, h, size, rng):
    steps = 8 if size < 20000 else 3
    lockstep(rule, h, [(size,)], steps=steps, rng=rng, single=True)


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_tensor_list_matches_reference(rule, h, rng):
    lockstep(rule, h, LIST_SHAPES, steps=6, rng=rng)


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_many_steps(rule, h, rng):
    """Step-dependent scalars over 40 steps (bias corrections, mu product, lr decay)."""
    lockstep(rule, h, [(37,), (5, 3)], steps=40, rng=rng)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("rule,h", CONFIGS[1::3], ids=CONFIG_IDS[1::3])
def test_parallel_path_matches_reference(rule, h, nthreads, rng):
    """> 32768 elements over several chunks: the OpenMP path runs with 2 threads."""
    optcore.set_num_threads(nthreads)
    lockstep(rule, h, [(70001,), (3, 16385)], steps=3, rng=rng)


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_list_equals_separate_calls(rule, h, rng):
    """One multi-tensor call gives bitwise the same as one call per tensor."""
    shapes = [(17,), (16385,), (4, 5), (0,), (33000,)]
    a_params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    b_params = [p.copy() for p in a_params]
    a_state, b_state = make_state(rule, h, shapes), make_state(rule, h, shapes)
    mu_a = mu_b = 1.0
    for t in range(1, 4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        mu_a = kernel_call(rule, a_params, grads, a_state, step=t, h=h, mu_product=mu_a)
        for i in range(len(shapes)):
            mu_i = kernel_call(rule, b_params[i], grads[i], {n: v[i] for n, v in b_state.items()},
                               step=t, h=h, mu_product=mu_b)
        mu_b = mu_i
        assert mu_a == mu_b
    for i in range(len(shapes)):
        np.testing.assert_array_equal(a_params[i], b_params[i])
        for n in a_state:
            np.testing.assert_array_equal(a_state[n][i], b_state[n][i])


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_grad_scale_and_maximize_are_exact(rule, h, rng):
    """``grad_scale=s`` is bitwise the same as passing ``grad * float32(s)``, and
    ``maximize=True`` the same as passing ``-grad``: the kernel multiplies the float32
    gradient by the float32 scale, exactly what NumPy does."""
    shapes = [(1000,), (17,)]
    s = 0.37
    h_min = dict(h, maximize=False)
    for variant in ("scale", "maximize"):
        a = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
        b = [x.copy() for x in a]
        sa, sb = make_state(rule, h_min, shapes), make_state(rule, h_min, shapes)
        mu_a = mu_b = 1.0
        for t in range(1, 4):
            g = [rng.standard_normal(sh).astype(np.float32) for sh in shapes]
            if variant == "scale":
                mu_a = kernel_call(rule, a, g, sa, step=t, h=h_min, mu_product=mu_a, grad_scale=s)
                gs = [x * np.float32(s) for x in g]
                mu_b = kernel_call(rule, b, gs, sb, step=t, h=h_min, mu_product=mu_b)
            else:
                mu_a = kernel_call(rule, a, g, sa, step=t, h=dict(h_min, maximize=True),
                                   mu_product=mu_a)
                mu_b = kernel_call(rule, b, [-x for x in g], sb, step=t, h=h_min, mu_product=mu_b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        for n in sa:
            for x, y in zip(sa[n], sb[n]):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rule,h", [c for c in CONFIGS if c[0] != "rmsprop"][::2])
def test_grad_scale_against_reference(rule, h, rng):
    lockstep(rule, h, [(100,), (3, 4)], steps=5, rng=rng, grad_scale=-2.5)
    lockstep(rule, h, [(100,)], steps=3, rng=rng, grad_scale=1e-3)


def test_sgd_first_step_ignores_buffer_content(rng):
    """At step 1 the momentum buffer is set to the gradient whatever it held (torch's
    ``buf = clone(g)``); from step 2 on it is used."""
    p = rng.standard_normal(100).astype(np.float32)
    g = rng.standard_normal(100).astype(np.float32)
    buf = np.full(100, 123.0, np.float32)
    p0 = p.copy()
    kernels.sgd_(p, g, buf, step=1, lr=0.1, momentum=0.9, dampening=0.5)
    np.testing.assert_array_equal(buf, g)
    np.testing.assert_array_equal(p, p0 - np.float32(0.1) * g)
    kernels.sgd_(p, g, buf, step=2, lr=0.1, momentum=0.9, dampening=0.5)
    # 0.9 g + 0.5 g in float32 (constants rounded too): within ~2 ulp of 1.4 g
    np.testing.assert_allclose(buf, 1.4 * g.astype(np.float64), rtol=4 * EPS32)


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_numpy_scalar_hyper_parameters(rule, h, rng):
    """NumPy float32 scalars as hyper-parameters give bitwise the same as the equal Python
    floats (step scalars stay float64), and NumPy integer steps work."""
    h32 = {k: np.float32(v) if isinstance(v, float) else v for k, v in h.items()}
    h64 = {k: float(v) if isinstance(v, np.float32) else v for k, v in h32.items()}
    shapes = [(50,)]
    a, b = [rng.standard_normal(50).astype(np.float32)], None
    b = [a[0].copy()]
    sa, sb = make_state(rule, h, shapes), make_state(rule, h, shapes)
    mu_a = mu_b = 1.0
    for t in range(1, 5):
        g = [rng.standard_normal(50).astype(np.float32)]
        mu_a = kernel_call(rule, a, g, sa, step=np.int16(t), h=h32, mu_product=mu_a)
        mu_b = kernel_call(rule, b, g, sb, step=t, h=h64, mu_product=mu_b)
    np.testing.assert_array_equal(a[0], b[0])
    assert mu_a == mu_b


def test_nadam_returns_mu_product():
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    mu = 1.0
    expected = 1.0
    for t in range(1, 6):
        mu = kernels.nadam_(p, g, m, v, step=t, mu_product=mu, momentum_decay=0.01)
        expected *= R.nadam_mu(t, 0.9, 0.01)
        assert mu == pytest.approx(expected, rel=1e-15)
    assert isinstance(mu, float)


def test_adam_free_running_drift(rng):
    """100 float32 steps against 100 float64 steps from the same start and gradients.
    Each step rounds |p| ~ 1 by ~1 ulp (6e-8); the errors do not compound (Adam's update is
    bounded by ~lr and insensitive to tiny changes of p), so after 100 steps the random walk of
    rounding errors is ~sqrt(100) ulp ~ 1e-6: 5e-6 absolute gives room, yet a wrong formula
    (e.g. eps inside the square root, or no bias correction) is off by > 1e-3."""
    n = 50_000
    p = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p64, s64 = p.astype(np.float64), R.initial_state("adam", n)
    for t in range(1, 101):
        g = rng.standard_normal(n).astype(np.float32)
        kernels.adam_(p, g, m, v, step=t, lr=1e-3)
        p64, s64, _ = R.apply("adam", p64, g, s64, step=t, h=dict(lr=1e-3))
    np.testing.assert_allclose(p, p64, rtol=0, atol=5e-6)
    # m is an EMA of the same float32 gradients (|g| ~ 1): its rounding errors decay with
    # beta1 instead of accumulating, a few ulps ~ 1e-7; 1e-6 gives room
    np.testing.assert_allclose(m, s64["exp_avg"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "rmsprop", "adam", "adamax", "nadam"])
def test_nan_in_gradient_propagates(rule):
    """A NaN gradient element makes that parameter NaN (as in torch); others are finite."""
    h = dict(lr=0.01, momentum=0.9) if rule == "sgd" else dict(lr=0.01)
    p = np.ones(40000, np.float32)
    g = np.full(40000, 0.5, np.float32)
    g[[0, 17, 39999]] = np.nan
    state = make_state(rule, h, [(40000,)])
    kernel_call(rule, [p], [g], state, step=1, h=h)
    assert np.isnan(p[[0, 17, 39999]]).all()
    assert np.isfinite(np.delete(p, [0, 17, 39999])).all()


RULE_NAMES = ["sgd", "adagrad", "rmsprop", "adam", "adamax", "nadam"]


@st.composite
def hyper(draw):
    rule = draw(st.sampled_from(RULE_NAMES))
    lr = draw(st.floats(1e-4, 1.0))
    wd = draw(st.sampled_from([0.0, draw(st.floats(1e-4, 0.5))]))
    maximize = draw(st.booleans())
    b1 = draw(st.floats(0.0, 0.99))
    b2 = draw(st.floats(0.5, 0.9999))
    eps = draw(st.sampled_from([1e-8, 1e-6, 1e-3]))
    if rule == "sgd":
        mom = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
        nesterov = mom > 0 and draw(st.booleans())
        damp = 0.0 if nesterov else draw(st.floats(0.0, 1.0))
        h = dict(lr=lr, momentum=mom, dampening=damp, nesterov=nesterov)
    elif rule == "adagrad":
        h = dict(lr=lr, lr_decay=draw(st.floats(0.0, 0.5)), eps=eps,
                 initial_accumulator_value=draw(st.floats(0.0, 1.0)))
    elif rule == "rmsprop":
        h = dict(lr=lr, alpha=draw(st.floats(0.5, 0.9999)), eps=eps,
                 momentum=draw(st.sampled_from([0.0, 0.9])), centered=draw(st.booleans()))
    elif rule == "adam":
        h = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=draw(st.booleans()),
                 decoupled=draw(st.booleans()))
    elif rule == "adamax":
        h = dict(lr=lr, beta1=b1, beta2=b2, eps=eps)
    else:
        h = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, decoupled=draw(st.booleans()),
                 momentum_decay=draw(st.sampled_from([0.0, 4e-3, 0.1])))
    if rule == "adam" and h["decoupled"] or rule == "nadam" and h["decoupled"]:
        wd = min(wd, 0.9 / lr)  # keep 1 - lr * wd positive, as any sane use does
    h.update(weight_decay=wd, maximize=maximize)
    return rule, h


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hyper(), st.lists(st.integers(0, 600), min_size=1, max_size=5),
       st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 100.0]),
       st.sampled_from([1.0, 0.25, -3.0]))
@example(("adagrad", dict(lr=1.0, lr_decay=0.0, eps=1e-3, initial_accumulator_value=0.0,
                          weight_decay=0.375, maximize=False)),
         [88], 13939409, 1.0, 1.0)  # cancellation in g + wd p amplified by lr / eps
def test_hypothesis_rules(rule_h, sizes, seed, gmag, grad_scale):
    rule, h = rule_h
    k = 8
    lockstep(rule, h, [(n,) for n in sizes], steps=4, rng=np.random.default_rng(seed), k=k,
             grad_scale=grad_scale, gmag=gmag)
