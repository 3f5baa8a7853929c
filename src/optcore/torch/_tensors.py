"""From torch tensors to what the kernels take: checks, lengths and raw addresses.

The kernels walk a :class:`~optcore._kernels._runtime.TensorList` of addresses, so a torch
tensor reaches them without a copy and without the buffer protocol. What makes that valid is
checked here, before anything is written: float32 (or a dtype the caller allows), on the CPU,
strided (not sparse), dense and non-overlapping -- contiguous, channels_last or any other
permutation of the dimensions. Element-wise kernels do not care about the order of elements,
as long as every buffer of one tensor (parameter, gradient, state) shares the same strides.
"""
import numpy as np
import torch

from optcore import _checks as ck


def describe(t):
    """A short description of a tensor for error messages."""
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def is_dense(t):
    """Whether the elements of strided tensor ``t`` fill exactly ``t.numel()`` consecutive
    slots of its storage (contiguous, channels_last or any permutation of dimensions)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def check_tensor(name, t, *, dtypes=(torch.float32,)):
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a dense, non-overlapping
    strided CPU tensor of one of ``dtypes``; return ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; optcore kernels need dense (strided) tensors")
    if t.device.type != "cpu":
        raise TypeError(f"{name} is on {t.device}; optcore kernels run on CPU tensors")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {describe(t)}")
    if not is_dense(t):
        raise ValueError(
            f"{name} is not dense (shape {tuple(t.shape)}, strides {t.stride()}); optcore works "
            "in place and never copies silently: use a contiguous or channels_last tensor"
        )
    return t


def same_layout(name, t, ref_name, ref):
    """Raise ValueError unless ``t`` has the shape of ``ref`` and the same element order
    (equal strides on every dimension of size > 1), so one index walks both alike."""
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
    for st, rst, sz in zip(t.stride(), ref.stride(), t.shape):
        if sz != 1 and st != rst:
            raise ValueError(
                f"{name} has strides {t.stride()} but {ref_name} has {ref.stride()}; the update "
                "runs in place over both, so they must share one memory format"
            )


def lengths(tensors):
    """Element counts of ``tensors`` as an int64 array."""
    return np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))


def addresses(tensors):
    """Addresses of the first element of each tensor as a uint64 array (for
    ``TensorList.from_addresses`` / ``set_slot_addresses``)."""
    return np.fromiter((t.data_ptr() for t in tensors), dtype=np.uint64, count=len(tensors))


def no_overlap(names, tensors):
    """Raise ValueError naming two tensors of ``tensors`` whose memory overlaps (empty tensors
    never overlap). ``names[i]`` names ``tensors[i]``. One sort: O(n log n) for n tensors."""
    if len(tensors) < 2:
        return
    start = addresses(tensors)
    nbytes = lengths(tensors) * np.fromiter(
        (t.element_size() for t in tensors), dtype=np.int64, count=len(tensors))
    pair = ck.first_overlap(start, start + nbytes.astype(np.uint64))
    if pair is not None:
        a, b = sorted(pair)
        raise ValueError(f"{names[a]} and {names[b]} share memory; every buffer must be distinct")
