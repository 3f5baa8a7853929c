r"""Exponential moving average (EMA) of the parameters, for evaluation with averaged weights."""
import contextlib

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _transforms
from optcore._kernels._runtime import TensorList
from optcore.params import Arena, Layout, Parameters

__all__ = ["EMA", "ema_update_"]


def ema_update_(avg, param, decay):
    r"""Exponential moving average of parameters, in place: ``avg`` moves toward ``param``.

    .. math::
        a \leftarrow \beta\, a + (1 - \beta)\, p

    evaluated in float32 with :math:`1 - \beta` computed in float64; one sweep reading
    ``avg`` and ``param`` and writing ``avg`` (the memory traffic of a triad).

    Parameters
    ----------
    avg : ndarray or list of ndarray
        The averages (updated), C-contiguous float32.
    param : ndarray or list of ndarray
        The current parameters (read only), same sizes as ``avg``.
    decay : float
        :math:`\beta` in [0, 1]; 0 copies ``param``, 1 leaves ``avg`` unchanged.

    See Also
    --------
    optcore.EMA : keeps the average of a parameter arena, with warm-up, bias correction and
        swapping for evaluation.

    References
    ----------
    Polyak, Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992;
    ``optax.ema``; the update of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and Keras's
    ``use_ema`` (``ema_momentum`` is :math:`\beta`).

    Examples
    --------
    >>> import numpy as np, optcore
    >>> avg = np.zeros(3, np.float32); p = np.ones(3, np.float32)
    >>> optcore.kernels.ema_update_(avg, p, 0.75)
    >>> avg
    array([0.25, 0.25, 0.25], dtype=float32)
    """
    decay = ck.in_range("decay", decay, 0.0, 1.0)
    avgs = ck.array_list("avg", avg)
    params = ck.array_list("param", param, writeable=False)
    ck.same_sizes("avg", avgs, "param", params)
    ck.no_overlap({"avg": avgs, "param": params})
    _transforms.ema(TensorList([avgs, params]), decay)


class EMA:
    r"""Polyak / exponential moving average of parameters, kept in a buffer beside them.

    Each :meth:`update` (call it after ``opt.step()``) applies, in one fused in-place sweep,

    .. math::
        a \leftarrow \beta_n\, a + (1 - \beta_n)\, p

    where :math:`n` is the number of updates already applied and

    - by default :math:`\beta_0 = 0` (the first update copies the parameters, as torch's
      ``AveragedModel`` and Keras's ``use_ema``) and :math:`\beta_n = \beta` afterwards;
    - ``bias_correction=True``: the bias-corrected average of a zero-started EMA (Kingma & Ba's
      correction, optax ``ema(debias=True)``),
      :math:`\hat a_n = a_n / (1 - \beta^{n})` with :math:`a_n = \beta a_{n-1} + (1-\beta)p`,
      :math:`a_0 = 0`. It is kept directly by using
      :math:`\beta_n = \beta\,(1 - \beta^{n}) / (1 - \beta^{n+1})`, so that the buffer always
      holds the corrected average and :meth:`swap` stays a pure exchange;
    - ``warmup="num_updates"``: :math:`\beta_n = \min(\beta, (1 + n)/(10 + n))`, as
      ``tf.train.ExponentialMovingAverage(num_updates=n)``; ``warmup`` may also be a callable
      ``n -> beta_n`` (e.g. a schedule), checked to return a value in [0, 1].

    :math:`\beta_n` is computed in float64 and :math:`1 - \beta_n` handed to the float32 kernel
    :func:`optcore.kernels.ema_update_`. Python work per update is O(1); nothing the size of
    the parameters is allocated after construction.

    Parameters
    ----------
    params : Parameters, ndarray or list of ndarray
        The parameters to average (C-contiguous, writeable float32: :meth:`swap` writes them).
        With a :class:`~optcore.Parameters` arena the whole flat buffer is one kernel call.
    decay : float, default 0.999
        :math:`\beta` in [0, 1] (Keras's ``ema_momentum=0.99``; torch's ``get_ema_multi_avg_fn``
        uses 0.999).
    bias_correction : bool, default False
    warmup : None, "num_updates" or callable, default None
        Not combinable with ``bias_correction``.

    Attributes
    ----------
    average : Arena or list of ndarray
        The averages: ``ema.average["w1"]`` for an arena, ``ema.average[i]`` for arrays (while
        ``swapped``, these hold the live parameters instead).
    num_updates : int
    swapped : bool

    Examples
    --------
    >>> import optcore
    >>> params = optcore.Parameters({"w": (3,)})
    >>> ema = optcore.EMA(params, decay=0.9)
    >>> params["w"][:] = 1.0; ema.update()          # first update copies
    >>> params["w"][:] = 2.0; ema.update()
    >>> ema.average["w"]
    array([1.1, 1.1, 1.1], dtype=float32)
    >>> with ema.averaged():                          # evaluate with the averaged weights
    ...     params["w"]
    array([1.1, 1.1, 1.1], dtype=float32)
    >>> params["w"]
    array([2., 2., 2.], dtype=float32)

    References
    ----------
    Polyak, Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J.
    Control Optim. 1992; Kingma, Ba, "Adam", ICLR 2015 (bias correction);
    ``torch.optim.swa_utils.AveragedModel``; Keras ``Optimizer(use_ema=True)``; ``optax.ema``.
    """

    def __init__(self, params, decay=0.999, *, bias_correction=False, warmup=None):
        self.decay = ck.in_range("decay", decay, 0.0, 1.0)
        self.bias_correction = ck.boolean("bias_correction", bias_correction)
        if not (warmup is None or warmup == "num_updates" or callable(warmup)):
            raise ValueError(f"warmup must be None, 'num_updates' or a callable, got {warmup!r}")
        if warmup is not None and self.bias_correction:
            raise ValueError("warmup and bias_correction cannot be combined")
        self.warmup = warmup
        self._one_buffer = isinstance(params, Parameters)
        if self._one_buffer:
            self._arena = Arena(params.layout)
            self.average = self._arena
            live = [params.flat]
            avgs = [self._arena.flat]
        else:
            live = ck.array_list("params", params)
            ck.no_overlap({"params": live})
            self._arena = Arena(Layout({str(i): a.shape for i, a in enumerate(live)}))
            self.average = [self._arena[str(i)] for i in range(len(live))]
            avgs = self.average
        self._live = live
        self._avgs = avgs
        for a, p in zip(avgs, live):
            a.reshape(-1)[...] = p.reshape(-1)
        self._table = TensorList([avgs, live])
        self.num_updates = 0
        self.swapped = False

    def decay_at(self, n):
        r"""The factor :math:`\beta_n` used by update number ``n`` (0-based)."""
        b = self.decay
        if self.bias_correction:
            return b * (1.0 - b**n) / (1.0 - b ** (n + 1)) if b < 1.0 else 1.0 if n else 0.0
        if self.warmup == "num_updates":
            return min(b, (1.0 + n) / (10.0 + n))
        if self.warmup is not None:
            return ck.in_range(f"warmup({n})", self.warmup(n), 0.0, 1.0)
        return 0.0 if n == 0 else b

    def update(self):
        """Move the average toward the current parameters (one kernel call)."""
        if self.swapped:
            raise RuntimeError("EMA.update() while the averages are swapped in; swap() back first")
        _transforms.ema(self._table, self.decay_at(self.num_updates))
        self.num_updates += 1

    def swap(self):
        """Exchange the parameters and the averages in place (no allocation).

        Call once to evaluate with the averaged weights and once more to swap back: the round
        trip is exact (bitwise).
        """
        _transforms.swap(self._table)
        self.swapped = not self.swapped

    @contextlib.contextmanager
    def averaged(self):
        """Context manager: the parameters hold the averages inside the block."""
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    def copy_to(self):
        """Overwrite the parameters with the averages (Keras's final ``ema_overwrite``)."""
        if self.swapped:
            raise RuntimeError("EMA.copy_to() while swapped; swap() back first")
        for a, p in zip(self._avgs, self._live):
            p.reshape(-1)[...] = a.reshape(-1)

    def state_dict(self):
        """``{"decay", "num_updates", "average"}``: the average as one flat float32 array
        (taken from the parameters while ``swapped``)."""
        if self.swapped and not self._one_buffer:
            flat = np.zeros_like(self._arena.flat)
            for i, p in enumerate(self._live):
                self._arena.layout.view(flat, str(i))[...] = p
        else:
            flat = (self._live[0] if self.swapped else self._arena.flat).copy()
        return {"decay": self.decay, "num_updates": self.num_updates, "average": flat}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`; everything is checked before anything is written."""
        if self.swapped:
            raise RuntimeError("EMA.load_state_dict() while swapped; swap() back first")
        for k in ("decay", "num_updates", "average"):
            if k not in state:
                raise ValueError(f"state lacks {k!r}")
        decay = ck.in_range("state['decay']", float(np.asarray(state["decay"])), 0.0, 1.0)
        n = np.asarray(state["num_updates"]).item()
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"state['num_updates'] must be an int >= 0, got {n!r}")
        avg = np.asarray(state["average"])
        if avg.dtype != np.float32 or avg.shape != self._arena.flat.shape:
            raise ValueError(
                f"state['average'] must be float32 of shape {self._arena.flat.shape}, "
                f"got {avg.dtype} {avg.shape}"
            )
        if decay != self.decay:
            raise ValueError(f"state['decay'] is {decay}, this EMA has decay={self.decay}")
        self._arena.flat[...] = avg
        self.num_updates = n

    def __repr__(self):
        return (f"EMA(decay={self.decay}, bias_correction={self.bias_correction}, "
                f"warmup={self.warmup!r}, num_updates={self.num_updates}, swapped={self.swapped})")
