"""Clipping, non-finite policies, gradient accumulation and loss scaling inside Optimizer.step."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore.clip import Adaptive, GlobalNorm, PerTensorNorm, Value
from optcore.scaling import GradScaler

SHAPES = {"w": (64, 33), "b": (33,), "c": (5, 3, 3, 3)}


def arena(rng, shapes=SHAPES):
    P = optcore.Parameters(shapes)
    for n, s in shapes.items():
        P[n] = rng.standard_normal(s)
    return P


def fill_grads(P, rng, scale=3.0):
    for n in P:
        P.grads[n] = rng.standard_normal(P[n].shape) * scale


def snapshot(opt, P):
    """Everything a step may change, as bytes (the skip counter apart)."""
    state = opt.state_dict()
    del state["skipped_steps"]
    return (P.flat.tobytes(), P.grads.flat.tobytes(),
            {k: np.asarray(v).tobytes() for k, v in state.items()}, opt.state_steps)


# ---- clipping --------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_adamw_global_norm_equals_torch(rng, norm_type):
    torch = pytest.importorskip("torch")
    P = arena(rng)
    tp = [torch.tensor(P[n].copy(), requires_grad=True) for n in P]
    opt = optcore.AdamW(P, lr=1e-2, clip=GlobalNorm(1.0, norm_type))
    topt = torch.optim.AdamW(tp, lr=1e-2)
    for _ in range(30):
        fill_grads(P, rng)
        for n, x in zip(P, tp):
            x.grad = torch.tensor(P.grads[n].copy())
        info = opt.step()
        tn = torch.nn.utils.clip_grad_norm_(tp, 1.0, norm_type=norm_type)
        topt.step()
        assert info.grad_norm == pytest.approx(float(tn), rel=1e-6)
        assert info.clip_factor < 1.0 and info.applied and not info.skipped
    for n, x in zip(P, tp):
        # 30 Adam steps with |p| ~ 1 and clip factors equal to ~1e-7: agreement to 1e-5 relative
        np.testing.assert_allclose(P[n], x.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_buffer_not_rewritten(rng):
    P = arena(rng)
    fill_grads(P, rng)
    g0 = P.grads.flat.copy()
    for clip in (GlobalNorm(0.1), PerTensorNorm(0.1), Value(0.01)):
        opt = optcore.Adam(P, clip=clip, nonfinite="skip")
        opt.step()
        np.testing.assert_array_equal(P.grads.flat, g0)


def sgd_reference(P, grads, lr):
    return {n: P[n].astype(np.float64) - lr * grads[n] for n in P}


def test_per_tensor_norm_matches_numpy(rng):
    P = arena(rng)
    fill_grads(P, rng)
    g = {n: P.grads[n].astype(np.float64) for n in P}
    clipped = {}
    for n in P:
        norm = np.sqrt(np.sum(g[n] ** 2))
        clipped[n] = g[n] * min(1.0, 2.0 / (norm + 1e-6))
    ref = sgd_reference(P, clipped, 0.1)
    opt = optcore.SGD(P, lr=0.1, clip=PerTensorNorm(2.0))
    info = opt.step()
    for n in P:
        np.testing.assert_allclose(P[n], ref[n], rtol=1e-6, atol=1e-7)
    assert info.clip_factor == pytest.approx(min(2.0 / np.sqrt(np.sum(g[n] ** 2)) for n in P), rel=1e-6)
    assert info.grad_norm == pytest.approx(math.sqrt(sum(np.sum(x**2) for x in g.values())), rel=1e-6)


def test_value_clip_matches_torch_clip_grad_value(rng):
    torch = pytest.importorskip("torch")
    P = arena(rng)
    fill_grads(P, rng)
    tp = [torch.tensor(P[n].copy(), requires_grad=True) for n in P]
    for n, x in zip(P, tp):
        x.grad = torch.tensor(P.grads[n].copy())
    torch.nn.utils.clip_grad_value_(tp, 0.5)
    torch.optim.Adam(tp, lr=1e-2).step()
    info = optcore.Adam(P, lr=1e-2, clip=Value(0.5)).step()
    assert info.grad_norm is None and info.clip_factor == 1.0
    for n, x in zip(P, tp):
        np.testing.assert_allclose(P[n], x.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_adaptive_matches_numpy(rng):
    P = arena(rng)
    fill_grads(P, rng, scale=0.1)
    g = {n: P.grads[n].astype(np.float64) for n in P}
    ref_g = {}
    for n in P:
        p = P[n].astype(np.float64)
        if p.ndim < 2:
            pn, gn = np.sqrt(np.sum(p**2)), np.sqrt(np.sum(g[n] ** 2))
        else:
            pn = np.sqrt(np.sum(p.reshape(p.shape[0], -1) ** 2, axis=1))
            gn = np.sqrt(np.sum(g[n].reshape(p.shape[0], -1) ** 2, axis=1))
            shape = (p.shape[0],) + (1,) * (p.ndim - 1)
            pn, gn = pn.reshape(shape), gn.reshape(shape)
        mx = 0.01 * np.maximum(pn, 1e-3)
        ref_g[n] = np.where(gn > mx, g[n] * mx / np.maximum(gn, 1e-6), g[n])
    ref = sgd_reference(P, ref_g, 0.5)
    g0 = P.grads.flat.copy()
    info = optcore.SGD(P, lr=0.5, clip=Adaptive(0.01), nonfinite="raise").step()
    assert info.clip_factor < 1.0
    assert info.grad_norm == pytest.approx(math.sqrt(sum(np.sum(x**2) for x in g.values())), rel=1e-6)
    np.testing.assert_array_equal(P.grads.flat, g0)
    for n in P:
        np.testing.assert_allclose(P[n], ref[n], rtol=1e-6, atol=1e-7)


def test_adaptive_with_accumulation_and_scaler_equals_explicit(rng):
    """Adam + Adaptive over 2 micro-batches with a loss scale == adaptive_clip_ on the mean."""
    P1 = arena(rng)
    P2 = optcore.Parameters.from_arrays({n: P1[n] for n in P1})
    opt1 = optcore.Adam(P1, lr=1e-2, clip=Adaptive(0.02), accumulate=2)
    opt2 = optcore.Adam(P2, lr=1e-2)
    scaler = optcore.GradScaler(init_scale=4.0, growth_interval=100)
    for _ in range(3):
        micro = [{n: (rng.standard_normal(P1[n].shape) * 0.1).astype(np.float32) for n in P1}
                 for _ in range(2)]
        for m in micro:
            for n in P1:
                P1.grads[n] = m[n] * np.float32(4.0)
            opt1.step(scaler=scaler)
        for n in P2:
            P2.grads[n] = (micro[0][n] + micro[1][n]) * np.float32(0.5)
        optcore.clip.adaptive_clip_(P2, P2.grads, 0.02)
        opt2.step()
    for n in P1:
        np.testing.assert_allclose(P1[n], P2[n], rtol=1e-5, atol=1e-6)


def test_global_norm_spans_all_groups(rng):
    P = arena(rng)
    fill_grads(P, rng)
    g = {n: P.grads[n].astype(np.float64) for n in P}
    total = math.sqrt(sum(np.sum(x**2) for x in g.values()))
    f = min(1.0, 1.0 / (total + 1e-6))
    ref = sgd_reference(P, {n: x * f for n, x in g.items()}, 0.1)
    ref["b"] = P["b"].astype(np.float64) - 0.2 * g["b"] * f
    opt = optcore.SGD(P, groups=[{"params": ["b"], "lr": 0.2}], lr=0.1, clip=GlobalNorm(1.0))
    info = opt.step()
    assert info.grad_norm == pytest.approx(total, rel=1e-6)
    for n in P:
        np.testing.assert_allclose(P[n], ref[n], rtol=1e-6, atol=1e-7)


# ---- non-finite policies -----------------------------------------------------------------


@pytest.mark.parametrize("cls", [optcore.NAdam, optcore.Adam, optcore.SGD])
def test_skip_leaves_everything_bitwise_unchanged(rng, cls):
    P = arena(rng)
    hyper = {"momentum": 0.9} if cls is optcore.SGD else {}
    opt = cls(P, nonfinite="skip", clip=GlobalNorm(1.0), **hyper)
    for _ in range(3):
        fill_grads(P, rng)
        opt.step()
    P.grads["c"][1, 2, 0, 1] = np.nan
    before = snapshot(opt, P)
    info = opt.step()
    assert info.skipped and not info.applied and info.grad_norm is None
    assert snapshot(opt, P) == before
    assert opt.skipped_steps == 1
    P.grads["b"][0] = -np.inf
    P.grads["c"][1, 2, 0, 1] = 0.0
    opt.step()
    assert opt.skipped_steps == 2
    fill_grads(P, rng)
    assert opt.step().applied
    assert opt.state_steps == [4]


def test_raise_names_first_tensor_and_changes_nothing(rng):
    P = arena(rng)
    opt = optcore.Adam(P, nonfinite="raise", groups=[{"params": ["c"]}])
    fill_grads(P, rng)
    opt.step()
    P.grads["b"][3] = np.inf
    P.grads["c"][0, 0, 0, 0] = np.nan
    before = snapshot(opt, P)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\] tensor 'c'"):
        opt.step()
    assert snapshot(opt, P) == before
    P.grads["c"][0, 0, 0, 0] = 0.0
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\] tensor 'b'"):
        opt.step()
    assert opt.skipped_steps == 0


def test_propagate_is_torch_default(rng):
    p = np.ones(4, np.float32)
    g = np.array([1.0, np.nan, 0.0, 0.0], np.float32)
    info = optcore.SGD([(p, g)], lr=0.1).step()
    assert info.grad_norm is None and info.applied
    assert math.isnan(p[1]) and p[0] == np.float32(0.9)


# ---- accumulation ------------------------------------------------------------------------


@pytest.mark.parametrize("cls,hyper", [(optcore.Adam, {"lr": 1e-2}), (optcore.SGD, {"lr": 0.1, "momentum": 0.9}),
                                       (optcore.AdamW, {"lr": 1e-2})])
def test_k_micro_batches_equal_one_big_batch(rng, cls, hyper):
    k = 4
    P1, P2 = arena(rng), None
    P2 = optcore.Parameters.from_arrays({n: P1[n] for n in P1})
    opt1 = cls(P1, accumulate=k, **hyper)
    opt2 = cls(P2, **hyper)
    for _ in range(3):
        micro = [{n: rng.standard_normal(P1[n].shape).astype(np.float32) for n in P1} for _ in range(k)]
        for j, m in enumerate(micro):
            for n in P1:
                P1.grads[n] = m[n]
            info = opt1.step()
            assert info.applied == (j == k - 1)
            if j < k - 1:
                assert info == optcore.StepResult(None, 1.0, False, None, False)
        for n in P2:  # the big batch's mean gradient
            P2.grads[n] = np.mean([m[n].astype(np.float64) for m in micro], axis=0)
        opt2.step()
    assert opt1.state_steps == opt2.state_steps == [3]
    for n in P1:
        # the mean is formed in float32 ((a + g) * (1/k)) instead of float64: a few ulps of
        # the gradient, through 3 steps
        np.testing.assert_allclose(P1[n], P2[n], rtol=1e-5, atol=1e-6)


def test_accumulate_with_clip_clips_the_mean(rng):
    k = 3
    P = arena(rng)
    P0 = {n: P[n].astype(np.float64) for n in P}
    opt = optcore.SGD(P, lr=0.1, accumulate=k, clip=GlobalNorm(0.5), nonfinite="skip")
    micro = [{n: (rng.standard_normal(P[n].shape) * 2).astype(np.float32) for n in P} for _ in range(k)]
    for m in micro:
        for n in P:
            P.grads[n] = m[n]
        info = opt.step()
    mean = {n: sum(m[n].astype(np.float64) for m in micro) / k for n in P}
    norm = math.sqrt(sum(np.sum(x**2) for x in mean.values()))
    assert info.grad_norm == pytest.approx(norm, rel=1e-6)
    f = min(1.0, 0.5 / (norm + 1e-6))
    for n in P:
        np.testing.assert_allclose(P[n], P0[n] - 0.1 * f * mean[n], rtol=1e-6, atol=1e-7)


def test_accumulate_skip_discards_window(rng):
    P = arena(rng)
    opt = optcore.SGD(P, lr=0.1, accumulate=2, nonfinite="skip")
    fill_grads(P, rng)
    P.grads["w"][0, 0] = np.inf
    opt.step()  # micro-step: the inf goes into the accumulator, no check yet
    fill_grads(P, rng)
    before = P.flat.copy()
    assert opt.step().skipped
    np.testing.assert_array_equal(P.flat, before)
    g1 = {n: P.grads[n].copy() for n in P}
    opt.step()
    fill_grads(P, rng)
    info = opt.step()
    assert info.applied
    for n in P:
        ref = before[P.layout.offsets[n]:P.layout.offsets[n] + P[n].size].reshape(P[n].shape)
        np.testing.assert_allclose(P[n], ref - 0.1 * (g1[n] + P.grads[n]) / 2, rtol=1e-6, atol=1e-6)


# ---- scaler ------------------------------------------------------------------------------


def test_scaler_unscales_without_rewriting_grads(rng):
    P1 = arena(rng)
    P2 = optcore.Parameters.from_arrays({n: P1[n] for n in P1})
    opt1 = optcore.Adam(P1, lr=1e-2, clip=GlobalNorm(1.0))
    opt2 = optcore.Adam(P2, lr=1e-2, clip=GlobalNorm(1.0))
    scaler = GradScaler(init_scale=2.0**10)
    fill_grads(P2, rng)
    for n in P1:
        P1.grads[n] = P2.grads[n] * np.float32(2.0**10)
    g_scaled = P1.grads.flat.copy()
    info1 = opt1.step(scaler=scaler)
    info2 = opt2.step()
    assert info1.loss_scale == 2.0**10 and info2.loss_scale is None
    assert info1.grad_norm == pytest.approx(info2.grad_norm, rel=1e-12)
    np.testing.assert_array_equal(P1.grads.flat, g_scaled)
    np.testing.assert_array_equal(P1.flat, P2.flat)


def test_scaler_overflow_skips_and_backs_off(rng):
    P = arena(rng)
    opt = optcore.NAdam(P, nonfinite="raise")
    scaler = GradScaler(init_scale=8.0)
    fill_grads(P, rng)
    opt.step(scaler=scaler)
    P.grads["b"][1] = np.inf
    before = snapshot(opt, P)
    info = opt.step(scaler=scaler)  # the scaler's overflow handling wins over "raise"
    assert info.skipped and info.loss_scale == 8.0
    assert scaler.get_scale() == 4.0
    assert snapshot(opt, P) == before
    assert opt.skipped_steps == 1


def test_disabled_scaler_is_ignored(rng):
    P = arena(rng)
    fill_grads(P, rng)
    info = optcore.SGD(P).step(scaler=GradScaler(enabled=False))
    assert info.loss_scale is None and info.grad_norm is None


# ---- determinism, errors -----------------------------------------------------------------


def test_fused_step_bitwise_same_for_1_and_2_threads():
    out = []
    for nt in (1, 2):
        optcore.set_num_threads(nt)
        r = np.random.default_rng(3)
        P = arena(r, {"w": (400, 300), "b": (300,), "v": (70_001,)})
        opt = optcore.Adam(P, clip=GlobalNorm(1.0), accumulate=2)
        infos = []
        for _ in range(4):
            fill_grads(P, r)
            infos.append(opt.step())
        out.append((P.flat.tobytes(), infos))
    assert out[0] == out[1]


def test_construction_errors(rng):
    P = arena(rng)
    with pytest.raises(ValueError, match="one policy"):
        optcore.SGD(P, clip=[GlobalNorm(1.0), Value(1.0)])
    with pytest.raises(TypeError, match="clip"):
        optcore.SGD(P, clip=1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        optcore.SGD(P, nonfinite="ignore")
    with pytest.raises(TypeError, match="nonfinite"):
        optcore.SGD(P, nonfinite=None)
    with pytest.raises(ValueError, match="accumulate"):
        optcore.SGD(P, accumulate=0)
    with pytest.raises(TypeError, match="accumulate"):
        optcore.SGD(P, accumulate=True)
    with pytest.raises(ValueError, match="clipping"):
        optcore.SGD(P, clip=Adaptive(0.0))
    with pytest.raises(ValueError, match="max_norm"):
        optcore.SGD(P, clip=GlobalNorm(-1.0))


def test_step_errors_change_nothing(rng):
    P = arena(rng)
    opt = optcore.Adam(P, clip=GlobalNorm(1.0))
    fill_grads(P, rng)
    before = snapshot(opt, P)
    with pytest.raises(TypeError, match="scaler"):
        opt.step(scaler=2.0)
    with pytest.raises(ValueError, match="lr"):
        opt.step(lr=-1.0)
    assert snapshot(opt, P) == before


def test_state_dict_unaffected(rng):
    P = arena(rng)
    opt = optcore.Adam(P, clip=GlobalNorm(1.0), accumulate=2)
    for _ in range(4):
        fill_grads(P, rng)
        opt.step()
    opt2 = optcore.Adam(arena(rng), clip=GlobalNorm(1.0), accumulate=2)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state_steps == [2]


def test_state_dict_holds_window_and_skipped_steps(rng, tmp_path):
    P = arena(rng)
    opt = optcore.Adam(P, lr=1e-2, accumulate=3, nonfinite="skip")
    fill_grads(P, rng)
    P.grads["b"][0] = np.nan
    for _ in range(3):
        opt.step()  # a window with a NaN: skipped
    fill_grads(P, rng)
    opt.step()  # one micro-step into the next window
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    P2 = optcore.Parameters.from_arrays({n: P[n] for n in P})
    opt2 = optcore.Adam(P2, lr=1e-2, accumulate=3, nonfinite="skip")
    opt2.load_state_dict(dict(np.load(tmp_path / "opt.npz")))
    assert opt2.skipped_steps == 1
    for _ in range(2):
        fill_grads(P, rng)
        P2.grads.flat[...] = P.grads.flat
        assert opt.step() == opt2.step()
    np.testing.assert_array_equal(P.flat, P2.flat)
    bad = dict(opt.state_dict(), **{"accumulate.micro": 3})
    with pytest.raises(ValueError, match="accumulate.micro"):
        opt2.load_state_dict(bad)
    opt.step()
    state = opt.state_dict()
    del state["group0.accumulator"]
    before = snapshot(opt2, P2)
    with pytest.raises(ValueError, match="accumulator"):
        opt2.load_state_dict(state)
    assert snapshot(opt2, P2) == before


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=4),
    max_norm=st.floats(1e-3, 1e3),
    policy=st.sampled_from(["global", "tensor", "value"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_fused_equals_clip_then_step(sizes, max_norm, policy, seed):
    """The fused step applies exactly the float32 factor the explicit clip applies: bitwise."""
    r = np.random.default_rng(seed)
    p1 = [r.standard_normal(n).astype(np.float32) for n in sizes]
    g1 = [(r.standard_normal(n) * 10).astype(np.float32) for n in sizes]
    p2 = [a.copy() for a in p1]
    g2 = [a.copy() for a in g1]
    clip_policy = {"global": GlobalNorm(max_norm), "tensor": PerTensorNorm(max_norm),
                   "value": Value(max_norm)}[policy]
    optcore.SGD(list(zip(p1, g1)), lr=0.1, clip=clip_policy).step()
    clip_policy.clip_(g2)
    optcore.SGD(list(zip(p2, g2)), lr=0.1).step()
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
