"""The norm, clipping and accumulation passes on 16-bit gradient slots (bfloat16, float16):
every pass over a table whose slot holds 16-bit tensors equals the same pass over the exact
float32 widening of those tensors (bitwise), and the in-place passes round the float32 result
back to nearest even, as NumPy's (and torch's) float32 -> 16-bit conversion does."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore._kernels import _norms, _optim
from optcore._kernels._runtime import TensorList

DTYPES = {"float32": (np.float32, _optim.F32), "bfloat16": (ml_dtypes.bfloat16, _optim.BF16),
          "float16": (np.float16, _optim.F16)}


def table(arrays, slot=1, acc=None):
    """A table with ``arrays`` (any of the three dtypes) in ``slot`` and optional float32
    ``acc`` in slot 2; 16-bit arrays are passed as their uint16 bits with their format."""
    kinds = np.array([DTYPES[a.dtype.name][1] for a in arrays], np.uint8)
    raw = [a if a.dtype == np.float32 else a.view(np.uint16) for a in arrays]
    slots = [None] * 3
    slots[slot] = raw
    if acc is not None:
        slots[2] = acc
    if slot == 0:
        slots[1] = None
    tl = TensorList([raw] + [None] * 2) if slot == 0 else TensorList(
        [[np.zeros(a.size, np.float32) for a in arrays]] + slots[1:])
    tl.set_slot_format(slot, kinds)
    return tl


def widened(arrays):
    return [a.astype(np.float32) for a in arrays]


def grads(rng, sizes, dtypes, spread=2.0):
    out = []
    for n, d in zip(sizes, dtypes):
        x = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * spread)
        out.append(x.astype(np.float32).astype(DTYPES[d][0]))
    return out


sizes_st = st.lists(st.integers(0, 40000), min_size=1, max_size=5)
dtypes_st = st.lists(st.sampled_from(list(DTYPES)), min_size=5, max_size=5)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st, dtypes=dtypes_st, seed=st.integers(0, 2**31), with_acc=st.booleans())
def test_sumsq_of_16bit_slot_is_the_sumsq_of_its_widening(sizes, dtypes, seed, with_acc):
    rng = np.random.default_rng(seed)
    gs = grads(rng, sizes, dtypes)
    acc = [rng.standard_normal(a.size).astype(np.float32) for a in gs] if with_acc else None
    got = _norms.sumsq(table(gs, acc=acc), 1, 2 if with_acc else -1)
    ref_tl = TensorList([[np.zeros(a.size, np.float32) for a in gs], widened(gs)]
                        + ([acc] if with_acc else []))
    want = _norms.sumsq(ref_tl, 1, 2 if with_acc else -1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # and against float64 NumPy: the kernel sums squares in float32 lanes of at most
    # 4096 / 32 = 128 terms per block (relative error <= 128 * 2^-24 < 1e-5), blocks in float64
    for i, a in enumerate(gs):
        x = (a.astype(np.float32) + (acc[i] if with_acc else 0)).astype(np.float64)
        np.testing.assert_allclose(got[0][i], np.sum(x * x), rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 0.0, 3.0, -np.inf])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pnorm_parts_of_16bit_slot(p, dtype):
    rng = np.random.default_rng(1)
    gs = grads(rng, [70000, 5, 0, 1000], [dtype, "float32", dtype, dtype], spread=1.0)
    gs[1][2] = 0.0
    got = _norms.pnorm_parts(table(gs), 1, p)
    want = _norms.pnorm_parts(TensorList([[np.zeros(a.size, np.float32) for a in gs],
                                          widened(gs)]), 1, p)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_accumulate_widens_16bit_gradients(dtype):
    rng = np.random.default_rng(2)
    gs = grads(rng, [40000, 7], [dtype, dtype], spread=0.5)
    acc = [np.full(a.size, 0.25, np.float32) for a in gs]
    tl = table(gs, acc=acc)
    _norms.accumulate(tl, 1, 2, True)
    for a, g in zip(acc, gs):
        np.testing.assert_array_equal(a, g.astype(np.float32))
    _norms.accumulate(tl, 1, 2, False)
    for a, g in zip(acc, gs):
        np.testing.assert_array_equal(a, g.astype(np.float32) + g.astype(np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_scale_and_clamp_round_back_to_nearest(dtype):
    rng = np.random.default_rng(3)
    gs = grads(rng, [50000, 300], [dtype, "float32"], spread=1.0)
    before = [a.copy() for a in gs]
    tl = table(gs)
    ts = np.array([0.5, 2.0], np.float32)
    _norms.scale(tl, 1, 0.3, ts)
    for a, b, t in zip(gs, before, ts):
        want = (b.astype(np.float32) * np.float32(np.float32(0.3) * t)).astype(a.dtype)
        np.testing.assert_array_equal(a.view(np.uint8), want.view(np.uint8))
    before = [a.copy() for a in gs]
    gs[0][5] = np.nan
    before[0][5] = np.nan
    m = _norms.clamp(tl, 1, 0.1)
    assert np.isnan(m)
    for a, b in zip(gs, before):
        want = np.clip(b.astype(np.float32), -0.1, 0.1).astype(a.dtype)
        np.testing.assert_array_equal(a.view(np.uint8), want.view(np.uint8))


def test_16bit_passes_are_thread_count_independent():
    rng = np.random.default_rng(4)
    gs = grads(rng, [200000, 3000, 70000], ["bfloat16", "float16", "bfloat16"])
    out = []
    for n in (1, 2):
        optcore.set_num_threads(n)
        try:
            tl = table([a.copy() for a in gs])
            sq, mx = _norms.sumsq(tl, 1)
            parts = _norms.pnorm_parts(tl, 1, 3.0)
            out.append((sq, mx, parts))
        finally:
            optcore.set_num_threads(None)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_clip_functions_take_16bit_gradients(dtype):
    """optcore.clip on 16-bit (and mixed) gradient lists: norms of the widened values, and
    in-place results that are the float32 results rounded to nearest even."""
    rng = np.random.default_rng(6)
    gs = grads(rng, [30000, 100, 5], [dtype, "float32", dtype], spread=0.5)
    wide = widened(gs)
    assert optcore.clip.global_norm(gs) == optcore.clip.global_norm(wide)
    np.testing.assert_array_equal(optcore.clip.tensor_norms(gs, "inf"),
                                  optcore.clip.tensor_norms(wide, "inf"))
    total = optcore.clip.clip_by_global_norm_(gs, 1.0)
    assert total == optcore.clip.clip_by_global_norm_(wide, 1.0)
    for a, w in zip(gs, wide):
        np.testing.assert_array_equal(a.view(np.uint8), w.astype(a.dtype).view(np.uint8))
    wide = widened(gs)
    np.testing.assert_array_equal(optcore.clip.clip_by_norm_(gs, 0.1),
                                  optcore.clip.clip_by_norm_(wide, 0.1))
    for a, w in zip(gs, wide):
        np.testing.assert_array_equal(a.view(np.uint8), w.astype(a.dtype).view(np.uint8))
    wide = widened(gs)
    assert optcore.clip.clip_by_value_(gs, 0.01) == optcore.clip.clip_by_value_(wide, 0.01)
    for a, w in zip(gs, wide):
        np.testing.assert_array_equal(a.view(np.uint8), w.astype(a.dtype).view(np.uint8))


def test_clip_functions_refuse_bad_16bit_input_unchanged():
    rng = np.random.default_rng(7)
    g = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    before = g.copy()
    with pytest.raises(ValueError, match=r"grads\[0\] must be C-contiguous"):
        optcore.clip.clip_by_global_norm_([g[:, ::2], g], 0.1)
    ro = g.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\[1\] is read-only"):
        optcore.clip.clip_by_value_([g, ro], 0.01)
    with pytest.raises(ValueError, match="share memory"):
        optcore.clip.clip_by_value_([g, g[:3]], 0.01)
    with pytest.raises(TypeError, match=r"grads\[1\] must have dtype float32 or bfloat16 or float16"):
        optcore.clip.clip_by_global_norm_([g, g.astype(np.float64)], 0.1)
    np.testing.assert_array_equal(g.view(np.uint16), before.view(np.uint16))


def test_accumulate_function_takes_16bit_gradients():
    rng = np.random.default_rng(8)
    gs = grads(rng, [20000, 3], ["bfloat16", "float16"], spread=0.5)
    acc = [np.zeros(a.size, np.float32) for a in gs]
    optcore.scaling.accumulate_(acc, gs, first=True)
    optcore.scaling.accumulate_(acc, gs)
    for a, g in zip(acc, gs):
        np.testing.assert_array_equal(a, 2 * g.astype(np.float32))
    before = [a.copy() for a in acc]
    with pytest.raises(ValueError, match="share memory"):
        optcore.scaling.accumulate_(acc, [acc[0].view(np.uint16)[: 2 * 20000].view(np.float16)[:20000], gs[1]])
    for a, b in zip(acc, before):
        np.testing.assert_array_equal(a, b)
