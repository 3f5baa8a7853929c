"""Optimizer state stored in low precision: bfloat16, or 8-bit block-wise quantized.

One :class:`StateBuffer` holds one state buffer (e.g. Adam's ``exp_avg``) of every tensor of a
parameter group, in the format the update kernel reads and writes in place (see
``_kernels/oc_lowp.h``):

- ``"float32"``: float32;
- ``"bfloat16"``: the top 16 bits of the float32 value (stored as uint16), written back with
  stochastic rounding;
- ``"int8"``: one byte per element, a code of the dynamic 8-bit data type of Dettmers et al.
  (2022) times a float32 absmax per block of 256 elements; tensors with fewer than
  ``min_8bit_size`` elements keep float32 state, as in bitsandbytes.

Conversions to and from float32 (``state_of``, ``state_dict``, loading a state saved in another
format) go through the kernels' own conversions.
"""
import numpy as np

from optcore import _checks as ck
from optcore._kernels import _optim
from optcore.params import ALIGN_BYTES

STATE_DTYPES = ("float32", "bfloat16", "int8")

#: Tensors with fewer elements than this keep float32 state under ``state_dtype="int8"``
#: (bitsandbytes' ``min_8bit_size`` default).
MIN_8BIT_SIZE = 4096

BLOCK = _optim.Q8_BLOCK

_KIND_BYTES = {_optim.F32: 4, _optim.BF16: 2, _optim.Q8S: 1, _optim.Q8U: 1}
_KIND_DTYPE = {_optim.F32: np.float32, _optim.BF16: np.uint16, _optim.Q8S: np.uint8,
               _optim.Q8U: np.uint8}


#: The kernels' element format of each array dtype they read and write in place.
FORMATS = {"float32": _optim.F32, "bfloat16": _optim.BF16, "float16": _optim.F16}


def kernel_view(a):
    """``a`` as the kernels address it: a float32 array itself, a 16-bit one as its uint16
    bits (``ml_dtypes.bfloat16`` arrays expose no buffer of their own)."""
    return a if a.dtype == np.float32 else a.view(np.uint16)


def formats(arrays):
    """The kernel formats of ``arrays`` (uint8, one per array), or None when all are float32."""
    kinds = np.fromiter((FORMATS[a.dtype.name] for a in arrays), dtype=np.uint8, count=len(arrays))
    return kinds if kinds.any() else None


ROUNDINGS = ("stochastic", "nearest")


def check_rounding(rounding, compensation, any_half):
    """Validate ``rounding`` and ``compensation`` of an optimizer whose parameters include a
    16-bit one when ``any_half``; return ``(rounding, compensation)`` with the default
    rounding filled in (stochastic, or nearest with compensation)."""
    compensation = ck.boolean("compensation", compensation)
    if rounding is not None and not isinstance(rounding, str):
        raise TypeError(f"rounding must be a str, got {type(rounding).__name__}")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if compensation and not any_half:
        raise ValueError("compensation=True needs bfloat16 or float16 parameters; every "
                         "parameter is float32")
    if compensation and rounding == "stochastic":
        raise ValueError("compensation=True rounds the parameter to nearest and keeps the "
                         "remainder; it cannot be combined with rounding='stochastic'")
    if rounding is None:
        rounding = "nearest" if compensation else "stochastic"
    return rounding, compensation


def check_state_dtype(state_dtype, min_8bit_size):
    """Validate the ``state_dtype`` and ``min_8bit_size`` arguments of an optimizer."""
    if not isinstance(state_dtype, str):
        raise TypeError(f"state_dtype must be a str, got {type(state_dtype).__name__}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return state_dtype, ck.positive_int("min_8bit_size", min_8bit_size)


def blocks(n):
    """Number of 8-bit blocks of a tensor of ``n`` elements."""
    return -(-n // BLOCK)


def _aligned(n, dtype):
    """A zeroed 64-byte-aligned array of ``n`` elements."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + ALIGN_BYTES, dtype=np.uint8)
    skip = -raw.__array_interface__["data"][0] % ALIGN_BYTES
    return raw[skip: skip + n * itemsize].view(dtype)


def kinds_for(state_dtype, sizes, signed, min_8bit_size):
    """The per-tensor kernel format of a state buffer (uint8 codes of ``_optim``)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if state_dtype == "float32":
        return np.full(sizes.size, _optim.F32, np.uint8)
    if state_dtype == "bfloat16":
        return np.full(sizes.size, _optim.BF16, np.uint8)
    q8 = _optim.Q8S if signed else _optim.Q8U
    return np.where(sizes >= min_8bit_size, q8, _optim.F32).astype(np.uint8)


class StateBuffer:
    """One state buffer of a group: per tensor, its data in its format (+ absmax blocks).

    ``data[t]`` is a flat view of tensor ``t`` in one flat array per format (``flat[kind]``),
    ``absmax[t]`` its blocks' scales (8-bit) or None.
    """

    def __init__(self, sizes, kinds):
        self.sizes = [int(n) for n in sizes]
        self.kinds = np.asarray(kinds, dtype=np.uint8)
        self.flat, self.data = {}, []
        offsets = {}
        for n, k in zip(self.sizes, self.kinds):
            offsets[k] = offsets.get(k, 0) + n
        for k, total in offsets.items():
            self.flat[int(k)] = _aligned(total, _KIND_DTYPE[k])
        nblocks = sum(blocks(n) for n, k in zip(self.sizes, self.kinds) if k in (_optim.Q8S, _optim.Q8U))
        self.absmax_flat = _aligned(nblocks, np.float32)
        self.absmax = []
        pos, bpos = {k: 0 for k in offsets}, 0
        for n, k in zip(self.sizes, self.kinds):
            self.data.append(self.flat[int(k)][pos[k]: pos[k] + n])
            pos[k] += n
            if k in (_optim.Q8S, _optim.Q8U):
                self.absmax.append(self.absmax_flat[bpos: bpos + blocks(n)])
                bpos += blocks(n)
            else:
                self.absmax.append(None)

    @property
    def nbytes(self):
        """Bytes held (data and scales)."""
        return sum(a.nbytes for a in self.flat.values()) + self.absmax_flat.nbytes

    def get(self, t):
        """Tensor ``t`` as a new float32 array (exact for float32 and bfloat16)."""
        k, d = self.kinds[t], self.data[t]
        if k == _optim.F32:
            return d.copy()
        out = np.empty(d.size, np.float32)
        if k == _optim.BF16:
            _optim.half_decode(d, out, _optim.BF16)
        else:
            _optim.q8_dequantize(d, self.absmax[t], out, k == _optim.Q8S)
        return out

    def set(self, t, x):
        """Store the float32 values ``x`` into tensor ``t`` (bfloat16: rounded to nearest)."""
        k, d = self.kinds[t], self.data[t]
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if k == _optim.F32:
            d[...] = x
        elif k == _optim.BF16:
            _optim.half_encode(x, d, _optim.BF16)
        else:
            _optim.q8_quantize(x, d, self.absmax[t], k == _optim.Q8S)

    def fill(self, value):
        """Set every element to ``value``."""
        for t, n in enumerate(self.sizes):
            self.set(t, np.full(n, value, np.float32))

    def export(self, prefix):
        """The native arrays under ``prefix``: one per format present, the scales, the formats."""
        out = {prefix + ".formats": self.kinds.copy()}
        for k, a in self.flat.items():
            out[f"{prefix}.{_KIND_DTYPE[k].__name__}.{k}"] = a.copy()
        if self.absmax_flat.size:
            out[prefix + ".absmax"] = self.absmax_flat.copy()
        return out

    @classmethod
    def read(cls, sizes, prefix, state):
        """The buffer :meth:`export` saved under ``prefix`` in ``state`` (a mapping), checked:
        formats, dtypes and shapes must match ``sizes``; raises ValueError otherwise."""
        kinds = np.asarray(state.get(prefix + ".formats", ()))
        if kinds.shape != (len(sizes),) or not np.isin(kinds, list(_KIND_BYTES)).all():
            raise ValueError(f"{prefix}.formats must hold {len(sizes)} state formats, got {kinds!r}")
        saved = cls(sizes, kinds.astype(np.uint8))
        for k, a in saved.flat.items():
            key = f"{prefix}.{_KIND_DTYPE[k].__name__}.{k}"
            v = state.get(key)
            v = None if v is None else np.asarray(v)
            if v is None or v.dtype != a.dtype or v.shape != a.shape:
                raise ValueError(f"{key} must be a {a.dtype} array of shape {a.shape}")
            a[...] = v
        if saved.absmax_flat.size:
            v = state.get(prefix + ".absmax")
            v = None if v is None else np.asarray(v)
            if v is None or v.dtype != np.float32 or v.shape != saved.absmax_flat.shape:
                raise ValueError(f"{prefix}.absmax must be float32 of shape {saved.absmax_flat.shape}")
            saved.absmax_flat[...] = v
        return saved

    def assign(self, other):
        """Take the values of ``other`` (same sizes): bitwise when the formats match, else
        converted through float32 (quantized or dequantized)."""
        if np.array_equal(other.kinds, self.kinds):
            for k, a in other.flat.items():
                self.flat[k][...] = a
            self.absmax_flat[...] = other.absmax_flat
        else:
            for t in range(len(self.sizes)):
                self.set(t, other.get(t))


class Compensation:
    """The Kahan compensation buffers of the 16-bit parameters of a group, zero at the start:
    ``arrays[t]`` has the dtype and shape of parameter ``t`` (None for a float32 one), all
    views of one flat uint16 array; the update kernel holds parameter ``t`` as
    ``params[t] + arrays[t]`` (slot 7)."""

    def __init__(self, params):
        self.kinds = np.fromiter((FORMATS[a.dtype.name] for a in params), np.uint8, len(params))
        self.flat = _aligned(sum(a.size for a in params if a.dtype != np.float32), np.uint16)
        self.arrays, pos = [], 0
        for a in params:
            if a.dtype == np.float32:
                self.arrays.append(None)
                continue
            self.arrays.append(self.flat[pos: pos + a.size].view(a.dtype).reshape(a.shape))
            pos += a.size

    @property
    def nbytes(self):
        return self.flat.nbytes

    def addresses(self):
        """One address per tensor (0: no compensation), for ``TensorList.set_slot_addresses``."""
        return np.array([0 if a is None else a.__array_interface__["data"][0]
                         for a in self.arrays], dtype=np.uint64)

    def export(self, prefix):
        """The buffers as plain arrays: the uint16 bits and the parameters' formats."""
        return {prefix: self.flat.copy(), prefix + ".formats": self.kinds.copy()}

    def loader(self, prefix, state):
        """Check what :meth:`export` saved under ``prefix`` in ``state``; return a function
        writing it into the buffers. Raises ValueError on a missing or mismatched entry."""
        kinds = state.get(prefix + ".formats")
        if kinds is None or not np.array_equal(np.asarray(kinds), self.kinds):
            raise ValueError(f"{prefix}.formats must be {self.kinds.tolist()} (the formats of "
                             f"the group's parameters), got {kinds!r}")
        v = state.get(prefix)
        v = None if v is None else np.asarray(v)
        if v is None or v.dtype != np.uint16 or v.shape != self.flat.shape:
            raise ValueError(f"{prefix} must be a uint16 array of shape {self.flat.shape}")
        return lambda: self.flat.__setitem__(Ellipsis, v)
