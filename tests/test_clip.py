"""optcore.clip: each function against a float64 NumPy reference and against torch."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore import clip

SHAPES = [(64, 33), (33,), (5, 3, 3, 3), (1,), (40_000,)]


def make(rng, shapes=SHAPES, scale=3.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def ref_norm(arrays, norm_type=2.0):
    if norm_type == 2.0:
        return math.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays))
    return max(float(np.abs(a).max()) for a in arrays)


def ref_factor(norm, max_norm):
    return min(1.0, max_norm / (norm + 1e-6))


def ref_agc(p, g, clipping, eps):
    """float64 NumPy AGC (Brock et al. 2021) with torch-layout units along axis 0."""
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    if g.ndim < 2:
        pn = np.sqrt(np.sum(p64**2))
        gn = np.sqrt(np.sum(g64**2))
        mx = clipping * max(pn, eps)
        return g64 * (mx / max(gn, 1e-6)) if gn > mx else g64
    p2, g2 = p64.reshape(p.shape[0], -1), g64.reshape(g.shape[0], -1)
    pn = np.sqrt(np.sum(p2**2, axis=1, keepdims=True))
    gn = np.sqrt(np.sum(g2**2, axis=1, keepdims=True))
    mx = clipping * np.maximum(pn, eps)
    return np.where(gn > mx, g2 * (mx / np.maximum(gn, 1e-6)), g2).reshape(g.shape)


@pytest.mark.parametrize("norm_type", [2, math.inf])
def test_clip_by_global_norm_matches_float64(rng, norm_type):
    g = make(rng)
    before = [a.copy() for a in g]
    n = clip.clip_by_global_norm_(g, 1.5, norm_type=norm_type)
    ref = ref_norm(before, norm_type)
    assert n == pytest.approx(ref, rel=1e-6)
    f = np.float32(ref_factor(ref, 1.5))
    for a, b in zip(g, before):
        # the kernel multiplies by the float32 factor: one rounding per element; the factor
        # itself agrees with the reference to ~1e-7 relative
        np.testing.assert_allclose(a, b * f, rtol=3e-7, atol=0)


def test_no_change_below_threshold(rng):
    g = make(rng, scale=1e-3)
    before = [a.copy() for a in g]
    clip.clip_by_global_norm_(g, 10.0)
    clip.clip_by_norm_(g, 10.0)
    clip.clip_by_value_(g, 10.0)
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, b)


def test_clip_by_norm_per_tensor(rng):
    g = make(rng)
    g[3][...] = 0.001  # one tensor below the threshold
    before = [a.copy() for a in g]
    norms = clip.clip_by_norm_(g, 2.0)
    ref = [math.sqrt(np.sum(b.astype(np.float64) ** 2)) for b in before]
    np.testing.assert_allclose(norms, ref, rtol=1e-6)
    for a, b, n in zip(g, before, ref):
        np.testing.assert_allclose(a, b * np.float32(ref_factor(n, 2.0)), rtol=3e-7)
    np.testing.assert_array_equal(g[3], before[3])
    after = [math.sqrt(np.sum(a.astype(np.float64) ** 2)) for a in g]
    assert max(after) <= 2.0 * (1 + 1e-6)


def test_clip_by_value(rng):
    g = make(rng)
    before = [a.copy() for a in g]
    m = clip.clip_by_value_(g, 0.5)
    assert m == max(float(np.abs(b).max()) for b in before)
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, np.clip(b, -0.5, 0.5))


def test_clip_by_value_keeps_nan():
    g = np.array([np.nan, 3.0, -np.inf, 0.1], np.float32)
    assert math.isnan(clip.clip_by_value_(g, 1.0))
    assert math.isnan(g[0]) and g[1:].tolist() == [1.0, -1.0, np.float32(0.1)]


@pytest.mark.parametrize("clipping,eps", [(0.01, 1e-3), (0.5, 1e-3), (0.02, 10.0)])
def test_adaptive_clip_matches_numpy(rng, clipping, eps):
    shapes = [(64, 33), (33,), (8, 3, 3, 3), (2, 5)]
    p = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    p[3][0] = 0.0  # a zero-initialised unit: eps keeps it from freezing
    g = make(rng, shapes, scale=0.05)
    before = [a.copy() for a in g]
    norms = clip.adaptive_clip_(p, g, clipping, eps)
    for a, b, q, n in zip(g, before, p, norms):
        # factor in float64 rounded to float32, times float32 g: ~2 roundings
        np.testing.assert_allclose(a, ref_agc(q, b, clipping, eps), rtol=5e-7, atol=1e-30)
        ref_n = (np.sqrt(np.sum(b.astype(np.float64) ** 2)) if b.ndim < 2 else
                 np.sqrt(np.sum(b.astype(np.float64).reshape(b.shape[0], -1) ** 2, axis=1)))
        np.testing.assert_allclose(n, ref_n, rtol=1e-6)
        assert n.shape == (() if b.ndim < 2 else (b.shape[0],))


def test_clipping_twice_changes_nothing_more_than_eps(rng):
    """Idempotence, up to the 1e-6 that the eps in the factor and float32 rounding leave."""
    p = make(rng, scale=1.0)
    for fn in (lambda g: clip.clip_by_global_norm_(g, 1.0), lambda g: clip.clip_by_norm_(g, 1.0),
               lambda g: clip.adaptive_clip_(p, g, 0.01)):
        g = make(rng)
        fn(g)
        once = [a.copy() for a in g]
        fn(g)
        for a, b in zip(g, once):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
    g = make(rng)
    clip.clip_by_value_(g, 0.3)
    once = [a.copy() for a in g]
    clip.clip_by_value_(g, 0.3)
    for a, b in zip(g, once):
        np.testing.assert_array_equal(a, b)


def test_arena_input():
    params = optcore.Parameters({"w": (10, 4), "b": (4,)})
    params.grads["w"] = 3.0
    params.grads["b"] = 4.0
    ref = math.sqrt(40 * 9 + 4 * 16)
    assert clip.global_norm(params.grads) == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(clip.tensor_norms(params.grads), [math.sqrt(360), 8.0])
    clip.clip_by_global_norm_(params.grads, 1.0)
    assert clip.global_norm(params.grads) == pytest.approx(1.0, rel=1e-5)
    params["w"] = 1.0
    norms = clip.adaptive_clip_(params, params.grads, 0.1)
    assert len(norms) == 2


def test_error_if_nonfinite_changes_nothing(rng):
    g = make(rng)
    g[2][1, 1, 1, 1] = np.nan
    before = [a.copy() for a in g]
    with pytest.raises(FloatingPointError, match=r"grads\[2\]"):
        clip.clip_by_global_norm_(g, 1.0, error_if_nonfinite=True)
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_propagates_as_torch():
    g = [np.array([1.0, np.inf], np.float32), np.array([2.0], np.float32)]
    assert clip.clip_by_global_norm_(g, 1.0) == math.inf
    assert g[0][0] == 0.0 and g[1][0] == 0.0  # factor 1 / inf = 0, as torch (inf * 0 = NaN)
    assert math.isnan(g[0][1])


def test_bitwise_same_for_1_and_2_threads(rng):
    out = []
    for nt in (1, 2):
        optcore.set_num_threads(nt)
        g = [a * 100 for a in make(np.random.default_rng(7), [(300_000,), (70_000,), (3,)])]
        n = clip.clip_by_global_norm_(g, 1.0)
        out.append((n, b"".join(a.tobytes() for a in g)))
    assert out[0] == out[1]


def test_bad_input_changes_nothing(rng):
    g = make(rng)
    p = make(rng)
    before = [a.copy() for a in g]
    with pytest.raises(ValueError, match="max_norm"):
        clip.clip_by_global_norm_(g, -1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip.clip_by_norm_(g, float("nan"))
    with pytest.raises(TypeError, match="max_norm"):
        clip.clip_by_global_norm_(g, None)
    with pytest.raises(ValueError, match="limit"):
        clip.clip_by_value_(g, -0.1)
    with pytest.raises(ValueError, match="norm_type"):
        clip.clip_by_global_norm_(g, 1.0, norm_type=3)
    with pytest.raises(TypeError, match="error_if_nonfinite"):
        clip.clip_by_global_norm_(g, 1.0, error_if_nonfinite="yes")
    with pytest.raises(ValueError, match="clipping"):
        clip.adaptive_clip_(p, g, 0.0)
    with pytest.raises(ValueError, match="eps"):
        clip.adaptive_clip_(p, g, 0.01, -1.0)
    with pytest.raises(ValueError, match="shape"):
        clip.adaptive_clip_([a.reshape(-1) for a in p], g)
    with pytest.raises(ValueError, match="params"):
        clip.adaptive_clip_(p[:2], g)
    with pytest.raises(ValueError, match="share memory"):
        clip.adaptive_clip_(g, g)
    with pytest.raises(ValueError, match="share memory"):
        clip.clip_by_global_norm_([g[0], g[0]], 1.0)
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        clip.clip_by_value_([g[0], g[1].astype(np.float64)], 1.0)
    ro = g[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        clip.clip_by_global_norm_([g[1], ro], 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        clip.clip_by_value_(g[0][:, ::2], 1.0)
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, b)


def test_policies():
    assert clip.GlobalNorm(1.0) == clip.GlobalNorm(1, norm_type=2)
    assert clip.GlobalNorm(1.0) != clip.PerTensorNorm(1.0)
    assert repr(clip.Value(0.5)) == "Value(limit=0.5)"
    assert clip.GlobalNorm(2.0, "inf").norm_type == math.inf
    assert hash(clip.Adaptive()) == hash(clip.Adaptive(0.01, 1e-3))
    with pytest.raises(AttributeError):
        clip.GlobalNorm(1.0).max_norm = 2.0
    for bad in (lambda: clip.GlobalNorm(-1.0), lambda: clip.PerTensorNorm(float("nan")),
                lambda: clip.Value(-2.0), lambda: clip.Adaptive(0.0), lambda: clip.Adaptive(0.1, -1.0),
                lambda: clip.GlobalNorm(1.0, norm_type=1)):
        with pytest.raises(ValueError):
            bad()
    g = [np.full(4, 2.0, np.float32)]
    assert clip.GlobalNorm(1.0).clip_(g) == 4.0
    assert clip.Value(0.1).clip_(g) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(TypeError, match="params"):
        clip.Adaptive().clip_(g)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=5),
    max_norm=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_global_clip(sizes, max_norm, seed):
    r = np.random.default_rng(seed)
    g = [r.standard_normal(n).astype(np.float32) for n in sizes]
    before = [a.copy() for a in g]
    n = clip.clip_by_global_norm_(g, max_norm)
    ref = ref_norm(before)
    assert n == pytest.approx(ref, rel=1e-6)
    f = ref_factor(ref, max_norm)
    for a, b in zip(g, before):
        np.testing.assert_allclose(a, b.astype(np.float64) * f, rtol=5e-7, atol=0)


# ---- torch ----------------------------------------------------------------------------


def torch_params(torch, arrays):
    ps = []
    for a in arrays:
        p = torch.zeros(a.shape, dtype=torch.float32, requires_grad=True)
        p.grad = torch.tensor(a.copy())
        ps.append(p)
    return ps


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("foreach", [False, True])
def test_vs_torch_clip_grad_norm(rng, norm_type, foreach):
    torch = pytest.importorskip("torch")
    g = make(rng)
    ps = torch_params(torch, g)
    tn = torch.nn.utils.clip_grad_norm_(ps, 0.7, norm_type=norm_type, foreach=foreach)
    n = clip.clip_by_global_norm_(g, 0.7, norm_type=norm_type)
    # torch accumulates the norm in float32 (reduced per tensor, then over tensors)
    assert n == pytest.approx(float(tn), rel=1e-6)
    for a, p in zip(g, ps):
        # the factors differ by the relative error of torch's float32 norm (a few 1e-7)
        np.testing.assert_allclose(a, p.grad.numpy(), rtol=1e-6, atol=0)


def test_vs_torch_clip_grad_value(rng):
    torch = pytest.importorskip("torch")
    g = make(rng)
    g[0][0, 0] = np.nan
    ps = torch_params(torch, g)
    torch.nn.utils.clip_grad_value_(ps, 0.25)
    clip.clip_by_value_(g, 0.25)
    for a, p in zip(g, ps):
        np.testing.assert_array_equal(a, p.grad.numpy())


def test_long_lists_checked_fully():
    """The fast buffer-protocol check of long lists reports the same errors as the full one."""
    base = np.ones(2000, np.float32)
    g = [np.ones(10, np.float32) for _ in range(998)] + [base[:1000], base[1000:]]
    before = [a.copy() for a in g]
    clip.clip_by_value_(g, 2.0)  # adjacent views do not overlap
    bad = list(g)
    bad[500] = np.ones(10)
    with pytest.raises(TypeError, match=r"grads\[500\] must have dtype float32"):
        clip.clip_by_global_norm_(bad, 1.0)
    bad[500] = np.ones((4, 4), np.float32).T
    with pytest.raises(ValueError, match=r"grads\[500\] must be C-contiguous"):
        clip.clip_by_norm_(tuple(bad), 1.0)
    bad[500] = [1.0]
    with pytest.raises(TypeError, match=r"grads\[500\]"):
        clip.clip_by_value_(bad, 1.0)
    ro = np.ones(10, np.float32)
    ro.flags.writeable = False
    bad[500] = ro
    with pytest.raises(ValueError, match=r"grads\[500\] is read-only"):
        clip.clip_by_value_(bad, 1.0)
    assert clip.global_norm(bad) > 0  # read-only is fine for a norm
    bad[500] = base[999:1009]
    with pytest.raises(ValueError, match=r"grads\[\d+\] and grads\[\d+\] share memory"):
        clip.clip_by_value_(bad, 1.0)
    with pytest.raises(ValueError, match=r"params\[999\] and grads\[999\] share memory"):
        clip.adaptive_clip_([np.zeros(10, np.float32) for _ in range(999)] + [base[1000:]],
                            [np.zeros(10, np.float32) for _ in range(999)] + [base[1000:]])
    for a, b in zip(g, before):
        np.testing.assert_array_equal(a, b)
