"""Validation shared by every public entry point.

Every check raises before anything is written, with a TypeError (wrong kind of object or
dtype) or ValueError (wrong value, shape, layout, range) that names the argument.
"""
import math
from numbers import Real

import numpy as np

from optcore._kernels import _norms


def float32_buffer(name, a, *, writeable=True):
    """Check that ``a`` is an aligned C-contiguous float32 ndarray in native byte order
    (writeable when asked); return it."""
    return float_buffer(name, a, writeable=writeable, dtypes=("float32",))


#: The 16-bit float dtypes some kernels read and write (``ml_dtypes.bfloat16`` and
#: ``numpy.float16``), by NumPy dtype name; the kernels see them as their uint16 bits.
HALF_DTYPES = ("bfloat16", "float16")


def float_buffer(name, a, *, writeable=True, dtypes=("float32",) + HALF_DTYPES):
    """Check that ``a`` is an aligned C-contiguous ndarray of one of ``dtypes`` (NumPy dtype
    names) in native byte order (writeable when asked); return it."""
    kinds = " or ".join(dtypes)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {kinds}, got {type(a).__name__}")
    if a.dtype.name not in dtypes:
        raise TypeError(f"{name} must have dtype {kinds}, got {a.dtype}")
    if not a.dtype.isnative:
        raise TypeError(f"{name} must have dtype {kinds} in native byte order, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (got strides {a.strides} for shape {a.shape}); "
            "optcore never copies silently: pass np.ascontiguousarray(...) and copy back"
        )
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place and must be writeable")
    if not a.flags.aligned:
        raise ValueError(
            f"{name} is not aligned to its {a.dtype.itemsize}-byte elements; optcore never "
            "copies silently: pass a.copy() and copy back"
        )
    return a


def array_list(name, x, *, writeable=True, dtypes=("float32",)):
    """Return ``x`` (an ndarray or a sequence of them) as a list of checked arrays of
    ``dtypes`` (float32 by default)."""
    if isinstance(x, np.ndarray):
        return [float_buffer(name, x, writeable=writeable, dtypes=dtypes)]
    if not isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be a {' or '.join(dtypes)} ndarray or a list of them, "
            f"got {type(x).__name__}"
        )
    return [float_buffer(f"{name}[{i}]", a, writeable=writeable, dtypes=dtypes)
            for i, a in enumerate(x)]


def array_table(name, x, *, writeable=True, half=False):
    """:func:`array_list` (float32, or with ``half`` also bfloat16 and float16) for building a
    kernel table, with the addresses the table needs.

    One loop in C checks every array (tens of ns each: the per-array Python of
    :func:`float_buffer` dominated a call over a thousand small arrays); only a rejected array
    goes through :func:`array_list`, which words the error. Returns ``(arrays, addresses,
    lengths, nbytes, formats)``: the list of arrays, their data addresses (uint64), element
    counts and sizes in bytes (int64), and their kernel formats (uint8 codes, see
    ``optcore._lowp.FORMATS``) or None when all are float32.
    """
    arrays = [x] if isinstance(x, np.ndarray) else x
    if isinstance(arrays, (list, tuple)):
        addr, lengths, nbytes, formats, bad = _norms.buffers(arrays, writeable, half)
        if bad < 0:
            return list(arrays), addr, lengths, nbytes, formats
    dtypes = ("float32",) + HALF_DTYPES if half else ("float32",)
    array_list(name, x, writeable=writeable, dtypes=dtypes)
    raise TypeError(f"{name}[{bad}] does not expose a C-contiguous {' or '.join(dtypes)} buffer")


def same_sizes(reference_name, reference, name, arrays):
    """Check that ``arrays`` pairs one-to-one with ``reference`` with equal sizes."""
    if len(arrays) != len(reference):
        raise ValueError(
            f"{name} has {len(arrays)} tensors but {reference_name} has {len(reference)}"
        )
    for i, (r, a) in enumerate(zip(reference, arrays)):
        if a.size != r.size:
            raise ValueError(
                f"{name}[{i}] has {a.size} elements (shape {a.shape}) but "
                f"{reference_name}[{i}] has {r.size} (shape {r.shape})"
            )


def _extent(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def first_overlap(start, end):
    """Indices ``(i, j)`` of two non-empty extents ``[start, end)`` that overlap, or None.

    One stable sort by start: if any two extents overlap, two neighbours in that order do,
    so the check is O(n log n) for n extents. Empty extents never overlap.
    """
    start = np.asarray(start, dtype=np.uint64)
    end = np.asarray(end, dtype=np.uint64)
    live = np.flatnonzero(end > start)
    order = live[np.argsort(start[live], kind="stable")]
    clash = np.flatnonzero(start[order[1:]] < end[order[:-1]])
    if clash.size == 0:
        return None
    return int(order[clash[0]]), int(order[clash[0] + 1])


def no_overlap_at(names, addrs, nbytes, *, bare_single=False):
    """Vectorized :func:`no_overlap` over the address and size arrays of several arguments
    (``names``: the argument of each array of ``addrs``/``nbytes``). An array is called
    ``name[i]``, or ``name`` alone when ``bare_single`` and its argument holds one array (as
    :func:`no_overlap` calls it)."""
    start = np.concatenate(addrs).astype(np.uint64)
    pair = first_overlap(start, start + np.concatenate(nbytes).astype(np.uint64))
    if pair is not None:
        label = np.concatenate([np.full(len(a), k) for k, a in enumerate(addrs)])
        index = np.concatenate([np.arange(len(a)) for a in addrs])
        a, b = (names[label[i]] if bare_single and len(addrs[label[i]]) == 1
                else f"{names[label[i]]}[{index[i]}]" for i in pair)
        raise ValueError(f"{a} and {b} share memory; each buffer must be distinct")


def no_overlap(named_lists):
    """Check that no two of the given arrays share memory.

    ``named_lists`` maps an argument name to a list of C-contiguous arrays; for those, memory
    bounds overlap exactly when memory is shared. O(n log n) in the number of arrays.
    """
    spans = []
    for name, arrays in named_lists.items():
        for i, a in enumerate(arrays):
            if a.size:
                lo, hi = _extent(a)
                label = name if len(arrays) == 1 else f"{name}[{i}]"
                spans.append((lo, hi, label))
    spans.sort()
    for (lo1, hi1, n1), (lo2, hi2, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise ValueError(f"{n1} and {n2} share memory; each buffer must be distinct")


def real(name, value):
    """Check that ``value`` is a real number (not bool) and return it as a float."""
    if type(value) is float:  # the common case, without the abstract-class checks below
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def in_range(name, value, lo=-math.inf, hi=math.inf, *, lo_open=False, hi_open=False):
    """Check ``lo <= value <= hi`` (with open ends when asked); NaN is always rejected."""
    v = real(name, value)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return v


def nonnegative(name, value):
    return in_range(name, value, 0.0, math.inf)


def finite(name, value):
    return in_range(name, value, -math.inf, math.inf, lo_open=True, hi_open=True)


def positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)
