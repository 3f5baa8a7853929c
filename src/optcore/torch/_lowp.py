"""Low-precision optimizer state and parameters as torch tensors, in the kernels' formats.

The formats are those of :mod:`optcore._lowp` (``_kernels/oc_lowp.h``); here each state buffer
of one parameter is a torch tensor in ``opt.state[p]`` under torch's key:

- float32 state: a ``torch.float32`` tensor;
- bfloat16 state: a ``torch.bfloat16`` tensor (its bits are the kernels' BF16 format);
- 8-bit state: a ``torch.uint8`` tensor of codes plus a float32 tensor ``<key>_absmax`` of
  ``ceil(n / 256)`` block scales. Blocks run over the parameter's *memory* order (the codes
  keep the parameter's strides), so a channels_last parameter's blocks are runs of channels.

Every conversion (quantizing, rounding, dequantizing) goes through the kernels' own
conversions (:func:`optcore._kernels._optim.q8_quantize` and friends) on flat views of the
tensors' memory, so a converted state is bitwise what the update kernel would have stored.
"""
import numpy as np
import torch

from optcore import _lowp, _rules
from optcore._kernels import _optim

F32, BF16, F16, Q8S, Q8U = _optim.F32, _optim.BF16, _optim.F16, _optim.Q8S, _optim.Q8U
Q8 = (Q8S, Q8U)

#: kernel format of a parameter (and its gradient) by torch dtype
PARAM_KINDS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
HALF_DTYPES = (torch.bfloat16, torch.float16)
#: dtypes a stored state tensor may have
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
_STORED = {F32: torch.float32, BF16: torch.bfloat16, Q8S: torch.uint8, Q8U: torch.uint8}

ABSMAX = "_absmax"


def absmax_key(s):
    """The state key of the block scales of 8-bit state ``s``."""
    return s + ABSMAX


def signed(s):
    """Whether state buffer ``s`` can be negative (8-bit: the signed code)."""
    return s not in _rules.NONNEGATIVE_STATE


def state_kinds(state_dtype, params, s, min_8bit_size):
    """The kernel format of state ``s`` of each of ``params`` (uint8 array). ``state_dtype``
    None follows the parameter: bfloat16 state for a bfloat16 parameter (torch's own state
    dtype there), float32 otherwise (a float16 parameter's moments would underflow in float16)."""
    sizes = [p.numel() for p in params]
    if state_dtype is not None:
        return _lowp.kinds_for(state_dtype, sizes, signed(s), min_8bit_size)
    return np.array([BF16 if p.dtype == torch.bfloat16 else F32 for p in params], np.uint8)


def stored_kind(s, t):
    """The kernel format of a stored state tensor (checked to be of :data:`STATE_DTYPES`)."""
    if t.dtype == torch.uint8:
        return Q8S if signed(s) else Q8U
    return F32 if t.dtype == torch.float32 else BF16


def flat(t):
    """A 1-d view of dense tensor ``t`` in memory order."""
    return t.as_strided((t.numel(),), (1,))


def _np(t):
    """A NumPy view of the memory of dense tensor ``t`` (16-bit floats as uint16 bits)."""
    f = flat(t)
    if t.dtype in HALF_DTYPES:
        return f.view(torch.int16).numpy().view(np.uint16)
    return f.numpy()


def absmax_arrays(states, s, kinds):
    """The NumPy views of the block scales of state ``s`` of each state dict (None where the
    format is not 8-bit), for ``TensorList.set_slot_format``."""
    return [_np(st[absmax_key(s)]) if k in Q8 else None for st, k in zip(states, kinds)]


def check_absmax(name, st, s, p):
    """The block scales of 8-bit state ``s`` in state dict ``st``: a float32 CPU tensor of
    ``ceil(numel / 256)`` contiguous elements; raises ValueError naming ``name`` otherwise."""
    a = st.get(absmax_key(s))
    nb = _lowp.blocks(p.numel())
    if (not isinstance(a, torch.Tensor) or a.dtype != torch.float32 or a.device.type != "cpu"
            or a.layout != torch.strided or a.numel() != nb or not a.is_contiguous()):
        raise ValueError(f"{name} is 8-bit (uint8) and needs {absmax_key(s)!r}: a contiguous "
                         f"float32 CPU tensor of {nb} block scales")
    return a


def filled(p, kind, value, s):
    """New state entries for parameter ``p``: ``{s: tensor}`` (plus the scales for 8-bit)
    holding ``value`` everywhere in format ``kind``, with ``p``'s strides."""
    t = torch.empty_like(p, dtype=_STORED[kind], memory_format=torch.preserve_format)
    if kind == F32:
        return {s: t.fill_(value)}
    if kind == BF16:
        bits = np.empty(1, np.uint16)
        _optim.half_encode(np.full(1, value, np.float32), bits, BF16)
        return {s: t.view(torch.int16).fill_(int(bits.view(np.int16)[0])).view(torch.bfloat16)}
    # every block of a constant tensor quantizes alike: quantize one block, repeat it
    code, scale = np.empty(_lowp.BLOCK, np.uint8), np.empty(1, np.float32)
    _optim.q8_quantize(np.full(_lowp.BLOCK, value, np.float32), code, scale, kind == Q8S)
    return {s: t.fill_(int(code[0])),
            absmax_key(s): torch.full((_lowp.blocks(p.numel()),), float(scale[0]))}


def to_float32(t, absmax, kind):
    """Stored state ``t`` (format ``kind``, with ``absmax`` when 8-bit) as a float32 tensor
    of ``t``'s strides: exact for float32 and bfloat16, the code's values for 8-bit."""
    if kind == F32:
        return t
    out = torch.empty_like(t, dtype=torch.float32, memory_format=torch.preserve_format)
    if kind == BF16:
        _optim.half_decode(_np(t), _np(out), BF16)
    else:
        _optim.q8_dequantize(_np(t), _np(absmax), _np(out), kind == Q8S)
    return out


def encode(x, p, kind, s):
    """Float32 tensor ``x`` (``p``'s shape, any dense strides) stored in format ``kind`` with
    ``p``'s strides: new entries ``{s: tensor}`` (plus the scales for 8-bit). bfloat16 is
    rounded to nearest even, 8-bit quantized per block of ``p``'s memory order."""
    x32 = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(x)
    if kind == F32:
        return {s: x32}
    t = torch.empty_like(p, dtype=_STORED[kind], memory_format=torch.preserve_format)
    if kind == BF16:
        _optim.half_encode(_np(x32), _np(t), BF16)
        return {s: t}
    absmax = torch.empty(_lowp.blocks(p.numel()), dtype=torch.float32)
    _optim.q8_quantize(_np(x32), _np(t), _np(absmax), kind == Q8S)
    return {s: t, absmax_key(s): absmax}


def convert(st, s, p, kind):
    """Rewrite state ``s`` of state dict ``st`` into format ``kind`` with ``p``'s strides
    (dequantized, rounded or quantized through float32); drops stale scales."""
    t = st[s]
    old = stored_kind(s, t)
    x = to_float32(t, st.get(absmax_key(s)) if old in Q8 else None, old)
    st.pop(absmax_key(s), None)
    st.update(encode(x, p, kind, s))
