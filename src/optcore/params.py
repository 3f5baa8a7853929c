"""Parameters: named float32 tensors laid out in one flat, 64-byte-aligned arena."""
import operator
from collections.abc import Mapping

import numpy as np


ALIGN_BYTES = 64
_ALIGN = ALIGN_BYTES // np.dtype(np.float32).itemsize


def aligned_zeros(n):
    """Return a zero-filled float32 array of ``n`` elements whose data is 64-byte aligned."""
    raw = np.zeros(n + _ALIGN, dtype=np.float32)
    skip = (-raw.__array_interface__["data"][0] % ALIGN_BYTES) // raw.itemsize
    return raw[skip : skip + n]


def _shape(name, shape):
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape of {name!r} must be a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape of {name!r} has a negative dimension: {dims}")
    return dims


class Layout:
    """Names, shapes and 64-byte-aligned offsets of tensors packed in one flat buffer."""

    def __init__(self, shapes):
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes must be a mapping of name -> shape, got {type(shapes).__name__}")
        self.names = []
        self.shapes = {}
        self.offsets = {}
        offset = 0
        for name, shape in shapes.items():
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be str, got {name!r}")
            dims = _shape(name, shape)
            self.names.append(name)
            self.shapes[name] = dims
            self.offsets[name] = offset
            size = int(np.prod(dims, dtype=np.int64))
            offset += -(-size // _ALIGN) * _ALIGN
        self.total = offset

    def size(self, name):
        """Number of elements of tensor ``name``."""
        return int(np.prod(self.shapes[name], dtype=np.int64))

    def __eq__(self, other):
        return isinstance(other, Layout) and self.names == other.names and self.shapes == other.shapes

    def view(self, flat, name):
        """The view of tensor ``name`` (its shape) into a flat buffer of this layout."""
        off = self.offsets[name]
        return flat[off : off + self.size(name)].reshape(self.shapes[name])


class Arena(Mapping):
    """One flat aligned float32 buffer (``flat``) seen as named tensor views (``arena[name]``).

    ``flat`` is the whole buffer, the 64-byte padding between tensors included (always zero
    unless written through ``flat``).
    """

    def __init__(self, layout):
        self.layout = layout
        self.flat = aligned_zeros(layout.total)
        self._views = {n: layout.view(self.flat, n) for n in layout.names}

    def __getitem__(self, name):
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}; names are {self.layout.names}") from None

    def __setitem__(self, name, value):
        self[name][...] = value

    def __iter__(self):
        return iter(self.layout.names)

    def __len__(self):
        return len(self.layout.names)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{n}: {self.layout.shapes[n]}' for n in self)})"


class Parameters(Arena):
    """Named float32 parameters in one flat 64-byte-aligned arena, with a gradient arena.

    Parameters
    ----------
    shapes : mapping of str to tuple of int
        Names and shapes, kept in order.
    dtype : numpy dtype, optional
        Must be float32 (the only dtype of the kernels).

    Attributes
    ----------
    flat : ndarray
        The whole value buffer; ``params[name]`` is a view into it starting 64-byte aligned.
    grads : Arena
        The gradient buffer, same layout: ``params.grads[name]``, ``params.grads.flat``.

    Examples
    --------
    >>> import optcore
    >>> params = optcore.Parameters({"w1": (4, 3), "b1": (3,)})
    >>> params["w1"].shape, params.grads["b1"].shape
    ((4, 3), (3,))
    """

    def __init__(self, shapes, dtype=np.float32):
        if np.dtype(dtype) != np.float32:
            raise TypeError(f"dtype must be float32, got {np.dtype(dtype)}")
        super().__init__(Layout(shapes))
        self.grads = Arena(self.layout)

    @classmethod
    def from_arrays(cls, arrays):
        """Build Parameters holding copies of ``arrays`` (a mapping of name to array)."""
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays must be a mapping of name -> array, got {type(arrays).__name__}")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
                raise TypeError(f"arrays[{k!r}] must be numeric, got dtype {v.dtype}")
        params = cls({k: v.shape for k, v in arrays.items()})
        for k, v in arrays.items():
            params[k] = v
        return params

    @property
    def numel(self):
        """Number of parameter elements (padding excluded)."""
        return sum(self.layout.size(n) for n in self)

    def zero_grad(self):
        """Set every gradient to zero (one fill of the gradient arena)."""
        self.grads.flat.fill(0.0)

    def state_dict(self):
        """Return ``{"layout.names": names, "param.<name>": values}``: plain arrays, for
        ``np.savez`` without pickle. Shapes are those of the arrays."""
        out = {"layout.names": np.array(self.layout.names, dtype=str)}
        for n in self:
            out[f"param.{n}"] = self[n].copy()
        return out

    def load_state_dict(self, state):
        """Copy values saved by :meth:`state_dict` in; the names and shapes must match."""
        names = [str(n) for n in np.asarray(state.get("layout.names", ())).reshape(-1)]
        if names != self.layout.names:
            raise ValueError(f"state has parameters {names}, expected {self.layout.names}")
        values = {}
        for n in self:
            if f"param.{n}" not in state:
                raise ValueError(f"state lacks 'param.{n}'")
            v = np.asarray(state[f"param.{n}"])
            if v.shape != self.layout.shapes[n]:
                raise ValueError(f"state['param.{n}'] has shape {v.shape}, expected {self.layout.shapes[n]}")
            if not np.issubdtype(v.dtype, np.floating):
                raise TypeError(f"state['param.{n}'] must be floating point, got {v.dtype}")
            values[n] = v
        for n, v in values.items():
            self[n] = v

    def __repr__(self):
        return f"Parameters({', '.join(f'{n}: {self.layout.shapes[n]}' for n in self)}; {self.numel} elements)"
