"""The C check of array lists (``_norms.buffers`` behind ``_checks.array_table``) that
optcore.clip and scaling.accumulate_ run over every array: it accepts exactly what the full
check ``_checks.float_buffer`` accepts, reports the addresses, sizes and formats the kernels
need, and a bad entry anywhere in a long float32/bfloat16/float16 list raises the full check's
error naming it, before anything is written."""
import ml_dtypes
import numpy as np
import pytest

from optcore import _checks as ck
from optcore import _lowp, clip, scaling
from optcore._kernels import _norms

HALF = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ALL = {"float32": np.float32, **HALF}


def misaligned(dtype, n=6):
    """A writeable C-contiguous array of ``n`` elements one byte off its alignment."""
    itemsize = np.dtype(dtype).itemsize
    return np.zeros(n * itemsize + 1, np.uint8)[1:].view(dtype)


def swapped(dtype, n=6):
    a = np.ones(n, dtype)
    return a.view(a.dtype.newbyteorder(">"))


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def candidates():
    """Good and bad entries of every kind the check must tell apart, by name."""
    out = {}
    for name, dt in ALL.items():
        out[f"{name}"] = np.ones(5, dt)
        out[f"{name}-2d"] = np.ones((3, 4), dt)
        out[f"{name}-0d"] = np.ones((), dt)
        out[f"{name}-empty"] = np.ones((0, 3), dt)
        out[f"{name}-strided"] = np.ones((4, 4), dt)[:, ::2]
        out[f"{name}-fortran"] = np.asfortranarray(np.ones((3, 4), dt))
        out[f"{name}-readonly"] = read_only(np.ones(5, dt))
        out[f"{name}-misaligned"] = misaligned(dt)
        out[f"{name}-swapped"] = swapped(dt)
    for dt in (np.float64, np.int16, np.uint16, np.int32, ml_dtypes.float8_e4m3fn, np.complex64):
        out[np.dtype(dt).name] = np.ones(4, dt)
    out["memmap-like subclass"] = np.ones(4, np.float32).view(np.matrix)
    out["list"] = [1.0, 2.0]
    out["None"] = None
    out["scalar"] = np.float32(1.0)
    return out


CANDIDATES = candidates()


def full_check_passes(a, writeable, half):
    dtypes = ("float32",) + ck.HALF_DTYPES if half else ("float32",)
    try:
        ck.float_buffer("x", a, writeable=writeable, dtypes=dtypes)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("writeable", [False, True])
@pytest.mark.parametrize("case", list(CANDIDATES))
def test_c_check_accepts_what_float_buffer_accepts(case, writeable, half):
    """Behind a good entry, the candidate is reported bad exactly when the full check refuses
    it; an accepted entry gets its true address, size, bytes and kernel format."""
    good = np.ones(3, np.float32)
    a = CANDIDATES[case]
    addr, lengths, nbytes, formats, bad = _norms.buffers([good, a], writeable, half)
    assert addr[0] == good.__array_interface__["data"][0] and lengths[0] == 3 and nbytes[0] == 12
    if not full_check_passes(a, writeable, half):
        assert bad == 1
        return
    assert bad == -1
    assert addr[1] == a.__array_interface__["data"][0]
    assert (lengths[1], nbytes[1]) == (a.size, a.nbytes)
    kind = _lowp.FORMATS[a.dtype.name]
    if kind == _lowp.FORMATS["float32"]:
        assert formats is None
    else:
        np.testing.assert_array_equal(formats, [_lowp.FORMATS["float32"], kind])


def test_c_check_formats_of_a_long_mixed_list():
    rng = np.random.default_rng(0)
    names = rng.choice(list(ALL), 1000)
    arrays = [np.ones(int(n), ALL[d]) for d, n in zip(names, rng.integers(0, 50, 1000))]
    addr, lengths, nbytes, formats, bad = _norms.buffers(arrays, True, True)
    assert bad == -1
    np.testing.assert_array_equal(formats, [_lowp.FORMATS[d] for d in names])
    np.testing.assert_array_equal(lengths, [a.size for a in arrays])
    np.testing.assert_array_equal(nbytes, [a.nbytes for a in arrays])
    np.testing.assert_array_equal(addr, [a.__array_interface__["data"][0] for a in arrays])
    # without ``half`` the first 16-bit array is the bad one
    first_half = int(np.flatnonzero(names != "float32")[0])
    assert _norms.buffers(arrays, True, False)[-1] == first_half


def long_list(dtype, n=1000):
    """``n`` small gradients of ``dtype`` (mixed with float32 every third one) and copies."""
    rng = np.random.default_rng(1)
    g = [rng.standard_normal(7).astype(np.float32 if i % 3 == 2 else dtype) for i in range(n)]
    return g, [a.copy() for a in g]


# (bad entry at index 500, exception, message) for the in-place clipping functions
BAD_ENTRIES = {
    "float64": (lambda dt: np.ones(7), TypeError,
                r"grads\[500\] must have dtype float32 or bfloat16 or float16, got float64"),
    "uint16": (lambda dt: np.ones(7, np.uint16), TypeError, r"grads\[500\] must have dtype"),
    "list": (lambda dt: [1.0] * 7, TypeError, r"grads\[500\] must be a numpy.ndarray"),
    "strided": (lambda dt: np.ones((7, 2), dt)[:, 0], ValueError,
                r"grads\[500\] must be C-contiguous"),
    "read-only": (lambda dt: read_only(np.ones(7, dt)), ValueError, r"grads\[500\] is read-only"),
    "swapped": (lambda dt: swapped(dt, 7), TypeError, r"grads\[500\] must have dtype .* in native"),
    "misaligned": (lambda dt: misaligned(dt, 7), ValueError,
                   r"grads\[500\] is not aligned to its \d-byte elements"),
}


def with_bad_entry(dtype, bad):
    """A long list of ``dtype`` with bad entry ``bad`` at index 500, its copy, and the
    exception and message the clipping functions raise for it."""
    make, exc, message = BAD_ENTRIES[bad]
    g, before = long_list(ALL[dtype])
    g[500] = make(ALL[dtype])
    before[500] = g[500].copy()
    return g, before, exc, message


def assert_unchanged(g, before):
    """Every entry holds the bytes of its copy taken before the call."""
    for a, b in zip(g, before):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        else:
            assert a == b


@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
@pytest.mark.parametrize("dtype", list(ALL))
def test_clip_functions_refuse_a_bad_entry_of_a_long_list(dtype, bad):
    g, before, exc, message = with_bad_entry(dtype, bad)
    calls = [lambda: clip.clip_by_global_norm_(g, 1e-3), lambda: clip.clip_by_norm_(g, 1e-3),
             lambda: clip.clip_by_value_(g, 1e-3), lambda: clip.clip_by_global_norm_(tuple(g), 0)]
    if bad != "read-only":  # reading a read-only gradient is fine
        calls += [lambda: clip.global_norm(g), lambda: clip.tensor_norms(g, "inf")]
    for call in calls:
        with pytest.raises(exc, match=message):
            call()
        assert_unchanged(g, before)


@pytest.mark.parametrize("dtype", list(ALL))
def test_clip_functions_refuse_overlap_in_a_long_list(dtype):
    g, before = long_list(ALL[dtype])
    base = np.zeros(14, ALL[dtype])
    g[10], g[990] = base[:7], base[6:13]  # one element shared
    before[10], before[990] = g[10].copy(), g[990].copy()
    with pytest.raises(ValueError, match=r"grads\[10\] and grads\[990\] share memory"):
        clip.clip_by_global_norm_(g, 1e-3)
    assert_unchanged(g, before)
    g[990] = base[7:]  # adjacent, not shared: accepted, and read-only use never checks
    assert clip.clip_by_value_(g, 10.0) > 0


@pytest.mark.parametrize("dtype", list(HALF))
def test_clip_of_a_long_mixed_list_is_the_float32_result_rounded(dtype):
    """1000 small gradients, 16-bit mixed with float32: the table built from the C check's
    addresses and formats reads and writes every array as its own format."""
    g, _ = long_list(ALL[dtype])
    wide = [a.astype(np.float32) for a in g]
    assert clip.global_norm(g) == clip.global_norm(wide)
    assert clip.clip_by_global_norm_(g, 1.0) == clip.clip_by_global_norm_(wide, 1.0)
    for a, w in zip(g, wide):
        np.testing.assert_array_equal(a.view(np.uint8), w.astype(a.dtype).view(np.uint8))


@pytest.mark.parametrize("bad", [k for k in BAD_ENTRIES if k != "read-only"])
@pytest.mark.parametrize("dtype", list(ALL))
def test_accumulate_refuses_a_bad_gradient_of_a_long_list(dtype, bad):
    g, g_before, exc, message = with_bad_entry(dtype, bad)
    acc = [np.full(7, 2.0, np.float32) for _ in g]
    acc_before = [a.copy() for a in acc]
    with pytest.raises(exc, match=message.replace("grads", "grad")):
        scaling.accumulate_(acc, g)
    assert_unchanged(acc, acc_before)
    assert_unchanged(g, g_before)


@pytest.mark.parametrize("dtype", list(ALL))
def test_accumulate_reads_read_only_gradients(dtype):
    g, _ = long_list(ALL[dtype])
    g = [read_only(a) for a in g]
    acc = [np.zeros(7, np.float32) for _ in g]
    scaling.accumulate_(acc, g, first=True)
    for a, b in zip(acc, g):
        np.testing.assert_array_equal(a, b.astype(np.float32))


@pytest.mark.parametrize("dtype", list(HALF))
def test_accumulate_refuses_bad_accumulators_and_pairs(dtype):
    g, g_before = long_list(ALL[dtype])
    acc = [np.full(7, 2.0, np.float32) for _ in g]
    acc_before = [a.copy() for a in acc]
    cases = [
        ({3: np.ones(7, ALL[dtype])}, g, TypeError, r"acc\[3\] must have dtype float32, got"),
        ({3: read_only(acc[3])}, g, ValueError, r"acc\[3\] is read-only"),
        ({3: misaligned(np.float32, 7)}, g, ValueError, r"acc\[3\] is not aligned"),
        ({}, g[:-1], ValueError, r"grad has 999 tensors but acc has 1000"),
        ({}, g[:5] + [g[5][:6]] + g[6:], ValueError, r"grad\[5\] has 6 elements"),
        ({}, g[:7] + [acc[8].view(np.uint16)[:7].view(ALL[dtype])] + g[8:], ValueError,
         r"acc\[8\] and grad\[7\] share memory"),
    ]
    for swap, grads, exc, message in cases:
        accs = [swap.get(i, a) for i, a in enumerate(acc)]
        with pytest.raises(exc, match=message):
            scaling.accumulate_(accs, grads)
        assert_unchanged(acc, acc_before)
        assert_unchanged(g, g_before)


def test_accumulate_names_single_arrays_without_index():
    acc = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"^acc and grad share memory"):
        scaling.accumulate_(acc, acc.view(np.uint16)[:8].view(np.float16))
    np.testing.assert_array_equal(acc, 0)
