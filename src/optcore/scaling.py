r"""Dynamic gradient (loss) scaling.

Low-precision backward passes lose small gradients to underflow; multiplying the loss by a
large factor :math:`S` before backward lifts them, and the optimizer divides by :math:`S`
again. :class:`GradScaler` keeps :math:`S` as large as possible: it backs off when the scaled
gradients overflow and grows again after a run of clean steps.

With optcore the unscaling costs no pass of its own: ``opt.step(scaler=scaler)`` reads the
non-finite flag and the norm from its norm pass and multiplies the gradient by :math:`1/S` on
the fly in the update pass (``grad_scale``).
"""
import math

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _norms
from optcore._kernels._runtime import TensorList

__all__ = ["GradScaler", "accumulate_"]


def _f32(x):
    """Round to float32, as torch keeps the scale in a float32 tensor (inf when too large)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def accumulate_(acc, grad, *, first=False):
    r"""Gradient accumulation in place, in one pass: ``acc += grad`` (``acc = grad`` when
    ``first``).

    .. math::
        a \leftarrow \begin{cases} g & \text{first} \\ a + g & \text{otherwise} \end{cases}

    Parameters
    ----------
    acc : ndarray or list of ndarray
        float32 C-contiguous accumulators, updated in place.
    grad : ndarray or list of ndarray
        The micro-batch gradients (read only), same sizes: float32, or bfloat16
        (``ml_dtypes.bfloat16``) / float16, widened exactly.
    first : bool
        Overwrite instead of adding (the first micro-batch of a window), so the accumulator
        never needs zeroing.

    References
    ----------
    ``optax.MultiSteps``; Keras ``gradient_accumulation_steps``.
    """
    ck.boolean("first", first)
    accs, aaddr, alen, abytes, _ = ck.array_table("acc", acc)
    grads, gaddr, glen, gbytes, kinds = ck.array_table("grad", grad, writeable=False, half=True)
    if not np.array_equal(alen, glen):
        ck.same_sizes("acc", accs, "grad", grads)
    ck.no_overlap_at(["acc", "grad"], [aaddr, gaddr], [abytes, gbytes], bare_single=True)
    tl = TensorList.from_addresses(alen, [aaddr, gaddr], (accs, grads))
    tl.set_slot_format(1, kinds)
    _norms.accumulate(tl, 1, 0, first)


class GradScaler:
    r"""Dynamic loss scaling with the semantics of ``torch.amp.GradScaler``.

    Use::

        scaler = GradScaler()
        for batch in data:
            loss = model.loss(batch)
            backward(scaler.scale(loss))        # gradients of S * loss land in params.grads
            info = opt.step(scaler=scaler)      # unscale, check, update or skip, adjust S

    At every optimizer step with gradients :math:`\tilde g = S g`:

    .. math::
        \text{if } \tilde g \text{ has a NaN or inf:}\quad &\text{skip the update},\
            S \leftarrow \beta S,\ n \leftarrow 0 \\
        \text{otherwise:}\quad &\text{update with } \tilde g / S,\ n \leftarrow n + 1,\
            \text{and if } n = N:\ S \leftarrow \gamma S,\ n \leftarrow 0

    with :math:`\beta` = ``backoff_factor``, :math:`\gamma` = ``growth_factor``, :math:`N` =
    ``growth_interval``. :math:`S` is kept in float32 (a growth that would overflow it is not
    applied), as in torch.

    Parameters
    ----------
    init_scale : float
        Initial :math:`S > 0`.
    growth_factor : float
        :math:`\gamma > 1`.
    backoff_factor : float
        :math:`0 < \beta < 1`.
    growth_interval : int
        :math:`N \ge 1` consecutive finite steps before growing.
    enabled : bool
        When False, :meth:`scale` returns the loss unchanged and the optimizer ignores the
        scaler.

    Notes
    -----
    Differences from torch: there is no ``unscale_`` and no ``scaler.step(opt)``;
    ``opt.step(scaler=scaler)`` unscales, checks, steps and calls :meth:`update` itself
    (clipping, if any, applies to the unscaled gradient, as torch users arrange with
    ``unscale_`` before ``clip_grad_norm_``). :meth:`update` takes the overflow flag instead of
    reading it from the optimizer, and has no ``new_scale`` argument. A step skipped for
    overflow counts in the optimizer's ``skipped_steps``.

    References
    ----------
    Micikevicius et al., "Mixed Precision Training", ICLR 2018; ``torch.amp.GradScaler``.
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        init_scale = ck.in_range("init_scale", init_scale, 0.0, math.inf, lo_open=True,
                                 hi_open=True)
        growth_factor = ck.in_range("growth_factor", growth_factor, 1.0, math.inf,
                                    lo_open=True, hi_open=True)
        backoff_factor = ck.in_range("backoff_factor", backoff_factor, 0.0, 1.0, lo_open=True,
                                     hi_open=True)
        growth_interval = ck.positive_int("growth_interval", growth_interval)
        enabled = ck.boolean("enabled", enabled)
        if _f32(init_scale) == 0.0 or not math.isfinite(_f32(init_scale)):
            raise ValueError(f"init_scale must be representable in float32, got {init_scale!r}")
        self._scale = _f32(init_scale)
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._growth_tracker = 0
        self._enabled = enabled

    def is_enabled(self):
        """Whether scaling is on."""
        return self._enabled

    def get_scale(self):
        """The current scale :math:`S` (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self):
        """The factor :math:`\\gamma` the scale grows by."""
        return self._growth_factor

    def get_backoff_factor(self):
        """The factor :math:`\\beta` the scale backs off by on overflow."""
        return self._backoff_factor

    def get_growth_interval(self):
        """The number :math:`N` of consecutive finite steps before the scale grows."""
        return self._growth_interval

    def scale(self, loss):
        """Return ``loss * S`` (the loss itself when disabled).

        ``loss`` is anything that multiplies by a Python float: a float, a NumPy scalar or
        array (its dtype is kept), a torch tensor.
        """
        if not self._enabled:
            return loss
        return loss * self._scale

    def update(self, found_inf):
        """Advance the scale after a step whose scaled gradients were (not) finite.

        :meth:`optcore.Optimizer.step` calls this when given ``scaler=``; call it yourself only
        when stepping by other means.

        Parameters
        ----------
        found_inf : bool
            Whether the step's scaled gradients held a NaN or inf (the step was skipped).
        """
        ck.boolean("found_inf", found_inf)
        if not self._enabled:
            return
        if found_inf:
            self._scale = _f32(self._scale * self._backoff_factor)
            self._growth_tracker = 0
            return
        n = self._growth_tracker + 1
        if n == self._growth_interval:
            grown = _f32(self._scale * self._growth_factor)
            if math.isfinite(grown):
                self._scale = grown
            n = 0
        self._growth_tracker = n

    def state_dict(self):
        """The scaler's state as plain numbers (same keys as torch's GradScaler)."""
        if not self._enabled:
            return {}
        return {
            "scale": self._scale,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state):
        """Load a state from :meth:`state_dict` (or torch's); everything is checked first."""
        if not self._enabled:
            raise RuntimeError("load_state_dict() of a disabled GradScaler")
        if len(state) == 0:
            raise RuntimeError("the state is empty: it was saved from a disabled GradScaler")
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                   "_growth_tracker"} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")

        def num(k):
            v = state[k]
            return v.item() if hasattr(v, "item") else v

        probe = GradScaler(num("scale"), num("growth_factor"), num("backoff_factor"),
                           num("growth_interval"))
        tracker = num("_growth_tracker")
        if isinstance(tracker, bool) or not isinstance(tracker, (int, np.integer)) or not (
            0 <= tracker < probe._growth_interval
        ):
            raise ValueError(f"_growth_tracker must be an int in [0, growth_interval), got {tracker!r}")
        self._scale = probe._scale
        self._growth_factor = probe._growth_factor
        self._backoff_factor = probe._backoff_factor
        self._growth_interval = probe._growth_interval
        self._growth_tracker = int(tracker)

    def __repr__(self):
        return (f"GradScaler(scale={self.get_scale()}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, growth_interval={self._growth_interval}, "
                f"enabled={self._enabled})")
