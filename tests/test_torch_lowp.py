"""optcore.torch with low-precision state (bfloat16, 8-bit) and 16-bit parameters.

References computed another way: the NumPy optimizers of optcore.optim on the same data (the
same kernel, reached through NumPy arrays and another table builder: bitwise), torch.optim's
float32 Adam (within the rounding of the state, justified per test), torch's fused Adam on
bfloat16 parameters, and the float32 update itself (a stochastically rounded parameter is one
of the two 16-bit neighbours of the float32 result).
"""
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

torch = pytest.importorskip("torch")

import optcore  # noqa: E402
import optcore.clip  # noqa: E402
import optcore.optim as oo  # noqa: E402
import optcore.torch as ot  # noqa: E402
from optcore import _lowp  # noqa: E402
from optcore._kernels import _optim  # noqa: E402
from optcore.torch import _lowp as lp  # noqa: E402
from torch_helpers import assert_unchanged, snapshot  # noqa: E402

SHAPES = [(300, 70), (5000,), (7,), (3, 4, 9, 11)]


def tensors(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def decoded(st, s):
    """State ``s`` of a torch state dict as float32 (the kernels' own decoding)."""
    t = st[s]
    return lp.to_float32(t, st.get(lp.absmax_key(s)), lp.stored_kind(s, t))


def run_both(tcls, ncls, steps=5, **kw):
    """The same data through optcore.torch ``tcls`` and the NumPy optimizer ``ncls``."""
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0)]
    opt = tcls(ps, lr=1e-2, **kw)
    pn = [p.detach().numpy().copy() for p in ps]
    gn = [np.zeros_like(a) for a in pn]
    on = ncls(list(zip(pn, gn)), lr=1e-2, **kw)
    for t in range(steps):
        for p, g, a in zip(ps, tensors(SHAPES, 10 + t), gn):
            p.grad = g
            a[...] = g.numpy()
        opt.step()
        on.step()
    return ps, opt, pn, on


@pytest.mark.parametrize("tcls,ncls,kw", [
    (ot.Adam, oo.Adam, dict(state_dtype="bfloat16", seed=5)),
    (ot.AdamW, oo.AdamW, dict(state_dtype="bfloat16", seed=123)),
    (ot.Adam, oo.Adam, dict(state_dtype="int8", min_8bit_size=100)),
    (ot.Adam8bit, oo.Adam8bit, dict(min_8bit_size=100)),
    (ot.AdamW8bit, oo.AdamW8bit, {}),
    (ot.SGD, oo.SGD, dict(state_dtype="bfloat16", momentum=0.9)),
    (ot.SGD, oo.SGD, dict(state_dtype="int8", momentum=0.9, min_8bit_size=100)),
    (ot.RMSprop, oo.RMSprop, dict(state_dtype="int8", centered=True, min_8bit_size=100)),
    (ot.Adagrad, oo.Adagrad, dict(state_dtype="bfloat16", initial_accumulator_value=0.1)),
    (ot.Adamax, oo.Adamax, dict(state_dtype="int8", min_8bit_size=100)),
    (ot.NAdam, oo.NAdam, dict(state_dtype="bfloat16")),
])
def test_equals_numpy_optimizer_bitwise(tcls, ncls, kw):
    """Same kernel, same seed, same step and element indices: identical bits, parameters and
    decoded state (8-bit: the tensors below min_8bit_size keep float32 state in both)."""
    ps, opt, pn, on = run_both(tcls, ncls, **kw)
    for i, (p, a) in enumerate(zip(ps, pn)):
        assert np.array_equal(p.detach().numpy(), a)
        ref = on.state_of(str(i))
        st = opt.state[p]
        for s, v in ref.items():
            assert np.array_equal(decoded(st, s).numpy(), np.asarray(v).reshape(p.shape))
    # the stored formats: 8-bit codes with scales at and above min_8bit_size, float32 below
    sd = kw.get("state_dtype", "int8")
    for p in ps:
        for s, t in opt.state[p].items():
            if s in ("step", "mu_product") or s.endswith(lp.ABSMAX):
                continue
            if sd == "bfloat16":
                assert t.dtype == torch.bfloat16
            elif p.numel() >= kw.get("min_8bit_size", _lowp.MIN_8BIT_SIZE):
                assert t.dtype == torch.uint8 and t.stride() == p.stride()
                assert opt.state[p][lp.absmax_key(s)].shape == (_lowp.blocks(p.numel()),)
            else:
                assert t.dtype == torch.float32 and lp.absmax_key(s) not in opt.state[p]


@settings(max_examples=25, deadline=None)
@given(sizes=hst.lists(hst.integers(1, 3000), min_size=1, max_size=4),
       state_dtype=hst.sampled_from(["bfloat16", "int8"]),
       lr=hst.floats(1e-4, 1e-1), beta1=hst.floats(0.0, 0.99), amsgrad=hst.booleans(),
       seed=hst.integers(0, 2**32 - 1), min_8bit_size=hst.integers(1, 2000))
def test_hypothesis_equals_numpy_adam(sizes, state_dtype, lr, beta1, amsgrad, seed,
                                      min_8bit_size):
    """Any tensor sizes (partial 8-bit blocks, tensors on both sides of min_8bit_size),
    hyper-parameters and seeds: optcore.torch's Adam equals the NumPy Adam bit for bit."""
    kw = dict(lr=lr, betas=(beta1, 0.999), amsgrad=amsgrad, state_dtype=state_dtype, seed=seed,
              min_8bit_size=min_8bit_size)
    shapes = [(n,) for n in sizes]
    ps = [p.requires_grad_() for p in tensors(shapes, 1)]
    opt = ot.Adam(ps, **kw)
    pn = [p.detach().numpy().copy() for p in ps]
    gn = [np.zeros_like(a) for a in pn]
    on = oo.Adam(list(zip(pn, gn)), **kw)
    for t in range(3):
        for p, g, a in zip(ps, tensors(shapes, 50 + t), gn):
            p.grad = g
            a[...] = g.numpy()
        opt.step()
        on.step()
    for p, a in zip(ps, pn):
        assert np.array_equal(p.detach().numpy(), a)


def _np16(t):
    """A NumPy view (ml_dtypes.bfloat16 or float16) of 16-bit tensor ``t``'s memory."""
    import ml_dtypes
    if t.dtype == torch.float16:
        return t.numpy()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(rounding="nearest"), dict(compensation=True),
                                dict(state_dtype="int8", min_8bit_size=100),
                                dict(state_dtype="bfloat16", seed=9)])
def test_16bit_params_equal_numpy_optimizer(dtype, kw):
    """16-bit parameters and gradients: optcore.torch's AdamW equals the NumPy AdamW on the
    same 16-bit arrays bit for bit (parameters, Kahan buffers), with the NumPy optimizer given
    the state format optcore.torch picks by default (bfloat16 for bfloat16 parameters,
    float32 for float16 ones)."""
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0, dtype)]
    opt = ot.AdamW(ps, lr=1e-2, **kw)
    pn = [_np16(p.detach().clone()) for p in ps]
    gn = [np.zeros_like(a) for a in pn]
    nkw = dict(kw)
    nkw.setdefault("state_dtype", "bfloat16" if dtype == torch.bfloat16 else "float32")
    on = oo.AdamW(list(zip(pn, gn)), lr=1e-2, **nkw)
    for t in range(4):
        for p, g, a in zip(ps, tensors(SHAPES, 300 + t, dtype), gn):
            p.grad = g
            a[...] = _np16(g)
        opt.step()
        on.step()
    for p, a in zip(ps, pn):
        assert np.array_equal(_np16(p.detach()).view(np.uint16), a.view(np.uint16))
    if kw.get("compensation"):
        comp = on._groups[0].comp.arrays
        for p, c in zip(ps, comp):
            assert np.array_equal(_np16(opt.state[p]["kahan_comp"]).view(np.uint16),
                                  c.view(np.uint16))


def test_bf16_state_tracks_torch_fp32_adam():
    """100 Adam steps on a noisy quadratic of 65536 elements: bfloat16 state (8 significant
    bits, rounded stochastically, hence unbiased) ends within 1e-2 of torch's float32 Adam,
    relative to the distance travelled (measured 3.1e-3; float32 state: 1.8e-7)."""
    n = 65536
    p0, target = tensors([(n,), (n,)], 3)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ta, ob = torch.optim.Adam([a], lr=1e-2), ot.Adam([b], lr=1e-2, state_dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        noise = torch.randn(n, generator=g) * 0.1
        a.grad = (a.detach() - target) + noise
        b.grad = (b.detach() - target) + noise
        ta.step()
        ob.step()
    rel = float((a.detach() - b.detach()).norm() / (a.detach() - p0).norm())
    assert 1e-4 < rel < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_lands_on_a_neighbour(dtype):
    """A 16-bit parameter rounded stochastically is one of the two 16-bit neighbours of the
    float32 update (computed by the float32 path from the widened parameter); both
    neighbours occur."""
    n = 50000
    p, g = tensors([(n,), (n,)], 4, dtype)
    a = p.clone().requires_grad_()
    a.grad = g.clone()
    f = p.float().requires_grad_()
    f.grad = g.float()
    ot.Adam([a], lr=1e-3, state_dtype="float32").step()
    ot.Adam([f], lr=1e-3).step()
    x, r = f.detach(), a.detach()
    up = torch.nextafter(r, torch.full_like(r, float("inf"))).float()
    down = torch.nextafter(r, torch.full_like(r, -float("inf"))).float()
    assert bool(((r.float() == x) | ((down < x) & (x < up))).all())
    nearest = x.to(dtype)
    frac = float((r != nearest).float().mean())
    assert 0.02 < frac < 0.5


def test_nearest_rounding_against_torch_fused_bf16():
    """bfloat16 parameters with rounding='nearest' and bfloat16 state, against torch's fused
    Adam on bfloat16 parameters. Both compute in float32 and round the parameter to nearest:
    from zero state the first step agrees bit for bit (measured: all 100000 elements). Then
    the state differs (torch rounds it to nearest, optcore stochastically) and, with updates
    near half an ulp, round-to-nearest keeps or drops an update on a hair: after 10 steps
    0.85% of the elements differ, the distance between the two is 3.9% of the distance
    travelled, and the mean distance travelled agrees to 0.02%."""
    n = 100000
    p = tensors([(n,)], 5, torch.bfloat16)[0]
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    ta = torch.optim.Adam([a], lr=1e-3, fused=True)
    ob = ot.Adam([b], lr=1e-3, rounding="nearest")
    for t in range(10):
        g = tensors([(n,)], 20 + t, torch.bfloat16)[0]
        a.grad, b.grad = g.clone(), g.clone()
        ta.step()
        ob.step()
        assert ob.state[b]["exp_avg"].dtype == torch.bfloat16
        if t == 0:
            assert torch.equal(a, b)
    x, y, x0 = a.detach().float(), b.detach().float(), p.float()
    assert int((a != b).sum()) < n // 50
    assert float((x - y).norm() / (x - x0).norm()) < 0.1
    assert float((x - x0).abs().mean()) == pytest.approx(float((y - x0).abs().mean()), rel=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-4), (torch.float16, 1e-5)])
def test_kahan_compensation_tracks_float32(dtype, tol):
    """compensation=True: the 16-bit parameter plus its Kahan buffer of the same dtype stays
    within ``tol`` of the float32 run from the same start over 100 steps of lr 1e-4
    (measured: bfloat16 1.1e-4, the parameter alone 3.8e-3; float16 4.8e-6, the buffer
    being subnormal for small weights, the parameter alone 1.6e-3); the buffer is in the
    state as 'kahan_comp'."""
    n = 50000
    p = tensors([(n,)], 6, dtype)[0]
    a, f = p.clone().requires_grad_(), p.float().requires_grad_()
    oa = ot.Adam([a], lr=1e-4, compensation=True, state_dtype="float32")
    of = ot.Adam([f], lr=1e-4)
    for t in range(100):
        g = tensors([(n,)], 100 + t, dtype)[0]
        a.grad, f.grad = g, g.float()
        oa.step()
        of.step()
    comp = oa.state[a]["kahan_comp"]
    assert comp.dtype == dtype
    err = float(((a.detach().float() + comp.float()) - f.detach()).abs().max())
    plain = float((a.detach().float() - f.detach()).abs().max())
    assert err < tol and plain > 10 * err


def test_bf16_quadratic_stalls_with_nearest_only():
    """Minimising mean((p - c)^2) / 2 with SGD at lr 1e-2 from p = 1 towards c = 4/3 (not
    representable in bfloat16): every update (at most 3.3e-3) is below half an ulp of 1
    (3.9e-3), so round-to-nearest never moves (measured: 16384x the loss of the best bfloat16
    point, for ever); after 1000 steps stochastic rounding is at 2.0x the best point and
    Kahan compensation at 1.0x (the parameter alone, without its buffer)."""
    n = 4096
    c = torch.full((n,), 4.0 / 3.0)
    best = float(((c.bfloat16().float() - c) ** 2).mean())
    losses = {}
    for name, kw in [("nearest", dict(rounding="nearest")), ("stochastic", {}),
                     ("kahan", dict(compensation=True))]:
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = ot.SGD([p], lr=1e-2, **kw)
        for _ in range(1000):
            p.grad = (p.detach().float() - c).bfloat16()
            opt.step()
        losses[name] = float(((p.detach().float() - c) ** 2).mean()) / best
    assert losses["nearest"] > 1000
    assert losses["stochastic"] < 3 and losses["kahan"] < 1.5


def adam_quadratic(make_opt, n=8192, steps=2000, lr=1e-2):
    """tests/test_lowp_params.quadratic through a torch optimizer on bf16 weights: minimise
    0.5 sum a_i (x_i - c_i)^2 (a, c uniform in [0.5, 2]) from x = 0 with a cosine-decayed lr;
    the final loss over the loss of the best bf16 point, rne(c)."""
    rng = np.random.default_rng(0)
    c = torch.from_numpy(rng.uniform(0.5, 2.0, n).astype(np.float32))
    a = torch.from_numpy(rng.uniform(0.5, 2.0, n).astype(np.float32))
    x = torch.zeros(n, dtype=torch.bfloat16, requires_grad=True)
    opt = make_opt([x], lr)
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr * (0.01 + 0.5 * (1 + np.cos(np.pi * t / steps)))
        x.grad = (a * (x.detach().float() - c)).bfloat16()
        opt.step()
    loss = (a.double() * (x.detach().double() - c.double()) ** 2).sum()
    return float(loss / (a.double() * (c.bfloat16().double() - c.double()) ** 2).sum())


def test_bf16_adam_quadratic_deepspeed_stalls_where_optcore_does_not():
    """DeepSpeed's CPU Adam (ZeRO-Offload's optimizer) on bf16 weights rounds its update to
    nearest, with float32 or bf16 state alike, as torch's fused Adam does: on the quadratic of
    test_lowp_params they stall like ``rounding="nearest"`` (measured 8900x and 9800x the loss
    of the best bf16 point; torch's fused Adam 9800x), where optcore's stochastic rounding
    ends at 2.07x and Kahan compensation at 1.21x, the figures of the NumPy optimizers (the
    torch face runs the same kernels, bitwise)."""
    ds = pytest.importorskip("deepspeed.ops.adam")
    stalls = [adam_quadratic(lambda p, lr, kw=kw: ds.DeepSpeedCPUAdam(p, lr=lr, adamw_mode=False,
                                                                      **kw))
              for kw in (dict(), dict(fp32_optimizer_states=False))]
    stalls.append(adam_quadratic(lambda p, lr: torch.optim.Adam(p, lr=lr, fused=True)))
    sr = adam_quadratic(lambda p, lr: ot.Adam(p, lr=lr))
    kahan = adam_quadratic(lambda p, lr: ot.Adam(p, lr=lr, compensation=True))
    assert min(stalls) > 1000 and 1.0 <= sr <= 3.0 and 1.0 <= kahan <= 1.5, (stalls, sr, kahan)


def test_float16_params_keep_float32_state():
    p = tensors([(64,)], 7, torch.float16)[0].requires_grad_()
    p.grad = torch.ones_like(p)
    opt = ot.Adam([p])
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(state_dtype="bfloat16"), dict(state_dtype="int8"),
                                dict(state_dtype="float32")])
def test_channels_last_blocks_follow_memory_order(kw):
    """A channels_last parameter's state keeps its strides; the 8-bit blocks run over its
    memory order: the NumPy optimizer on the memory-order flat array gives the same bits."""
    p = tensors([(8, 16, 9, 9)], 8)[0].to(memory_format=torch.channels_last).requires_grad_()
    opt = ot.Adam([p], lr=1e-2, min_8bit_size=256, **kw)
    pn = lp.flat(p.detach()).numpy().copy()
    gn = np.zeros_like(pn)
    on = oo.Adam([(pn, gn)], lr=1e-2, min_8bit_size=256, **kw)
    for t in range(3):
        g = tensors([(8, 16, 9, 9)], 30 + t)[0].to(memory_format=torch.channels_last)
        p.grad = g
        gn[...] = lp.flat(g).numpy()
        opt.step()
        on.step()
    assert np.array_equal(lp.flat(p.detach()).numpy(), pn)
    for s, v in on.state_of("0").items():
        assert opt.state[p][s].stride() == p.stride()
        assert np.array_equal(lp.flat(decoded(opt.state[p], s)).numpy(), v)


# -- state_dict ------------------------------------------------------------------------------

def _trained(cls, steps=3, dtype=torch.float32, **kw):
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0, dtype)]
    opt = cls(ps, lr=1e-2, **kw)
    for t in range(steps):
        for p, g in zip(ps, tensors(SHAPES, 40 + t, dtype)):
            p.grad = g
        opt.step()
    return ps, opt


def _continue(ps, opt, steps=2, start=60):
    for t in range(steps):
        for p, g in zip(ps, tensors(SHAPES, start + t, ps[0].dtype)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("cls,kw", [
    (ot.Adam, dict(state_dtype="bfloat16")), (ot.Adam8bit, dict(min_8bit_size=100)),
    (ot.Adam, dict(state_dtype="float32")), (ot.RMSprop, dict(state_dtype="int8", momentum=0.5)),
])
def test_state_dict_round_trips(cls, kw):
    """Save, load into a fresh optimizer of the same configuration, continue: identical bits."""
    ps, opt = _trained(cls, **kw)
    sd = copy.deepcopy(opt.state_dict())
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = cls(qs, lr=1e-2, **kw)
    opt2.load_state_dict(sd)
    for p, q in zip(ps, qs):
        assert sorted(opt.state[p]) == sorted(opt2.state[q])
        for k, v in opt.state[p].items():
            assert v.dtype == opt2.state[q][k].dtype and torch.equal(v, opt2.state[q][k])
    _continue(ps, opt)
    _continue(qs, opt2)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_fp32_torch_state_converts_both_ways(state_dtype):
    """torch.optim.Adam's float32 state loaded into a low-precision optcore.torch Adam is
    quantized (8-bit) or rounded to nearest (bfloat16) by the kernels' own conversions; a
    low-precision state loaded into a float32 optcore.torch Adam is dequantized, and that
    optimizer's state dict loads into torch.optim.Adam."""
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0)]
    ta = torch.optim.Adam(ps, lr=1e-2)
    _continue(ps, ta, steps=3)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    low = ot.Adam(qs, lr=1e-2, state_dtype=state_dtype, min_8bit_size=100)
    low.load_state_dict(copy.deepcopy(ta.state_dict()))
    for p, q in zip(ps, qs):
        for s in ("exp_avg", "exp_avg_sq"):
            x = ta.state[p][s].reshape(-1).numpy()
            st = low.state[q]
            if state_dtype == "bfloat16":
                bits = np.empty(x.size, np.uint16)
                _optim.half_encode(x, bits, _optim.BF16)
                assert np.array_equal(st[s].view(torch.int16).reshape(-1).numpy().view(np.uint16), bits)
            elif q.numel() >= 100:
                codes, am = np.empty(x.size, np.uint8), np.empty(_lowp.blocks(x.size), np.float32)
                _optim.q8_quantize(x, codes, am, lp.signed(s))
                assert np.array_equal(st[s].reshape(-1).numpy(), codes)
                assert np.array_equal(st[lp.absmax_key(s)].numpy(), am)
            else:
                assert torch.equal(st[s], ta.state[p][s])
    # and back: dequantized into a float32 optcore.torch Adam, then into torch.optim.Adam
    rs = [p.detach().clone().requires_grad_() for p in ps]
    full = ot.Adam(rs, lr=1e-2)
    full.load_state_dict(copy.deepcopy(low.state_dict()))
    back = torch.optim.Adam([p.detach().clone().requires_grad_() for p in ps], lr=1e-2)
    back.load_state_dict(copy.deepcopy(full.state_dict()))
    for q, r, b in zip(qs, rs, back.param_groups[0]["params"]):
        for s in ("exp_avg", "exp_avg_sq"):
            ref = decoded(low.state[q], s)
            assert full.state[r][s].dtype == torch.float32 and torch.equal(full.state[r][s], ref)
            assert torch.equal(back.state[b][s], ref)
            assert lp.absmax_key(s) not in full.state[r]


def test_bf16_params_interchange_with_torch_fused():
    """torch's Adam on bfloat16 parameters keeps bfloat16 state: it loads into optcore.torch's
    Adam on bfloat16 parameters (default state: bfloat16) bit for bit, and back."""
    ps, ta = _trained(torch.optim.Adam, dtype=torch.bfloat16, fused=True)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    oa = ot.Adam(qs, lr=1e-2)
    oa.load_state_dict(copy.deepcopy(ta.state_dict()))
    for p, q in zip(ps, qs):
        for s in ("exp_avg", "exp_avg_sq"):
            assert oa.state[q][s].dtype == torch.bfloat16
            assert torch.equal(oa.state[q][s], ta.state[p][s])
    _continue(qs, oa)
    tb = torch.optim.Adam(ps, lr=1e-2, fused=True)
    tb.load_state_dict(copy.deepcopy(oa.state_dict()))
    for p, q in zip(ps, qs):
        assert torch.equal(tb.state[p]["exp_avg"], oa.state[q]["exp_avg"])
        assert float(tb.state[p]["step"]) == 5.0


def test_kahan_state_round_trips():
    ps, opt = _trained(ot.Adam, dtype=torch.bfloat16, compensation=True)
    assert all(opt.state[p]["kahan_comp"].dtype == torch.bfloat16 for p in ps)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = ot.Adam(qs, lr=1e-2, compensation=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _continue(ps, opt)
    _continue(qs, opt2)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["kahan_comp"], opt2.state[q]["kahan_comp"])


def test_scheduler_drives_8bit_optimizer():
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = ot.Adam8bit(ps, lr=1e-2, min_8bit_size=100)
    b = ot.Adam8bit(qs, lr=1e-2, min_8bit_size=100)
    sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    for t in range(3):
        for p, q, g in zip(ps, qs, tensors(SHAPES, 70 + t)):
            p.grad, q.grad = g, g.clone()
        a.step()
        sched.step()
        b.param_groups[0]["lr"] = 1e-2 * 0.5 ** t
        b.step()
    assert a.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_with_16bit_params(dtype):
    """torch.amp.GradScaler('cpu') accepts bfloat16 and float16 gradients (it hands optcore its
    scale and overflow flag); a power-of-two scale is exact, so the step equals the unscaled
    one bit for bit; an overflow of the scaled float16 gradient skips the step."""
    torch.manual_seed(0)
    m = torch.nn.Linear(64, 8).to(dtype)
    m2 = copy.deepcopy(m)
    x = torch.randn(16, 64).to(dtype)
    a, b = ot.Adam(m.parameters(), lr=1e-2), ot.Adam(m2.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scaler.scale(m(x).float().pow(2).mean()).backward()
    scaler.step(a)
    scaler.update()
    m2(x).float().pow(2).mean().backward()
    b.step()
    assert a.last_result.applied and a.last_result.loss_scale == 16.0
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    if dtype == torch.float16:
        before = [p.detach().clone() for p in m.parameters()]
        m.zero_grad()
        big = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
        big.scale(m(x).float().pow(2).mean()).backward()
        big.step(a)
        assert a.last_result.skipped
        assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


def test_clip_and_nonfinite_on_16bit_grads():
    """GlobalNorm clipping reads bfloat16 gradients (norm of the exact widening); a NaN in a
    bfloat16 gradient with nonfinite='skip' leaves everything unchanged."""
    ps = [p.requires_grad_() for p in tensors(SHAPES, 0, torch.bfloat16)]
    opt = ot.Adam(ps, lr=1e-2, clip=optcore.clip.GlobalNorm(1.0), nonfinite="skip")
    gs = tensors(SHAPES, 80, torch.bfloat16)
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()
    ref = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))
    assert opt.last_result.grad_norm == pytest.approx(ref, rel=1e-6)
    before = [p.detach().clone() for p in ps], [opt.state[p]["exp_avg"].clone() for p in ps]
    ps[1].grad[3] = float("nan")
    opt.step()
    assert opt.last_result.skipped
    assert all(torch.equal(a, p) for a, p in zip(before[0], ps))
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(before[1], ps))


@pytest.mark.parametrize("kw,dtype", [
    (dict(state_dtype="bfloat16"), torch.bfloat16),
    (dict(state_dtype="int8"), torch.float32),
    (dict(compensation=True), torch.bfloat16),
    ({}, torch.float16),
])
def test_one_and_two_threads_are_bitwise_equal(kw, dtype):
    """Stochastic rounding hashes (seed, step, element index): the same bits for any thread
    count, on tensors far above one thread's share (2 x 70000 elements)."""
    out = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        ps = [p.requires_grad_() for p in tensors([(70000,), (350, 200)], 0, dtype)]
        opt = ot.Adam(ps, lr=1e-2, **kw)
        for t in range(3):
            for p, g in zip(ps, tensors([(70000,), (350, 200)], 90 + t, dtype)):
                p.grad = g
            opt.step()
        out.append((ps, opt))
    (pa, oa), (pb, ob) = out
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k])


def test_state_bytes_per_element():
    """8-bit Adam holds 2 bytes + 4/256 of scales per element (<= 2.1 as the issue asks);
    bfloat16 state 4; float32 8."""
    n = 1 << 16
    for sd, expected in [("int8", 2 + 8 / 256), ("bfloat16", 4), ("float32", 8)]:
        p = torch.zeros(n, requires_grad=True)
        p.grad = torch.ones(n)
        opt = ot.Adam([p], state_dtype=sd)
        opt.step()
        nbytes = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
        assert nbytes / n == expected
        assert opt.state_nbytes == nbytes and opt.state_bytes_per_param == expected


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,match", [
    (dict(state_dtype="float16"), ValueError, "state_dtype"),
    (dict(state_dtype=8), TypeError, "state_dtype"),
    (dict(min_8bit_size=0), ValueError, "min_8bit_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(rounding="up"), ValueError, "rounding"),
    (dict(compensation="yes"), TypeError, "compensation"),
    (dict(compensation=True, rounding="stochastic"), ValueError, "compensation"),
    (dict(state_dtype="int8", clip=optcore.clip.Adaptive(0.01)), ValueError, "Adaptive"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        ot.Adam([torch.zeros(3, requires_grad=True)], **kw)


def test_float64_param_refused():
    with pytest.raises(TypeError, match=r"param_groups\[0\] param 1 must have dtype"):
        ot.Adam([torch.zeros(3, requires_grad=True),
                 torch.zeros(3, dtype=torch.float64, requires_grad=True)])


def _model_and_opt(dtype=torch.bfloat16, **kw):
    m = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2)).to(dtype)
    opt = ot.Adam(m.parameters(), lr=1e-2, min_8bit_size=100, **kw)
    m(torch.randn(5, 40).to(dtype)).float().sum().backward()
    opt.step()
    m(torch.randn(5, 40).to(dtype)).float().sum().backward()
    return m, opt


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda opt, p: opt.state.__setitem__(p, dict(opt.state[p], exp_avg=opt.state[p]["exp_avg"].double())),
     TypeError, r"'exp_avg' of param_groups\[0\] param 0"),
    (lambda opt, p: opt.state.__setitem__(p, {k: v for k, v in opt.state[p].items()
                                               if k != "exp_avg_absmax"}),
     ValueError, r"exp_avg_absmax"),
    (lambda opt, p: opt.state.__setitem__(p, dict(opt.state[p], exp_avg_absmax=torch.zeros(1))),
     ValueError, r"block scales"),
])
def test_bad_state_raises_before_writing(mutate, exc, match):
    """A state tensor of a wrong dtype, 8-bit codes without (or with wrong) scales: the step
    raises naming the buffer and parameter, and nothing is written (the other, valid
    parameters included)."""
    m, opt = _model_and_opt(torch.float32, state_dtype="int8")
    p = list(m.parameters())[0]
    mutate(opt, p)
    before = snapshot(m, opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_unchanged(before, m, opt)


def test_compensation_needs_a_16bit_param():
    with pytest.raises(ValueError, match="compensation=True needs bfloat16 or float16"):
        ot.Adam([torch.zeros(3, requires_grad=True)], compensation=True)


def test_mixed_group_with_compensation():
    """A group mixing float32, bfloat16 and empty parameters under compensation=True: the
    float32 parameter steps exactly as without it (no Kahan buffer), the bfloat16 one as a
    group of its own with compensation (the kernel runs them as separate parts)."""
    f32, b16 = tensors([(3000,), (2000,)], 11)
    b16 = b16.bfloat16()
    ps = [f32.clone().requires_grad_(), b16.clone().requires_grad_(),
          torch.zeros(0, dtype=torch.bfloat16, requires_grad=True)]
    ra, rb = f32.clone().requires_grad_(), b16.clone().requires_grad_()
    opt = ot.Adam(ps, lr=1e-2, compensation=True)
    oa, ob = ot.Adam([ra], lr=1e-2), ot.Adam([rb], lr=1e-2, compensation=True)
    for t in range(3):
        ga, gb = tensors([(3000,), (2000,)], 400 + t)
        ps[0].grad, ps[1].grad, ps[2].grad = ga, gb.bfloat16(), torch.zeros(0, dtype=torch.bfloat16)
        ra.grad, rb.grad = ga.clone(), gb.bfloat16()
        opt.step()
        oa.step()
        ob.step()
    assert torch.equal(ps[0], ra) and "kahan_comp" not in opt.state[ps[0]]
    assert torch.equal(ps[1], rb)
    assert torch.equal(opt.state[ps[1]]["kahan_comp"], ob.state[rb]["kahan_comp"])
    assert opt.state[ps[2]]["kahan_comp"].shape == (0,)


def test_load_state_dict_refuses_8bit_without_scales():
    ps, opt = _trained(ot.Adam8bit, min_8bit_size=100)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["exp_avg_absmax"]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = ot.Adam8bit(qs, lr=1e-2)
    _continue(qs, opt2, steps=1)
    before = [{k: v.clone() for k, v in opt2.state[q].items()} for q in qs]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt2.load_state_dict(sd)
    sd["state"][0]["exp_avg_absmax"] = opt.state[ps[0]]["exp_avg_absmax"]
    sd["state"][1]["exp_avg_sq"] = sd["state"][1]["exp_avg_sq"].double()
    with pytest.raises(TypeError, match=r"'exp_avg_sq' of param_groups\[0\] param 1"):
        opt2.load_state_dict(sd)
    for q, b in zip(qs, before):   # nothing was loaded
        assert sorted(opt2.state[q]) == sorted(b)
        assert all(torch.equal(v, b[k]) for k, v in opt2.state[q].items())
    assert opt2.param_groups[0]["lr"] == 1e-2


# -- master weights with a model copy -------------------------------------------------------

def _master_and_copy(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Tanh(),
                            torch.nn.Linear(200, 4)).to(dtype)
    return m, [p.detach().float().clone() for p in m.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_model_copy_is_the_rounded_master(dtype, state_dtype):
    """model_copy=: the float32 masters step exactly as a float32 optimizer fed the widened
    16-bit gradients (bitwise), and each copy is its master rounded to nearest (torch's own
    .to(dtype)), written in the same sweep."""
    m, master = _master_and_copy(dtype)
    ref = [p.clone().requires_grad_() for p in master]
    opt = ot.AdamW(master, lr=1e-2, model_copy=list(m.parameters()), state_dtype=state_dtype,
                   min_8bit_size=100)
    ropt = ot.AdamW(ref, lr=1e-2, state_dtype=state_dtype, min_8bit_size=100)
    for t in range(3):
        opt.zero_grad()
        assert all(p.grad is None for p in m.parameters()) or t == 0
        x = tensors([(8, 300)], 200 + t, dtype)[0]
        m(x).float().pow(2).mean().backward()
        for r, p in zip(ref, m.parameters()):
            r.grad = p.grad.float()
        opt.step()
        ropt.step()
    for a, r, c in zip(master, ref, m.parameters()):
        assert torch.equal(a, r.detach())
        assert c.dtype == dtype and torch.equal(c.detach(), a.to(dtype))


def test_model_copy_bad_input():
    m, master = _master_and_copy(torch.bfloat16)
    copies = list(m.parameters())
    with pytest.raises(ValueError, match="model_copy has 3 tensors for 4 parameters"):
        ot.Adam(master, model_copy=copies[:3])
    with pytest.raises(TypeError, match="model copy of param_groups.0. param 1 must have dtype"):
        ot.Adam(master, model_copy=[copies[0], master[1].clone()] + copies[2:])
    with pytest.raises(ValueError, match="model copy of param_groups.0. param 0 has shape"):
        ot.Adam(master, model_copy=[copies[0].t()] + copies[1:])
    with pytest.raises(TypeError, match="float32 master weights"):
        ot.Adam([p.detach().clone() for p in copies], model_copy=copies)
    with pytest.raises(ValueError, match="share memory"):
        ot.Adam(master, model_copy=[copies[0], copies[0].detach().reshape(-1)[:200]] + copies[2:])
    opt = ot.Adam(master, model_copy=copies)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [torch.zeros(3)]})
    m(torch.randn(2, 300).bfloat16()).float().sum().backward()
    master[2].grad = torch.zeros_like(master[2])
    before = [p.clone() for p in master], [c.detach().clone() for c in copies]
    with pytest.raises(ValueError, match=r"param_groups\[0\] param 2 has its own .grad"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], master))
    assert all(torch.equal(a, b) for a, b in zip(before[1], copies))
    assert not opt.state
