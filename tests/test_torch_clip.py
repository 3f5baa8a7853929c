"""optcore.torch.clip: every function against torch 2.13 itself and a float64 NumPy reference,
errors included; thread-count independence; bad input changes nothing; the table cache."""
import gc
import math
import warnings
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore

torch = pytest.importorskip("torch")

import optcore.torch as ot  # noqa: E402
from torch.nn import utils as tu  # noqa: E402

SHAPES = [(64, 33), (33,), (5, 3, 3, 3), (1,), (40_000,)]
P_VALUES = [2.0, 1.0, 0.0, 3.0, 0.5, -1.0, -0.5, math.inf, -math.inf]
INF = math.inf

# Tolerances. optcore accumulates in float64 and rounds the total once to float32, so it is
# within one float32 ulp (2**-23 relative) of a float64 reference. torch sums each tensor in
# float32 (pairwise/vectorized partial sums: error ~ log2(n) ulp, n <= 40000 here, so about
# 16 ulp ~ 2e-6) and for fractional/negative p raises to the power in float32 as well: 1e-5
# relative bounds torch's own error on these sizes.
REF_RTOL = 2.0 ** -23
TORCH_RTOL = 1e-5


def make_params(rng, shapes=SHAPES, scale=3.0, none_at=()):
    ps = []
    for i, s in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(s))
        if i not in none_at:
            p.grad = torch.from_numpy((rng.standard_normal(s) * scale).astype(np.float32))
        ps.append(p)
    return ps


def twin(params):
    """Parameters with copies of the grads (None kept), for torch to work on."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


def ref_total(arrays, p):
    """float64 NumPy p-norm of the per-tensor p-norms (torch's definition)."""
    a64 = [np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in arrays]
    if p == INF:
        return max(a.max() for a in a64)
    if p == -INF:
        return min(a.min() for a in a64)
    if p == 0:
        return float(sum(np.count_nonzero(a) > 0 for a in a64))
    with np.errstate(divide="ignore"):
        return float(sum(np.sum(a ** p) for a in a64) ** (1.0 / p))


def assert_clipped(a, b, coef):
    """``a`` is ``b`` times the clip coefficient ``coef`` (float64): one float32 product with a
    factor within ~2 ulp of the float64 one (3e-7 relative). A factor below float32's smallest
    normal (max_norm tiny beside the norm) holds only log2(coef / 2**-149) bits, so two roundings
    of nearly equal quotients can differ by one of its ulps, 2**-149 / coef relative; a
    subnormal product is exact to half its ulp, 2**-149."""
    rtol = 3e-7 + (2.0 ** -149 / coef if 0.0 < coef < 2.0 ** -126 else 0.0)
    np.testing.assert_allclose(a, b * np.float32(coef), rtol=rtol, atol=2.0 ** -149)


def assert_same(a, b):
    """Bitwise equality of two float32 tensors (NaN payloads aside)."""
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---- get_total_norm -----------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES + ["inf"])
def test_get_total_norm_matches_torch_and_float64(rng, p):
    ps = make_params(rng)
    gs = grads_of(ps)
    out = ot.get_total_norm(gs, p)
    assert isinstance(out, torch.Tensor) and out.shape == () and out.dtype == torch.float32
    pf = float(p)
    ref = ref_total([g.numpy() for g in gs], pf)
    assert out.item() == pytest.approx(ref, rel=REF_RTOL, abs=0)
    assert out.item() == pytest.approx(tu.get_total_norm(gs, p).item(), rel=TORCH_RTOL, abs=0)


def test_get_total_norm_input_forms(rng):
    gs = grads_of(make_params(rng))
    ref = ot.get_total_norm(gs)
    assert_same(ot.get_total_norm(tuple(gs)), ref)
    assert_same(ot.get_total_norm(g for g in gs), ref)
    assert_same(ot.get_total_norm(gs[0]), ot.get_total_norm([gs[0]]))
    assert ot.get_total_norm([]).item() == 0.0
    for foreach in (None, True, False):
        assert_same(ot.get_total_norm(gs, foreach=foreach), ref)


@pytest.mark.parametrize("p", P_VALUES)
def test_special_values_match_torch(p):
    cases = [
        [torch.zeros(3)],
        [torch.tensor([1.0, -2.0, 0.0]), torch.zeros(3)],
        [torch.tensor([float("nan"), 1.0])],
        [torch.tensor([INF, 1.0])],
        [torch.tensor([1.0, -2.0, 0.0]), torch.zeros(0)],
    ]
    # |x|^p overflows torch's float32 sums (not optcore's float64 ones): compare with float64
    for ts in ([torch.tensor([3e30, -4e30])], [torch.tensor([1e-30, 1e-40])]):
        assert ot.get_total_norm(ts, p).item() == pytest.approx(
            np.float32(ref_total(ts, p)), rel=REF_RTOL, abs=0)
    for ts in cases:
        try:
            want = tu.get_total_norm(ts, p)
        except RuntimeError:
            with pytest.raises(RuntimeError, match="empty tensor"):
                ot.get_total_norm(ts, p)
            continue
        got = ot.get_total_norm(ts, p)
        if math.isnan(want.item()):
            assert math.isnan(got.item())
        else:
            assert got.item() == pytest.approx(want.item(), rel=TORCH_RTOL, abs=0), ts


def test_error_if_nonfinite_same_message_as_torch():
    for p in (2.0, INF, 1.0):
        ts = [torch.tensor([1.0, float("nan")])]
        with pytest.raises(RuntimeError) as theirs:
            tu.get_total_norm(ts, p, error_if_nonfinite=True)
        with pytest.raises(RuntimeError) as ours:
            ot.get_total_norm(ts, p, error_if_nonfinite=True)
        assert str(ours.value) == str(theirs.value)
    assert ot.get_total_norm([torch.ones(3)], error_if_nonfinite=True).item() == pytest.approx(3 ** 0.5)


# ---- clip_grad_norm_ / clip_grads_with_norm_ --------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(rng, p, max_norm):
    ps = make_params(rng, none_at=(1,))
    qs = twin(ps)
    before = [g.clone() for g in grads_of(ps)]
    ours = ot.clip_grad_norm_(ps, max_norm, p)
    theirs = tu.clip_grad_norm_(qs, max_norm, p)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert ours.item() == pytest.approx(theirs.item(), rel=TORCH_RTOL, abs=0)
    assert ps[1].grad is None
    coef = min(1.0, max_norm / (ref_total([b.numpy() for b in before], p) + 1e-6))
    for a, b, q in zip(grads_of(ps), before, grads_of(qs)):
        assert_clipped(a.numpy(), b.numpy(), coef)
        np.testing.assert_allclose(a.numpy(), q.numpy(), rtol=TORCH_RTOL, atol=0)
    if coef == 1.0:
        for a, b in zip(grads_of(ps), before):
            assert_same(a, b)


@pytest.mark.parametrize("total", [torch.tensor(7.25), torch.tensor(7.25, dtype=torch.float64),
                                   torch.tensor(0.3), torch.tensor(float("nan")),
                                   torch.tensor(INF)])
def test_clip_grads_with_norm_bitwise_torch(rng, total):
    ps = make_params(rng, none_at=(2,))
    qs = twin(ps)
    assert ot.clip_grads_with_norm_(ps, 1.0, total) is None
    tu.clip_grads_with_norm_(qs, 1.0, total)
    for a, b in zip(grads_of(ps), grads_of(qs)):
        assert_same(a, b)


def test_clip_grad_norm_equals_total_then_scale(rng):
    ps = make_params(rng)
    qs = twin(ps)
    total = ot.clip_grad_norm_(ps, 0.25)
    t2 = ot.get_total_norm(grads_of(qs))
    assert_same(total, t2)
    tu.clip_grads_with_norm_(qs, 0.25, t2)  # torch's factor and product from our norm
    for a, b in zip(grads_of(ps), grads_of(qs)):
        assert_same(a, b)
    # clipping twice changes nothing more than a factor within eps of 1
    n2 = ot.get_total_norm(grads_of(ps))
    assert n2.item() == pytest.approx(0.25, rel=1e-5)


def test_clip_grad_norm_input_forms_and_empty(rng):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert ot.clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad.numpy(), [0.6, 0.8, 0, 0], rtol=1e-6)
    ps = make_params(rng)
    qs = twin(ps)
    ot.clip_grad_norm_((x for x in ps), 0.1)
    tu.clip_grad_norm_(qs, 0.1)
    for a, b in zip(grads_of(ps), grads_of(qs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=TORCH_RTOL)
    none = [torch.nn.Parameter(torch.zeros(3))]
    out = ot.clip_grad_norm_(none, 1.0)
    assert out.item() == 0.0 and out.shape == () and none[0].grad is None
    with pytest.warns(UserWarning, match="empty generator"):
        assert ot.clip_grad_norm_((x for x in []), 1.0).item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ot.clip_grad_norm_([], 1.0)
    assert ot.clip_grad_norm_(ps, torch.tensor(1.0)).shape == ()


def test_clip_grad_norm_nonfinite_as_torch(rng):
    for bad in (float("nan"), INF):
        ps = make_params(rng)
        ps[0].grad[0, 0] = bad
        qs = twin(ps)
        before = [g.clone() for g in grads_of(ps)]
        with pytest.raises(RuntimeError) as ours:
            ot.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
        with pytest.raises(RuntimeError) as theirs:
            tu.clip_grad_norm_(qs, 1.0, error_if_nonfinite=True)
        assert str(ours.value) == str(theirs.value)
        for a, b in zip(grads_of(ps), before):
            assert_same(a, b)
        # without the flag: scaled by a NaN (or zero) factor, as torch
        ot.clip_grad_norm_(ps, 1.0)
        tu.clip_grad_norm_(qs, 1.0)
        for a, b in zip(grads_of(ps), grads_of(qs)):
            assert_same(a, b)


def test_channels_last_and_views_are_clipped_in_place():
    base = torch.arange(1, 2 * 3 * 4 * 5 + 1, dtype=torch.float32).reshape(2, 3, 4, 5)
    cl = base.clone().to(memory_format=torch.channels_last)
    p1 = torch.nn.Parameter(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    p1.grad = cl
    buf = torch.arange(20, dtype=torch.float32)
    p2 = torch.nn.Parameter(torch.zeros(5))
    p2.grad = buf[10:15]
    q1, q2 = twin([p1, p2])
    ot.clip_grad_norm_([p1, p2], 3.0)
    tu.clip_grad_norm_([q1, q2], 3.0)
    np.testing.assert_allclose(p1.grad.numpy(), q1.grad.numpy(), rtol=TORCH_RTOL)
    np.testing.assert_allclose(buf[10:15].numpy(), q2.grad.numpy(), rtol=TORCH_RTOL)
    assert p1.grad.data_ptr() == cl.data_ptr()
    np.testing.assert_array_equal(buf[:10].numpy(), np.arange(10))


def test_version_counter_is_bumped_like_torch(rng):
    ps = make_params(rng)
    v = [g._version for g in grads_of(ps)]
    ot.clip_grad_norm_(ps, 1e-3)
    assert all(g._version > w for g, w in zip(grads_of(ps), v))
    v = [g._version for g in grads_of(ps)]
    ot.clip_grad_value_(ps, 1e-4)
    assert all(g._version > w for g, w in zip(grads_of(ps), v))


# ---- clip_grad_value_ -----------------------------------------------------------------------


@pytest.mark.parametrize("clip_value", [0.0, 0.7, 2.5, INF, torch.tensor(1.5)])
def test_clip_grad_value_bitwise_torch(rng, clip_value):
    ps = make_params(rng, none_at=(0,))
    ps[1].grad[3] = float("nan")
    ps[2].grad[0, 0, 0, 0] = -INF
    qs = twin(ps)
    assert ot.clip_grad_value_(ps, clip_value) is None
    tu.clip_grad_value_(qs, clip_value)
    assert ps[0].grad is None
    for a, b in zip(grads_of(ps), grads_of(qs)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # NaN where torch has NaN
    g = torch.tensor([-3.0, 0.5, 9.0])
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = g
    ot.clip_grad_value_(p, 1.0)
    np.testing.assert_array_equal(g.numpy(), [-1.0, 0.5, 1.0])


# ---- hypothesis: shapes, norm types, max_norm ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=6),
    p=st.sampled_from(P_VALUES),
    max_norm=st.floats(0.0, 1e3),
    seed=st.integers(0, 2**31),
)
def test_hypothesis_clip_grad_norm(sizes, p, max_norm, seed):
    rng = np.random.default_rng(seed)
    ps = make_params(rng, shapes=[(n,) for n in sizes], scale=rng.uniform(1e-3, 1e3))
    if any(n == 0 for n in sizes) and (p < 0 or p == INF):
        with pytest.raises(RuntimeError, match="empty tensor"):
            ot.clip_grad_norm_(ps, max_norm, p)
        return
    qs = twin(ps)
    before = [g.clone() for g in grads_of(ps)]
    total = ot.clip_grad_norm_(ps, max_norm, p)
    theirs = tu.clip_grad_norm_(qs, max_norm, p)
    ref = ref_total([b.numpy() for b in before], p)
    assert total.item() == pytest.approx(np.float32(ref), rel=REF_RTOL, abs=0)
    # for p < 1 the exponent 1/p (|1/p| up to 2 here) amplifies torch's float32 summation
    # error, over up to 6 x 70000 elements: a failure at 1.000008 x TORCH_RTOL was seen
    rtol = TORCH_RTOL if p >= 1.0 or p == 0.0 else 4 * TORCH_RTOL
    assert total.item() == pytest.approx(theirs.item(), rel=rtol, abs=0)
    coef = min(1.0, max_norm / (ref + 1e-6))
    for a, b, q in zip(grads_of(ps), before, grads_of(qs)):
        assert_clipped(a.numpy(), b.numpy(), coef)
        np.testing.assert_allclose(a.numpy(), q.numpy(), rtol=rtol, atol=1e-30)


# ---- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
def test_one_and_two_threads_bitwise(p):
    shapes = [(300_000,), (70_001,), (17,), (2, 3, 4, 5)]  # above the serial threshold
    results = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        ps = make_params(np.random.default_rng(7), shapes=shapes)
        t = ot.clip_grad_norm_(ps, 0.5, p)
        ot.clip_grad_value_(ps, 1e-3)
        results.append((t.item(), [g.clone() for g in grads_of(ps)]))
    (t1, g1), (t2, g2) = results
    assert np.float32(t1).tobytes() == np.float32(t2).tobytes()
    for a, b in zip(g1, g2):
        assert_same(a, b)


# ---- bad input: a clear error, nothing written -------------------------------------------------


def _bad_cases():
    def dtype64(ps):
        ps[2] = torch.nn.Parameter(ps[2].detach().double())
        ps[2].grad = torch.ones_like(ps[2])
        return TypeError, r"parameters\[2\]\.grad must have dtype torch.float32, torch.bfloat16, torch.float16"

    def sparse(ps):
        p = torch.nn.Parameter(torch.zeros(4, 4))
        p.grad = torch.eye(4).to_sparse()
        ps.insert(1, p)
        return TypeError, r"parameters\[1\]\.grad is a torch.sparse_coo"

    def nondense(ps):
        p = torch.nn.Parameter(torch.zeros(4, 3))
        p.grad = torch.ones(4, 6)[:, ::2]
        ps.append(p)
        return ValueError, r"parameters\[5\]\.grad is not dense"

    def shared(ps):
        buf = torch.ones(20)
        a, b = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
        a.grad, b.grad = buf[:10], buf[5:15]
        ps += [a, b]
        return ValueError, r"parameters\[5\]\.grad and parameters\[6\]\.grad share memory"

    return {"float64": dtype64, "sparse": sparse, "nondense": nondense, "shared": shared}


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("fn", ["norm", "value", "with_norm"])
def test_bad_tensors_raise_and_change_nothing(rng, case, fn):
    ps = make_params(rng)
    error, match = _bad_cases()[case](ps)
    before = [(g, g.clone()) for g in grads_of(ps)]
    with pytest.raises(error, match=match):
        if fn == "norm":
            ot.clip_grad_norm_(ps, 1e-3)
        elif fn == "value":
            ot.clip_grad_value_(ps, 1e-3)
        else:
            ot.clip_grads_with_norm_(ps, 1e-3, torch.tensor(100.0))
    for g, b in before:
        assert torch.equal(g.to_dense(), b.to_dense())


def test_get_total_norm_names_the_tensor_and_allows_shared_memory():
    buf = torch.ones(20)
    assert ot.get_total_norm([buf[:10], buf[5:15]], 1.0).item() == 20.0
    with pytest.raises(TypeError, match=r"tensors\[1\] must have dtype"):
        ot.get_total_norm([torch.ones(3), torch.ones(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="tensors must be a torch.Tensor|tensors\\[0\\] must be"):
        ot.get_total_norm([np.ones(3, np.float32)])


@pytest.mark.parametrize("call, error, match", [
    (lambda ps: ot.clip_grad_norm_(ps, float("nan")), ValueError, "max_norm"),
    (lambda ps: ot.clip_grad_norm_(ps, -1.0), ValueError, "max_norm"),
    (lambda ps: ot.clip_grad_norm_(ps, "1"), TypeError, "max_norm"),
    (lambda ps: ot.clip_grad_norm_(ps, 1.0, float("nan")), ValueError, "norm_type"),
    (lambda ps: ot.clip_grad_norm_(ps, 1.0, "two"), ValueError, "norm_type"),
    (lambda ps: ot.clip_grad_norm_(ps, 1.0, error_if_nonfinite=1), TypeError, "error_if_nonfinite"),
    (lambda ps: ot.clip_grad_norm_(ps, 1.0, foreach="yes"), TypeError, "foreach"),
    (lambda ps: ot.clip_grad_norm_(ps, torch.ones(2)), TypeError, "max_norm"),
    (lambda ps: ot.clip_grad_value_(ps, -0.5), ValueError, "clip_value"),
    (lambda ps: ot.clip_grad_value_(ps, float("nan")), ValueError, "clip_value"),
    (lambda ps: ot.clip_grads_with_norm_(ps, -1.0, torch.tensor(2.0)), ValueError, "max_norm"),
    (lambda ps: ot.clip_grads_with_norm_(ps, 1.0, torch.ones(3)), TypeError, "total_norm"),
    (lambda ps: ot.get_total_norm(grads_of(ps), float("nan")), ValueError, "norm_type"),
])
def test_bad_arguments_raise_and_change_nothing(rng, call, error, match):
    ps = make_params(rng)
    before = [g.clone() for g in grads_of(ps)]
    with pytest.raises(error, match=match):
        call(ps)
    for g, b in zip(grads_of(ps), before):
        assert_same(g, b)


# ---- the table cache ------------------------------------------------------------------------


def test_cache_follows_new_and_moved_grads(rng):
    ps = make_params(rng)
    for step in range(6):
        qs = twin(ps)
        if step == 1:      # set_to_none and a fresh backward: new grad objects
            for p in ps:
                p.grad = p.grad.clone() * 3
            qs = twin(ps)
        elif step == 2:    # same grad object, new storage
            ps[0].grad.data = torch.full_like(ps[0].grad, 2.0)
            qs = twin(ps)
        elif step == 3:    # grad written in place (zero_grad(set_to_none=False) + backward)
            ps[4].grad.mul_(-5.0)
            qs = twin(ps)
        elif step == 4:    # a grad freed (None): that parameter is skipped
            ps[3].grad = None
            qs = twin(ps)
        ours = ot.clip_grad_norm_(ps, 0.5)
        theirs = tu.clip_grad_norm_(qs, 0.5)
        assert ours.item() == pytest.approx(theirs.item(), rel=TORCH_RTOL)
        for a, b in zip(grads_of(ps), grads_of(qs)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=TORCH_RTOL)
    ps[1] = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ps[1].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        ot.clip_grad_norm_(ps, 0.5)


def test_cache_is_reused_while_nothing_changed(rng):
    from optcore.torch import clip as oclip
    ps = make_params(rng)
    gs = grads_of(ps)
    first = oclip._table(gs, True, str)
    assert oclip._table(grads_of(ps), True, str) is first
    ps[2].grad = ps[2].grad.clone()
    assert oclip._table(grads_of(ps), True, str) is not first


def test_cache_keeps_no_gradient_alive(rng):
    ps = make_params(rng)
    ot.clip_grad_norm_(ps, 1.0)
    ot.clip_grad_value_(ps, 1.0)
    refs = [weakref.ref(g) for g in grads_of(ps)]
    for p in ps:
        p.grad = None
    gc.collect()
    assert all(r() is None for r in refs)


def test_zero_dim_and_empty_grads_match_torch():
    shapes = [(), (0,), (3, 0), (7,)]
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, v in zip(ps, (2.0, 0.0, 0.0, 1.5)):
        p.grad = torch.full_like(p, v)
    qs = twin(ps)
    for p in (2.0, 1.0, 0.0, 3.0):
        assert ot.get_total_norm(grads_of(ps), p).item() == pytest.approx(
            tu.get_total_norm(grads_of(qs), p).item(), rel=REF_RTOL)
    ours = ot.clip_grad_norm_(ps, 1.0)
    theirs = tu.clip_grad_norm_(qs, 1.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=REF_RTOL)
    for a, b in zip(grads_of(ps), grads_of(qs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=3e-7)


# 16-bit gradients. optcore rounds its float64 norm once to the 16-bit dtype; torch rounds
# each tensor's norm to it and then the norm of those: the two are within 2 units of the
# dtype's last place (2 * 2^-8 relative for bfloat16, 2 * 2^-11 for float16).
HALF_RTOL = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}


def half_params(rng, dtypes, shapes=((300, 7), (40_000,), (5,))):
    ps = []
    for s, d in zip(shapes, dtypes):
        p = torch.nn.Parameter(torch.zeros(s, dtype=d))
        p.grad = torch.from_numpy((rng.standard_normal(s) * 0.05).astype(np.float32)).to(d)
        ps.append(p)
    return ps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True])
def test_16bit_grads_clip_grad_norm_against_torch_and_widened(rng, dtype, mixed):
    dtypes = [dtype, torch.float32 if mixed else dtype, dtype]
    ps = half_params(rng, dtypes)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    wide = [p.grad.float().clone() for p in ps]
    got = ot.clip_grad_norm_(ps, 0.5)
    want = tu.clip_grad_norm_(ref, 0.5)
    assert got.dtype == want.dtype == (torch.float32 if mixed else dtype)
    # the norm: of the exact float32 widening (float64 accumulation, one rounding)
    exact = math.sqrt(sum(float((w.double() ** 2).sum()) for w in wide))
    assert got.item() == torch.scalar_tensor(exact, dtype=got.dtype).item()
    np.testing.assert_allclose(got.item(), want.item(), rtol=HALF_RTOL[dtype])
    # the scaling: torch's factor from the returned norm, float32 product rounded to nearest
    coef = torch.clamp(0.5 / (got + 1e-6), max=1.0).item()
    for p, w in zip(ps, wide):
        assert torch.equal(p.grad, (w * np.float32(coef)).to(p.grad.dtype))
    # given the same norm, clip_grads_with_norm_ is bitwise torch's
    ps2 = half_params(rng, dtypes)
    ref2 = [torch.nn.Parameter(p.detach().clone()) for p in ps2]
    for r, p in zip(ref2, ps2):
        r.grad = p.grad.clone()
    total = torch.tensor(3.0, dtype=got.dtype)
    ot.clip_grads_with_norm_(ps2, 0.5, total)
    tu.clip_grads_with_norm_(ref2, 0.5, total)
    for p, r in zip(ps2, ref2):
        assert torch.equal(p.grad, r.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_grads_clip_grad_value_and_total_norm_bitwise_torch(rng, dtype):
    ps = half_params(rng, [dtype, torch.float32, dtype])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    ps[1].grad[3] = float("nan")
    ref[1].grad[3] = float("nan")
    ot.clip_grad_value_(ps, 0.03)
    tu.clip_grad_value_(ref, 0.03)
    for p, r in zip(ps, ref):
        assert torch.equal(p.grad.nan_to_num(7.0), r.grad.nan_to_num(7.0))
    for p_norm in (1.0, INF, 3.0):
        got = ot.get_total_norm([p.grad for p in ps[::2]], p_norm)
        want = tu.get_total_norm([p.grad for p in ps[::2]], p_norm)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got.item(), want.item(), rtol=HALF_RTOL[dtype])


def test_16bit_grads_bad_input_changes_nothing(rng):
    ps = half_params(rng, [torch.bfloat16] * 3)
    buf = torch.ones(20, dtype=torch.bfloat16)
    a, b = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16)), torch.nn.Parameter(
        torch.zeros(10, dtype=torch.bfloat16))
    a.grad, b.grad = buf[:10], buf[5:15]
    ps += [a, b]
    before = [g.clone() for g in grads_of(ps)]
    with pytest.raises(ValueError, match=r"parameters\[3\]\.grad and parameters\[4\]\.grad share memory"):
        ot.clip_grad_norm_(ps, 1e-3)
    for g, bf in zip(grads_of(ps), before):
        assert torch.equal(g, bf)
