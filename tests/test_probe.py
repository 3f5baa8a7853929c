"""The roofline probe sweeps (optcore._kernels._probe): results vs NumPy, determinism, bad input."""
import ml_dtypes
import numpy as np
import pytest

import optcore
from optcore._kernels import _probe

# Sizes: empty, shorter than a SIMD lane group, a ragged tail, several chunks (parallel path).
SIZES = [0, 1, 15, 1000, 16384 * 3 + 17]


def _arrays(rng, n, k):
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(k)]


@pytest.mark.parametrize("n", SIZES)
def test_copy(rng, n):
    dst, src = _arrays(rng, n, 2)
    _probe.copy(dst, src)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("n", SIZES)
def test_triad(rng, n):
    a, b, c = _arrays(rng, n, 3)
    _probe.triad(a, b, c, 3.0)
    # One float32 multiply and one add, no FMA contraction (-ffp-contract=off): the C loop
    # rounds exactly as NumPy's float32 ufuncs do, so the result is bitwise equal.
    np.testing.assert_array_equal(a, b + np.float32(3.0) * c)


@pytest.mark.parametrize("n", SIZES)
def test_sumsq(rng, n):
    (x,) = _arrays(rng, n, 1)
    x64 = x.astype(np.float64)
    # float32 partial sums over blocks of <= 1024 squares of N(0, 1) values: relative error
    # ~ sqrt(1024) * 2**-24 per block at worst, far below 1e-6 of the total.
    np.testing.assert_allclose(_probe.sumsq(x), float(x64 @ x64), rtol=1e-6, atol=0.0)


def test_sumsq_large_values_do_not_lose_precision(rng):
    x = np.full(200_000, 1000.0, dtype=np.float32)
    assert _probe.sumsq(x) == pytest.approx(200_000 * 1e6, rel=1e-9)


@pytest.mark.parametrize("n", SIZES)
def test_sgd_sweep(rng, n):
    p, g, b = _arrays(rng, n, 3)
    p0, b0 = p.copy(), b.copy()
    _probe.sgd_sweep(p, g, b, momentum=0.5, lr=0.25)
    mu, lr = np.float32(0.5), np.float32(0.25)
    b_ref = mu * b0 + g
    np.testing.assert_array_equal(b, b_ref)  # same float32 operations in the same order
    np.testing.assert_array_equal(p, p0 - lr * b_ref)


@pytest.mark.parametrize("n", SIZES)
def test_adam_sweep(rng, n):
    p, g, m, v = _arrays(rng, n, 4)
    p0, m0, v0 = p.copy(), m.copy(), v.copy()
    _probe.adam_sweep(p, g, m, v, beta1=0.8, beta2=0.9, lr=0.5)
    a, ac = np.float32(0.8), np.float32(1.0 - 0.8)
    b, bc = np.float32(0.9), np.float32(1.0 - 0.9)
    m_ref = a * m0 + ac * g
    v_ref = b * v0 + bc * (g * g)
    # Same float32 operations in the same order as the C loop (no contraction): bitwise.
    np.testing.assert_array_equal(m, m_ref)
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(p, p0 - np.float32(0.5) * (m_ref + v_ref))


def test_bytes_per_element():
    assert _probe.BYTES_PER_ELEMENT == {"copy": 8, "triad": 12, "sumsq": 4, "sgd": 20, "adam": 28,
                                        "adam_bf16": 20, "adam_int8": 16 + 16 / 256,
                                        "adam_bf16all": 14, "adam_copy": 28}


def _bf16(rng, n):
    """Random bf16 values as uint16 bits."""
    return rng.standard_normal(n, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _widen(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def _truncate(x):
    """float32 -> bf16 bits by truncation (the probe's trivial narrowing)."""
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def _adam_ref(p, g, m, v):
    """The probe's float32 Adam pattern with beta1=0.8, beta2=0.9, lr=0.5, op for op."""
    a, ac = np.float32(0.8), np.float32(1.0 - 0.8)
    b, bc = np.float32(0.9), np.float32(1.0 - 0.9)
    m2 = a * m + ac * g
    v2 = b * v + bc * (g * g)
    return p - np.float32(0.5) * (m2 + v2), m2, v2


# Each low-precision sweep against NumPy doing the same float32 operations in the same order
# (no contraction) and the same bit conversions: bitwise.
@pytest.mark.parametrize("n", SIZES)
def test_adam_bf16_sweep(rng, n):
    p, g = _arrays(rng, n, 2)
    m, v = _bf16(rng, n), _bf16(rng, n)
    want = _adam_ref(p, g, _widen(m), _widen(v))
    _probe.adam_bf16_sweep(p, g, m, v, beta1=0.8, beta2=0.9, lr=0.5)
    np.testing.assert_array_equal(p, want[0])
    np.testing.assert_array_equal(m, _truncate(want[1]))
    np.testing.assert_array_equal(v, _truncate(want[2]))


@pytest.mark.parametrize("n", SIZES)
def test_adam_int8_sweep(rng, n):
    p, g = _arrays(rng, n, 2)
    m = rng.integers(0, 256, n).astype(np.uint8)
    v = rng.integers(0, 256, n).astype(np.uint8)
    nb = -(-n // _probe.Q8_BLOCK)
    am, av = rng.random(nb, dtype=np.float32), rng.random(nb, dtype=np.float32)
    blk = np.arange(n) // _probe.Q8_BLOCK
    lr = np.float32(0.5)
    want_p = p - lr * (g + am[blk] * m.astype(np.float32) + av[blk] * v.astype(np.float32))
    want = (want_p, m + np.uint8(1), v + np.uint8(1), am * np.float32(0.5), av * np.float32(0.5))
    _probe.adam_int8_sweep(p, g, m, v, am, av, lr=0.5)
    for got, w in zip((p, m, v, am, av), want):
        np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize("n", SIZES)
def test_adam_bf16all_sweep(rng, n):
    p, g, m, v = (_bf16(rng, n) for _ in range(4))
    want = _adam_ref(_widen(p), _widen(g), _widen(m), _widen(v))
    _probe.adam_bf16all_sweep(p, g, m, v, beta1=0.8, beta2=0.9, lr=0.5)
    for got, w in zip((p, m, v), want):
        np.testing.assert_array_equal(got, _truncate(w))


@pytest.mark.parametrize("n", SIZES)
def test_adam_copy_sweep(rng, n):
    p, m, v = _arrays(rng, n, 3)
    g = _bf16(rng, n)
    copy = np.zeros(n, np.uint16)
    want = _adam_ref(p, _widen(g), m, v)
    _probe.adam_copy_sweep(p, g, m, v, copy, beta1=0.8, beta2=0.9, lr=0.5)
    for got, w in zip((p, m, v), want):
        np.testing.assert_array_equal(got, w)
    np.testing.assert_array_equal(copy, _truncate(want[0]))


def test_lowp_sweeps_threads_do_not_change_results():
    n = 16384 * 5 + 3
    out = []
    for t in (1, 2):
        optcore.set_num_threads(t)
        r = np.random.default_rng(7)
        p, g = _arrays(r, n, 2)
        m, v, h = _bf16(r, n), _bf16(r, n), _bf16(r, n)
        q1, q2 = r.integers(0, 256, n).astype(np.uint8), r.integers(0, 256, n).astype(np.uint8)
        nb = -(-n // _probe.Q8_BLOCK)
        am, av = r.random(nb, dtype=np.float32), r.random(nb, dtype=np.float32)
        _probe.adam_bf16_sweep(p, g, m, v)
        _probe.adam_int8_sweep(p, g, q1, q2, am, av)
        _probe.adam_copy_sweep(p, h, g, g.copy(), m)
        out.append((p, g, m, v, q1, q2, am, av))
    optcore.set_num_threads(None)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_lowp_sweeps_bad_input_writes_nothing(rng):
    n = 300
    p, g = _arrays(rng, n, 2)
    m, v, c = _bf16(rng, n), _bf16(rng, n), _bf16(rng, n)
    q = np.zeros(n, np.uint8)
    am = np.ones(2, np.float32)
    before = [x.copy() for x in (p, g, m, v, c, q, am)]
    cases = [
        (lambda: _probe.adam_bf16_sweep(p, g, m.astype(np.float32), v), TypeError, "m"),
        (lambda: _probe.adam_bf16_sweep(p, g, m, m), ValueError, "share"),
        (lambda: _probe.adam_int8_sweep(p, g, q, q.copy(), am, am[:1].copy()), ValueError,
         "v_absmax"),
        (lambda: _probe.adam_int8_sweep(p, g, m, q, am, am.copy()), TypeError, "m"),
        (lambda: _probe.adam_bf16all_sweep(m, p, v, c), TypeError, "g"),
        (lambda: _probe.adam_copy_sweep(p, m, v, g, c), TypeError, "m"),
        (lambda: _probe.adam_copy_sweep(p, m, g.copy(), g.copy(), c[:10]), ValueError, "copy"),
        (lambda: _probe.adam_bf16_sweep(p, g, m, v, lr=float("nan")), ValueError, "lr"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
    for x, x0 in zip((p, g, m, v, c, q, am), before):
        np.testing.assert_array_equal(x, x0)


def test_threads_do_not_change_results(rng):
    n = 16384 * 5 + 3
    x = rng.standard_normal(n, dtype=np.float32) * 100
    results = []
    for t in (1, 2):
        optcore.set_num_threads(t)
        p, g, m, v = (a.copy() for a in _arrays(np.random.default_rng(7), n, 4))
        _probe.adam_sweep(p, g, m, v)
        results.append((_probe.sumsq(x), p, m, v))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1:], results[1][1:]):
        np.testing.assert_array_equal(a, b)


def _bad_cases(rng):
    n = 100
    good = lambda: rng.standard_normal(n, dtype=np.float32)  # noqa: E731
    ro = good()
    ro.flags.writeable = False
    shared = good()
    return [
        ("float64", lambda a, b, c: _probe.triad(a.astype(np.float64), b, c, 1.0), TypeError, "a"),
        ("list", lambda a, b, c: _probe.triad(a, list(b), c, 1.0), TypeError, "b"),
        ("strided", lambda a, b, c: _probe.triad(a, b, np.repeat(c, 2)[::2], 1.0), ValueError, "c"),
        ("size", lambda a, b, c: _probe.triad(a, b, c[:50], 1.0), ValueError, "c"),
        ("readonly", lambda a, b, c: _probe.triad(ro, b, c, 1.0), ValueError, "a"),
        ("alias", lambda a, b, c: _probe.triad(a, a, c, 1.0), ValueError, "share memory"),
        ("nan", lambda a, b, c: _probe.triad(a, b, c, float("nan")), ValueError, "scalar"),
        ("scalar type", lambda a, b, c: _probe.triad(a, b, c, "2"), TypeError, "scalar"),
        ("copy alias", lambda a, b, c: _probe.copy(shared[:60], shared[40:]), ValueError, "share"),
        ("sumsq dtype", lambda a, b, c: _probe.sumsq(a.astype(np.int32)), TypeError, "x"),
        ("sgd readonly", lambda a, b, c: _probe.sgd_sweep(a, b, ro), ValueError, "buf"),
        ("sgd lr", lambda a, b, c: _probe.sgd_sweep(a, b, c, lr=float("inf")), ValueError, "lr"),
        ("adam alias", lambda a, b, c: _probe.adam_sweep(a, b, c, c), ValueError, "share"),
        ("adam beta", lambda a, b, c: _probe.adam_sweep(a, b, c, good(), beta1=None), TypeError,
         "beta1"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_rejected_and_nothing_written(rng, case):
    name, call, exc, msg = _bad_cases(rng)[case]
    a, b, c = _arrays(rng, 100, 3)
    before = [x.copy() for x in (a, b, c)]
    with pytest.raises(exc, match=msg):
        call(a, b, c)
    for x, x0 in zip((a, b, c), before):
        np.testing.assert_array_equal(x, x0)
