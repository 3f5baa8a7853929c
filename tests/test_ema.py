import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore.kernels import ema_update_


def ema_ref(avg, param, decay):
    """float64 reference of the documented formula a = d a + (1 - d) p."""
    return decay * avg.astype(np.float64) + (1.0 - decay) * param.astype(np.float64)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
       decay=st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.999, 0.9999]), st.floats(0.0, 1.0)),
       seed=st.integers(0, 2**32 - 1))
def test_kernel_matches_float64(sizes, decay, seed):
    rng = np.random.default_rng(seed)
    avgs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    want = [ema_ref(a, p, decay) for a, p in zip(avgs, params)]
    ema_update_(avgs, params, decay)
    for a, w, p in zip(avgs, want, params):
        # Two float32 products and a sum, each rounded once (plus 1 - d rounded to float32):
        # a few ulps of max(|a|, |p|) ~ 4 -> 4e-6 absolute.
        np.testing.assert_allclose(a, w, rtol=0, atol=4e-6)
    if decay == 0.0:
        for a, p in zip(avgs, params):
            np.testing.assert_array_equal(a, p)


def test_kernel_decay_one_keeps_avg(rng):
    a = rng.standard_normal(1000).astype(np.float32)
    before = a.copy()
    ema_update_(a, rng.standard_normal(1000).astype(np.float32), 1.0)
    np.testing.assert_array_equal(a, before)


def test_one_vs_two_threads_bitwise(rng):
    n = 200_003  # several chunks, above the parallel threshold
    a0 = rng.standard_normal(n).astype(np.float32)
    p = rng.standard_normal(n).astype(np.float32)
    outs = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        a = a0.copy()
        for _ in range(3):
            ema_update_(a, p, 0.99)
        outs.append(a)
    np.testing.assert_array_equal(outs[0], outs[1])


def _bad_cases(rng):
    a = rng.standard_normal(100).astype(np.float32)
    p = rng.standard_normal(100).astype(np.float32)
    ro = a.copy()
    ro.flags.writeable = False
    return a, p, [
        (lambda: ema_update_(a, p, 1.5), ValueError, "decay"),
        (lambda: ema_update_(a, p, -0.1), ValueError, "decay"),
        (lambda: ema_update_(a, p, float("nan")), ValueError, "decay"),
        (lambda: ema_update_(a, p.astype(np.float64), 0.9), TypeError, "param"),
        (lambda: ema_update_(a, p[:50], 0.9), ValueError, "elements"),
        (lambda: ema_update_(a, a, 0.9), ValueError, "share memory"),
        (lambda: ema_update_(a[:60], a[40:], 0.9), ValueError, "share memory"),
        (lambda: ema_update_(ro, p, 0.9), ValueError, "read-only"),
        (lambda: ema_update_(np.zeros((10, 20), np.float32)[:, ::2], np.zeros(100, np.float32), 0.9),
         ValueError, "contiguous"),
        (lambda: ema_update_([a], [p, p], 0.9), ValueError, "tensors"),
    ]


def test_bad_input_leaves_buffers_unchanged(rng):
    a, p, cases = _bad_cases(rng)
    a0, p0 = a.copy(), p.copy()
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
        np.testing.assert_array_equal(a, a0)
        np.testing.assert_array_equal(p, p0)


def _params(rng):
    params = optcore.Parameters({"w1": (50, 30), "b1": (30,), "w2": (30, 3)})
    params.flat[...] = 0.0
    for n in params:
        params[n] = rng.standard_normal(params[n].shape)
    return params


def test_ema_class_default_copies_then_averages(rng):
    params = _params(rng)
    ema = optcore.EMA(params, decay=0.9)
    ref = None
    for k in range(5):
        params.flat[...] = rng.standard_normal(params.flat.size).astype(np.float32)
        ema.update()
        x = params.flat.astype(np.float64)
        ref = x if ref is None else 0.9 * ref + 0.1 * x   # torch AveragedModel / Keras use_ema
    np.testing.assert_allclose(ema._arena.flat, ref, rtol=0, atol=2e-6)
    assert ema.num_updates == 5


def test_ema_matches_torch_averaged_model(rng):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    lin = torch.nn.Linear(4, 3)
    avg_model = AveragedModel(lin, multi_avg_fn=get_ema_multi_avg_fn(0.95))
    w = lin.weight.detach().numpy().T.copy()
    ema = optcore.EMA([w], decay=0.95)
    for _ in range(6):
        new = rng.standard_normal((3, 4)).astype(np.float32)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(new))
        avg_model.update_parameters(lin)
        w[...] = new.T
        ema.update()
    # torch uses lerp (a + w (p - a)), optcore d a + (1 - d) p: equal to a few float32 ulps.
    np.testing.assert_allclose(ema.average[0], avg_model.module.weight.detach().numpy().T, rtol=0,
                               atol=1e-6)


def test_bias_correction_matches_debiased_zero_start(rng):
    params = _params(rng)
    ema = optcore.EMA(params, decay=0.9, bias_correction=True)
    v = np.zeros(params.flat.size)
    for t in range(1, 8):
        params.flat[...] = rng.standard_normal(params.flat.size).astype(np.float32)
        ema.update()
        v = 0.9 * v + 0.1 * params.flat.astype(np.float64)     # seed 003: zero-started EWA
        # ~7 rounding steps of relative float32 error on values ~3 -> 1e-5 absolute.
        np.testing.assert_allclose(ema._arena.flat, v / (1 - 0.9**t), rtol=0, atol=1e-5)


def test_warmup_num_updates(rng):
    params = _params(rng)
    start = params.flat.astype(np.float64)
    ema = optcore.EMA(params, decay=0.999, warmup="num_updates")
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.999
    params.flat[...] = 1.0
    ema.update()
    np.testing.assert_allclose(ema._arena.flat, 0.1 * start + 0.9, rtol=0, atol=1e-6)
    ema2 = optcore.EMA(params, decay=0.5, warmup=lambda n: 0.25)
    assert ema2.decay_at(3) == 0.25
    bad = optcore.EMA(params, warmup=lambda n: 2.0)
    with pytest.raises(ValueError, match="warmup"):
        bad.update()


def test_swap_round_trip_bitwise_and_context(rng):
    params = _params(rng)
    ema = optcore.EMA(params, decay=0.5)
    for _ in range(3):
        params.flat[...] = rng.standard_normal(params.flat.size).astype(np.float32)
        ema.update()
    live, avg = params.flat.copy(), ema._arena.flat.copy()
    ema.swap()
    assert ema.swapped
    np.testing.assert_array_equal(params.flat, avg)
    np.testing.assert_array_equal(ema._arena.flat, live)
    with pytest.raises(RuntimeError, match="swap"):
        ema.update()
    ema.swap()
    np.testing.assert_array_equal(params.flat, live)
    np.testing.assert_array_equal(ema._arena.flat, avg)
    with ema.averaged():
        np.testing.assert_array_equal(params["w1"], ema_view(avg, params, "w1"))
    np.testing.assert_array_equal(params.flat, live)


def ema_view(flat, params, name):
    return params.layout.view(flat, name)


def test_swap_with_array_list_and_state_dict(rng, tmp_path):
    arrays = [rng.standard_normal((40, 20)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    ema = optcore.EMA(arrays, decay=0.8)
    for _ in range(2):
        for a in arrays:
            a[...] = rng.standard_normal(a.shape)
        ema.update()
    state = ema.state_dict()
    live = [a.copy() for a in arrays]
    ema.swap()
    swapped_state = ema.state_dict()
    np.testing.assert_array_equal(state["average"], swapped_state["average"])
    ema.swap()
    for a, b in zip(arrays, live):
        np.testing.assert_array_equal(a, b)
    other = optcore.EMA([a.copy() for a in arrays], decay=0.8)
    np.savez(tmp_path / "ema.npz", **state)
    other.load_state_dict(np.load(tmp_path / "ema.npz"))
    for a, b in zip(other.average, ema.average):
        np.testing.assert_array_equal(a, b)
    assert other.num_updates == 2
    with pytest.raises(ValueError, match="decay"):
        optcore.EMA([a.copy() for a in arrays], decay=0.5).load_state_dict(state)
    bad = dict(state, average=state["average"][:-1])
    before = other._arena.flat.copy()
    with pytest.raises(ValueError, match="average"):
        other.load_state_dict(bad)
    np.testing.assert_array_equal(other._arena.flat, before)
    ema.copy_to()
    for a, b in zip(arrays, ema.average):
        np.testing.assert_array_equal(a, b)


def test_ema_pickles_state_dict(rng):
    ema = optcore.EMA(_params(rng), decay=0.9)
    state = pickle.loads(pickle.dumps(ema.state_dict()))
    assert state["num_updates"] == 0


def test_ema_bad_construction():
    params = optcore.Parameters({"w": (4,)})
    with pytest.raises(ValueError, match="decay"):
        optcore.EMA(params, decay=1.5)
    with pytest.raises(ValueError, match="warmup"):
        optcore.EMA(params, warmup="linear")
    with pytest.raises(ValueError, match="combined"):
        optcore.EMA(params, bias_correction=True, warmup="num_updates")
    with pytest.raises(TypeError, match="float32"):
        optcore.EMA([np.zeros(3)])
    a = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        optcore.EMA([a[:5], a[3:]])
