"""The norm kernel (optcore._kernels._norms) against float64 NumPy references.

Tolerances: the kernel sums float32 squares in 32 float32 lanes over blocks of 4096 elements
(128 additions per lane, each with relative rounding <= 2^-24) and folds each block into
float64; the rounding errors are independent, so a block's relative error is ~sqrt(128) *
2^-24 ~ 7e-7 at worst in practice and they average out over blocks. 1e-6 relative is the
issue's bound. Blocks that overflow or underflow float32 are summed in float64 (error ~1e-16).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore
from optcore import clip
from optcore._kernels import _norms
from optcore._kernels._runtime import TensorList


def ref_sumsq(arrays):
    """float64 reference: per-tensor sums of squares."""
    return np.array([np.sum(np.asarray(a, dtype=np.float64) ** 2) for a in arrays])


def run(arrays, slot2=None):
    slots = [arrays] if slot2 is None else [arrays, slot2]
    return _norms.sumsq(TensorList(slots), 0, -1 if slot2 is None else 1)


def mixed(rng, n, lo=-30, hi=30):
    """Values of log-uniform magnitude in [10^lo, 10^hi] with random signs."""
    mag = 10.0 ** rng.uniform(lo, hi, n)
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def test_per_tensor_and_global_match_float64(rng):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(300, 70), (5,), (1,), (40000,), (3, 3, 3)]]
    tsq, tmax = run(arrays)
    ref = ref_sumsq(arrays)
    np.testing.assert_allclose(tsq, ref, rtol=1e-6)
    np.testing.assert_array_equal(tmax, [np.abs(a).max() for a in arrays])
    assert clip.global_norm(arrays) == pytest.approx(math.sqrt(ref.sum()), rel=1e-6)
    assert clip.global_norm(arrays, norm_type=math.inf) == max(np.abs(a).max() for a in arrays)


def test_mixed_magnitudes_1e_minus30_to_1e30(rng):
    x = mixed(rng, 1 << 20)
    ref = math.sqrt(math.fsum((x.astype(np.float64) ** 2).tolist()))
    assert math.isfinite(clip.global_norm(x))
    assert clip.global_norm(x) == pytest.approx(ref, rel=1e-6)
    # tensors that each hold one magnitude band
    bands = [mixed(rng, 50_000, e, e + 1) for e in range(-30, 30, 6)]
    np.testing.assert_allclose(clip.tensor_norms(bands), np.sqrt(ref_sumsq(bands)), rtol=1e-6)


def test_overflow_fallback_gives_finite_correct_norm():
    # squares of 3e38 overflow float32 (and so would a float32 lane sum of 1e18's)
    for v in (3.0e38, 1.0e20, 1.0e18):
        x = np.full(100_000, v, dtype=np.float32)
        ref = math.sqrt(100_000) * float(np.float32(v))
        assert clip.global_norm(x) == pytest.approx(ref, rel=1e-12)
    x = np.zeros(70_000, np.float32)
    x[12345] = np.finfo(np.float32).max
    x[54321] = -np.finfo(np.float32).max
    assert clip.global_norm(x) == pytest.approx(math.sqrt(2) * float(np.finfo(np.float32).max), rel=1e-12)


def test_underflow_fallback_tiny_values(rng):
    for v in (1e-30, 1e-20, 1e-42):  # the last is subnormal
        x = np.full(50_000, v, dtype=np.float32)
        ref = math.sqrt(50_000) * float(np.float32(v))
        assert clip.global_norm(x) == pytest.approx(ref, rel=1e-12)


def test_subnormals_counted_even_with_flush_denormal():
    optcore.set_flush_denormal(True)
    x = np.full(40_000, 1e-40, dtype=np.float32)
    assert clip.global_norm(x) == pytest.approx(200 * float(np.float32(1e-40)), rel=1e-12)
    assert clip.global_norm(x, math.inf) == float(np.float32(1e-40))


def test_nonfinite_flag_and_first_tensor(rng):
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (10, 50_000, 7, 20_000)]
    arrays[1][33333] = np.inf
    arrays[3][5] = np.nan
    tsq, tmax = run(arrays)
    assert np.isfinite(tsq).tolist() == [True, False, True, False]
    assert tsq[1] == np.inf and math.isnan(tsq[3])
    assert tmax[1] == np.inf and math.isnan(tmax[3])
    assert clip.first_nonfinite(tsq) == 1
    assert math.isnan(clip.global_norm(arrays))
    assert math.isnan(clip.global_norm(arrays, "inf"))
    assert clip.global_norm(arrays[:2]) == np.inf
    assert clip.global_norm(arrays[:2], np.inf) == np.inf


def test_two_slots_read_as_sum(rng):
    a = [rng.standard_normal(n).astype(np.float32) for n in (40_000, 9)]
    b = [rng.standard_normal(x.size).astype(np.float32) for x in a]
    tsq, tmax = run(a, b)
    s = [x + y for x, y in zip(a, b)]  # float32 sums, as the update kernel reads them
    np.testing.assert_allclose(tsq, ref_sumsq(s), rtol=1e-6)
    np.testing.assert_array_equal(tmax, [np.abs(x).max() for x in s])


def test_empty_inputs():
    assert clip.global_norm([]) == 0.0
    assert clip.global_norm(np.zeros(0, np.float32)) == 0.0
    assert clip.tensor_norms([np.zeros(0, np.float32), np.ones(4, np.float32)]).tolist() == [0.0, 2.0]
    assert clip.global_norm(np.zeros(100_000, np.float32)) == 0.0


@pytest.mark.parametrize("maker", ["normal", "mixed"])
def test_bitwise_same_for_1_and_2_threads(rng, maker):
    sizes = (300_000, 17, 70_001, 16384, 1)
    if maker == "normal":
        arrays = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    else:
        arrays = [mixed(rng, n) for n in sizes]
    out = []
    for nt in (1, 2):
        optcore.set_num_threads(nt)
        tsq, tmax = run(arrays)
        out.append((tsq.tobytes(), tmax.tobytes(), clip.global_norm(arrays)))
    assert out[0] == out[1]


def test_per_tensor_is_sum_of_its_chunks_in_order(rng):
    x = rng.standard_normal(3 * 16384 + 100).astype(np.float32)
    pieces = [x[i:i + 16384] for i in range(0, x.size, 16384)]
    whole, _ = run([x])
    parts, _ = run(pieces)
    s = 0.0
    for p in parts:
        s += p
    assert whole[0] == s


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=6),
    exponent=st.integers(-25, 25),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_against_float64(sizes, exponent, seed):
    r = np.random.default_rng(seed)
    arrays = [(r.standard_normal(n) * 10.0**exponent).astype(np.float32) for n in sizes]
    tsq, tmax = run(arrays)
    np.testing.assert_allclose(tsq, ref_sumsq(arrays), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(tmax, [np.abs(a).max() if a.size else 0.0 for a in arrays])


def ref_units(a):
    """float64 reference of the AGC units: rows along axis 0, a 0-d/1-d tensor is one unit."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2:
        return np.array([np.sum(a**2)])
    return np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)


def test_unit_sums_match_float64(rng):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(64, 9000), (5,), (8, 3, 3, 3), (2, 0)]]
    tensor, start, length, counts = clip._units(arrays)
    assert counts.tolist() == [64, 1, 8, 2]
    tl = TensorList([arrays])
    got = _norms.unit_sumsq(tl, 0, tensor, start, length)
    np.testing.assert_allclose(got, np.concatenate([ref_units(a) for a in arrays]), rtol=1e-6)
    optcore.set_num_threads(1)
    one = _norms.unit_sumsq(tl, 0, tensor, start, length)
    optcore.set_num_threads(2)
    two = _norms.unit_sumsq(tl, 0, tensor, start, length)
    assert one.tobytes() == two.tobytes()


def test_accumulate_kernel(rng):
    acc = [np.full(n, 7.0, np.float32) for n in (50_000, 3)]
    g1 = [rng.standard_normal(a.size).astype(np.float32) for a in acc]
    g2 = [rng.standard_normal(a.size).astype(np.float32) for a in acc]
    optcore.kernels.accumulate_(acc, g1, first=True)
    for a, g in zip(acc, g1):
        np.testing.assert_array_equal(a, g)
    optcore.kernels.accumulate_(acc, g2)
    for a, x, y in zip(acc, g1, g2):
        np.testing.assert_array_equal(a, x + y)


def test_accumulate_bad_input_changes_nothing(rng):
    acc = rng.standard_normal(10).astype(np.float32)
    before = acc.copy()
    with pytest.raises(TypeError, match="grad"):
        optcore.kernels.accumulate_(acc, np.ones(10))
    with pytest.raises(ValueError, match="grad"):
        optcore.kernels.accumulate_(acc, np.ones(11, np.float32))
    with pytest.raises(ValueError, match="share memory"):
        optcore.kernels.accumulate_(acc, acc)
    with pytest.raises(TypeError, match="first"):
        optcore.kernels.accumulate_(acc, np.ones(10, np.float32), first=1)
    ro = np.ones(10, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="acc"):
        optcore.kernels.accumulate_(ro, np.ones(10, np.float32))
    np.testing.assert_array_equal(acc, before)


def test_norm_bad_input():
    x = np.ones(10)
    with pytest.raises(TypeError, match="grads"):
        clip.global_norm(x)
    with pytest.raises(ValueError, match="C-contiguous"):
        clip.global_norm(np.ones((4, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="norm_type"):
        clip.global_norm(np.ones(3, np.float32), norm_type=1)
    with pytest.raises(ValueError, match="norm_type"):
        clip.tensor_norms(np.ones(3, np.float32), norm_type="fro")
    with pytest.raises(TypeError, match="norm_type"):
        clip.global_norm(np.ones(3, np.float32), norm_type=None)
    with pytest.raises(TypeError, match="grads"):
        clip.global_norm("abc")
    # read-only buffers are fine for a norm
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    assert clip.global_norm(ro) == 2.0


def test_64M_mixed_magnitudes_within_1e_minus6():
    """The issue's bound at full size: 64M elements of magnitudes 1e-30..1e30."""
    n, piece = 1 << 26, 1 << 22
    x = np.empty(n, np.float32)
    parts = []
    r = np.random.default_rng(2026)
    for i in range(0, n, piece):
        x[i:i + piece] = mixed(r, piece)
        parts.append(float(np.sum(x[i:i + piece].astype(np.float64) ** 2)))
    ref = math.sqrt(math.fsum(parts))
    assert clip.global_norm(x) == pytest.approx(ref, rel=1e-6)


# ---- p-norm partials (norm_type other than 2 and inf, used by optcore.torch) ----------------


def _ref_parts(arrays, p):
    """float64 NumPy: sum |x|^p, the count of nonzeros (p = 0) or min |x| (p = -inf)."""
    out = []
    for a in arrays:
        x = np.abs(a.astype(np.float64)).ravel()
        if p == 0:
            out.append(float(np.count_nonzero(x)))
        elif p == -math.inf:
            out.append(float(x.min()) if x.size else math.inf)
        else:
            with np.errstate(divide="ignore"):
                out.append(float(np.sum(x ** p)))
    return np.array(out)


@pytest.mark.parametrize("p", [0.0, 1.0, 3.0, 0.5, -1.0, -math.inf])
def test_pnorm_parts_match_float64_and_threads(p):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (70_001, 0, 5, 40_000)]
    arrays[2][1] = 0.0
    tl = TensorList([arrays])
    got = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        got.append(_norms.pnorm_parts(tl, 0, p))
    np.testing.assert_array_equal(got[0], got[1])  # bitwise, any thread count
    # float64 terms summed in chunk order vs NumPy's pairwise sum: ~1e-12 relative apart
    np.testing.assert_allclose(got[0], _ref_parts(arrays, p), rtol=1e-11, atol=0)


def test_pnorm_parts_nan_propagates_and_bad_p():
    a = [np.array([1.0, np.nan, 0.0], np.float32)]
    tl = TensorList([a])
    assert np.isnan(_norms.pnorm_parts(tl, 0, 1.0)[0])
    assert np.isnan(_norms.pnorm_parts(tl, 0, -math.inf)[0])
    assert _norms.pnorm_parts(tl, 0, 0.0)[0] == 2.0  # NaN counts as nonzero, as torch
    for bad in (2.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="pnorm_parts"):
            _norms.pnorm_parts(tl, 0, bad)
