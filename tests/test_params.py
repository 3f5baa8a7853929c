"""Parameters: one flat 64-byte-aligned float32 arena of named views, a gradient arena of the
same layout, copies in from arrays, state_dict round trip, errors."""
import numpy as np
import pytest

import optcore
from optcore.params import ALIGN_BYTES, Layout, aligned_zeros

SHAPES = {"zeta": (3, 5), "alpha": (7,), "empty": (0, 4), "scalar": (), "big": (40000,),
          "m": (2, 3, 4)}


def addr(a):
    return a.__array_interface__["data"][0]


def test_names_kept_in_order_and_shapes():
    p = optcore.Parameters(SHAPES)
    assert list(p) == list(SHAPES)
    assert len(p) == len(SHAPES)
    for n, s in SHAPES.items():
        assert p[n].shape == s and p[n].dtype == np.float32
        assert p.grads[n].shape == s and p.grads[n].dtype == np.float32
    assert p.numel == sum(int(np.prod(s)) for s in SHAPES.values())
    assert optcore.Parameters({"a": 5})["a"].shape == (5,)


def test_every_view_is_64_byte_aligned_and_contiguous():
    p = optcore.Parameters(SHAPES)
    assert addr(p.flat) % ALIGN_BYTES == 0
    assert addr(p.grads.flat) % ALIGN_BYTES == 0
    for n in p:
        if p[n].size:
            assert addr(p[n]) % ALIGN_BYTES == 0, n
            assert addr(p.grads[n]) % ALIGN_BYTES == 0, n
        assert p[n].flags.c_contiguous and p[n].flags.writeable


def test_views_share_the_arena_without_overlap():
    p = optcore.Parameters(SHAPES)
    lo, hi = addr(p.flat), addr(p.flat) + p.flat.nbytes
    spans = []
    for n in p:
        assert np.shares_memory(p[n], p.flat) or p[n].size == 0
        assert not np.shares_memory(p[n], p.grads.flat)
        a = addr(p[n])
        assert lo <= a and a + p[n].nbytes <= hi
        if p[n].size:
            spans.append((a, a + p[n].nbytes))
    spans.sort()
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    # writing a view writes the arena at the view's offset, and only there
    p["alpha"][...] = 3.0
    off = (addr(p["alpha"]) - lo) // 4
    assert (p.flat[off:off + 7] == 3.0).all()
    assert p.flat.sum() == 21.0
    assert not np.shares_memory(p.flat, p.grads.flat)


def test_grads_have_the_same_layout():
    p = optcore.Parameters(SHAPES)
    for n in p:
        assert addr(p[n]) - addr(p.flat) == addr(p.grads[n]) - addr(p.grads.flat)
    assert p.grads.flat.shape == p.flat.shape
    p.grads["m"][...] = 1.0
    p.zero_grad()
    assert (p.grads.flat == 0).all()


def test_padding_between_tensors():
    lay = Layout({"a": (1,), "b": (17,), "c": (16,)})
    assert lay.offsets == {"a": 0, "b": 16, "c": 48}
    assert lay.total == 64
    p = optcore.Parameters({"a": (1,), "b": (17,)})
    p["a"][...] = 1
    p["b"][...] = 2
    assert p.flat.size == 48 and p.flat.sum() == 1 + 34  # padding stays zero


def test_aligned_zeros():
    for n in (0, 1, 15, 16, 17, 1000):
        a = aligned_zeros(n)
        assert a.shape == (n,) and a.dtype == np.float32 and (a == 0).all()
        if n:  # an empty array has no data to align (NumPy may give it any address)
            assert addr(a) % ALIGN_BYTES == 0


def test_from_arrays_copies():
    rng = np.random.default_rng(0)
    src = {"w": rng.standard_normal((4, 3)), "b": np.arange(3, dtype=np.int64),
           "h": rng.standard_normal(5).astype(np.float32)}
    p = optcore.Parameters.from_arrays(src)
    assert list(p) == ["w", "b", "h"]
    np.testing.assert_array_equal(p["w"], src["w"].astype(np.float32))
    np.testing.assert_array_equal(p["b"], [0, 1, 2])
    for n in src:
        assert not np.shares_memory(p[n], src[n])
    src["h"][0] = 99.0
    assert p["h"][0] != 99.0
    assert (p.grads.flat == 0).all()
    q = optcore.Parameters.from_arrays({"x": [1.0, 2.0]})
    np.testing.assert_array_equal(q["x"], [1.0, 2.0])


def test_state_dict_round_trip_through_savez(tmp_path):
    rng = np.random.default_rng(1)
    p = optcore.Parameters(SHAPES)
    p.flat[...] = rng.standard_normal(p.flat.size)
    p.grads.flat[...] = 5.0
    sd = p.state_dict()
    assert list(sd["layout.names"]) == list(SHAPES)
    p["alpha"][0] = 123.0  # a copy, not a view
    assert sd["param.alpha"][0] != 123.0
    p["alpha"][0] = sd["param.alpha"][0]
    np.savez(tmp_path / "p.npz", **sd)
    q = optcore.Parameters(SHAPES)
    with np.load(tmp_path / "p.npz", allow_pickle=False) as f:
        q.load_state_dict(f)
    for n in p:
        np.testing.assert_array_equal(q[n], p[n])
    assert (q.grads.flat == 0).all()


def test_load_state_dict_errors_change_nothing():
    p = optcore.Parameters({"a": (2, 3), "b": (4,)})
    p.flat[...] = np.arange(p.flat.size)
    before = p.flat.tobytes()
    good = p.state_dict()
    cases = [
        (dict(good, **{"layout.names": np.array(["b", "a"])}), ValueError, "expected"),
        (optcore.Parameters({"a": (2, 3)}).state_dict(), ValueError, "expected"),
        (dict(good, **{"param.b": np.zeros(5, np.float32)}), ValueError, "param.b"),
        (dict(good, **{"param.b": np.zeros(4, np.int32)}), TypeError, "param.b"),
        ({k: v for k, v in good.items() if k != "param.b"}, ValueError, "param.b"),
        ({}, ValueError, "expected"),
    ]
    for state, exc, pattern in cases:
        # a mismatch in the LAST tensor: the first must not have been written either
        state = {k: (v + 1 if k == "param.a" else v) for k, v in state.items()}
        with pytest.raises(exc, match=pattern):
            p.load_state_dict(state)
        assert p.flat.tobytes() == before


@pytest.mark.parametrize("shapes,exc,pattern", [
    ([("a", (3,))], TypeError, "mapping"),
    ({1: (3,)}, TypeError, "names must be str"),
    ({"a": (3, -1)}, ValueError, "'a'"),
    ({"a": (2.5,)}, TypeError, "'a'"),
    ({"a": "ab"}, TypeError, "'a'"),
    ({"a": None}, TypeError, "'a'"),
])
def test_bad_shapes(shapes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        optcore.Parameters(shapes)


def test_bad_dtype_and_from_arrays_errors():
    with pytest.raises(TypeError, match="float32"):
        optcore.Parameters({"a": (3,)}, dtype=np.float64)
    with pytest.raises(TypeError, match="mapping"):
        optcore.Parameters.from_arrays([np.zeros(3)])
    with pytest.raises(TypeError, match="'s'"):
        optcore.Parameters.from_arrays({"s": np.array(["x"])})
    with pytest.raises(TypeError, match="'c'"):
        optcore.Parameters.from_arrays({"c": np.zeros(3, complex)})


def test_unknown_name():
    p = optcore.Parameters({"a": (3,)})
    with pytest.raises(KeyError, match="nope"):
        p["nope"]
    with pytest.raises(KeyError, match="nope"):
        p.grads["nope"]
    assert "a" in p and "nope" not in p
    assert "a: (3,)" in repr(p)
