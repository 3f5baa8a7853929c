"""optcore.scaling.GradScaler: a hand table, torch.amp.GradScaler (CPU), and the fused step."""
import numpy as np
import pytest

import optcore
from optcore.scaling import GradScaler

# (found_inf, scale after update, growth tracker after) for init 1024, growth 2, backoff 0.5,
# interval 3, worked out by hand from torch's _amp_update_scale_.
HAND = [
    (False, 1024.0, 1),
    (False, 1024.0, 2),
    (False, 2048.0, 0),
    (True, 1024.0, 0),
    (False, 1024.0, 1),
    (True, 512.0, 0),
    (True, 256.0, 0),
    (False, 256.0, 1),
    (False, 256.0, 2),
    (False, 512.0, 0),
    (False, 512.0, 1),
]


def test_hand_table():
    s = GradScaler(init_scale=1024.0, growth_interval=3)
    for found_inf, scale, tracker in HAND:
        s.update(found_inf)
        assert s.get_scale() == scale
        assert s.state_dict()["_growth_tracker"] == tracker


def test_scale_keeps_dtype():
    s = GradScaler()
    assert s.scale(2.0) == 2.0 * 65536
    x = np.float32(3.0)
    assert s.scale(x).dtype == np.float32
    assert s.scale(np.ones(3, np.float32)).dtype == np.float32


def test_growth_never_overflows_float32():
    s = GradScaler(init_scale=2.0**127, growth_interval=1)
    s.update(False)
    assert s.get_scale() == 2.0**127


def test_state_dict_round_trip():
    s = GradScaler(init_scale=8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=5)
    for f in (False, False, True, False, False):
        s.update(f)
    state = s.state_dict()
    saved = {k: np.asarray(v) for k, v in state.items()}  # as np.savez would give back
    t = GradScaler()
    t.load_state_dict(saved)
    assert t.state_dict() == state
    for f in (False, False, False):
        s.update(f)
        t.update(f)
    assert t.state_dict() == s.state_dict()


def test_disabled():
    s = GradScaler(enabled=False)
    assert s.scale(3.0) == 3.0
    assert s.get_scale() == 1.0
    assert s.state_dict() == {}
    s.update(True)
    assert s.get_scale() == 1.0
    with pytest.raises(RuntimeError):
        s.load_state_dict({"scale": 1.0})


def test_bad_arguments():
    with pytest.raises(ValueError, match="init_scale"):
        GradScaler(init_scale=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        GradScaler(init_scale=1e300)
    with pytest.raises(ValueError, match="growth_factor"):
        GradScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        GradScaler(backoff_factor=1.0)
    with pytest.raises(ValueError, match="growth_interval"):
        GradScaler(growth_interval=0)
    with pytest.raises(TypeError, match="growth_interval"):
        GradScaler(growth_interval=2.5)
    with pytest.raises(TypeError, match="enabled"):
        GradScaler(enabled=1)
    s = GradScaler(init_scale=4.0)
    with pytest.raises(TypeError, match="found_inf"):
        s.update(0)
    good = s.state_dict()
    for bad in ({}, dict(good, _growth_tracker=5000), dict(good, scale=-1.0),
                {k: v for k, v in good.items() if k != "scale"}):
        with pytest.raises((ValueError, RuntimeError)):
            s.load_state_dict(bad)
    assert s.state_dict() == good


def test_load_torch_state_dict():
    torch = pytest.importorskip("torch")
    ts = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    s = GradScaler()
    s.load_state_dict(ts.state_dict())
    assert s.get_scale() == 256.0 and s.get_growth_interval() == 7


INF_AT = {2, 3, 9, 10, 11, 17}


def gradients(rng, n, steps):
    out = []
    for t in range(steps):
        g = rng.standard_normal(n).astype(np.float32)
        if t in INF_AT:
            g[t % n] = np.inf if t % 2 else np.nan
        out.append(g)
    return out


def test_step_sequence_vs_torch_gradscaler(rng):
    """The same gradients (with injected overflows) through torch's scaler and optcore's."""
    torch = pytest.importorskip("torch")
    n, steps = 50, 24
    grads = gradients(rng, n, steps)
    p0 = rng.standard_normal(n).astype(np.float32)

    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1)
    ts = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=4)
    t_scales, t_params = [], []
    for g in grads:
        ts.scale(torch.tensor(1.0))  # torch creates its scale lazily here
        tp.grad = torch.tensor(g) * ts.get_scale()
        ts.step(topt)
        ts.update()
        t_scales.append(ts.get_scale())
        t_params.append(tp.detach().numpy().copy())

    p = p0.copy()
    grad = np.zeros(n, np.float32)
    opt = optcore.SGD([(p, grad)], lr=0.1)
    s = GradScaler(init_scale=1024.0, growth_interval=4)
    for t, g in enumerate(grads):
        grad[...] = g * np.float32(s.get_scale())
        info = opt.step(scaler=s)
        assert info.skipped == (t in INF_AT)
        assert info.applied == (t not in INF_AT)
        assert s.get_scale() == t_scales[t]
        # unscaling by a power of two is exact on both sides; torch's SGD update rounds once
        # (fused multiply-add) where optcore rounds twice: 1 ulp per step
        np.testing.assert_allclose(p, t_params[t], rtol=1e-6, atol=1e-6)
    assert opt.skipped_steps == len(INF_AT)
    assert opt.state_steps == [steps - len(INF_AT)]


def test_step_sequence_hand_table_without_torch(rng):
    """The scale sequence of the same run, hand-derived (init 1024, interval 4)."""
    n, steps = 8, 24
    grads = gradients(rng, n, steps)
    p = np.zeros(n, np.float32)
    grad = np.zeros(n, np.float32)
    opt = optcore.SGD([(p, grad)], lr=0.1)
    s = GradScaler(init_scale=1024.0, growth_interval=4)
    scales = []
    for g in grads:
        grad[...] = g * np.float32(s.get_scale())
        info = opt.step(scaler=s)
        assert info.loss_scale == (scales[-1] if scales else 1024.0)
        scales.append(s.get_scale())
    expected = [1024, 1024, 512, 256, 256, 256, 256, 512, 512, 256, 128, 64, 64, 64, 64, 128,
                128, 64, 64, 64, 64, 128, 128, 128]
    assert scales == expected
