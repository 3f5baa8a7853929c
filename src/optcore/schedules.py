r"""Learning-rate schedules: small picklable objects mapping a step to a learning rate.

Each schedule is called as ``sched(t) -> lr`` with ``t >= 0`` the number of optimizer steps
already taken (0 for the first step), and is pure: the same ``t`` always gives the same value
(except :class:`ReduceLROnPlateau`, which follows a validation metric and keeps state). Use one
either explicitly::

    for t in range(steps):
        ...
        opt.step(lr=sched(t))

or attached to an optimizer, which then sets every group's ``lr`` (and, for
:class:`OneCycle`, ``momentum`` or ``betas[0]``) before each step::

    opt.schedule = sched
    for t in range(steps):
        ...
        opt.step()

Arguments are checked at construction and a bad one raises (TypeError or ValueError naming
it); nothing falls back silently to a constant. Values are computed in float64.

Names and defaults follow ``torch.optim.lr_scheduler`` where torch has the schedule
(:class:`ReduceLROnPlateau`, :class:`OneCycle` = ``OneCycleLR``, :class:`SGDR` =
``CosineAnnealingWarmRestarts``), Keras ``keras.optimizers.schedules`` for the decays
(:class:`ExponentialDecay`, :class:`CosineDecay`), and optax for :func:`join`
(``optax.join_schedules``). See ``docs/schedules.rst`` for the differences.
"""
import math
from numbers import Real

import numpy as np

from optcore import _checks as ck

__all__ = [
    "Schedule",
    "Constant",
    "PowerDecay",
    "ExponentialDecay",
    "PiecewiseConstant",
    "ReduceLROnPlateau",
    "OneCycle",
    "LinearWarmup",
    "CosineDecay",
    "SGDR",
    "Join",
    "join",
]


def _step(t):
    """Check a step number: a finite real >= 0 (ints, NumPy integers and floats accepted)."""
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, Real):
        raise TypeError(f"step must be a real number >= 0, got {type(t).__name__}")
    t = float(t)
    if not (0.0 <= t < math.inf):
        raise ValueError(f"step must be finite and >= 0, got {t!r}")
    return t


def _lr(name, value):
    v = ck.in_range(name, value, 0.0, math.inf, hi_open=True)
    return v


def _positive(name, value):
    return ck.in_range(name, value, 0.0, math.inf, lo_open=True, hi_open=True)


def _count(name, value, minimum=0):
    """An int >= minimum (a number of steps)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _cosine(start, end, frac):
    """Half a cosine from ``start`` (frac 0) to ``end`` (frac 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class Schedule:
    """Base class: ``sched(t)`` checks ``t`` and returns :meth:`value` ``(t)``.

    Subclasses implement :meth:`value`. A schedule that also drives the momentum (or Adam's
    ``beta1``) sets ``cycles_momentum = True`` and implements :meth:`momentum`.
    """

    cycles_momentum = False

    def __call__(self, step):
        return self.value(_step(step))

    def value(self, t):
        """The learning rate at step ``t`` (a float >= 0, already checked)."""
        raise NotImplementedError

    def momentum(self, step):
        """The momentum (or ``beta1``) at ``step``, or None when this schedule leaves it alone."""
        return None

    def state_dict(self):
        """The state that changes as training goes (empty for a pure schedule)."""
        return {}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    r"""A constant learning rate, :math:`\eta_t = \eta`.

    Parameters
    ----------
    lr : float
        The learning rate (>= 0).
    """

    def __init__(self, lr):
        self.lr = _lr("lr", lr)

    def value(self, t):
        return self.lr


class PowerDecay(Schedule):
    r"""Power scheduling, :math:`\eta_t = \eta_0 / (1 + t/s)^c`.

    With ``power=1`` this is Keras ``InverseTimeDecay(initial_learning_rate, decay_steps,
    decay_rate=1)``. Géron (Hands-On Machine Learning, ch. 11) calls it power scheduling: the
    rate drops to :math:`\eta_0/2` after :math:`s` steps (for :math:`c = 1`), then ever more
    slowly.

    Parameters
    ----------
    initial_lr : float
        :math:`\eta_0` (>= 0).
    decay_steps : float
        :math:`s` (> 0).
    power : float, default 1.0
        :math:`c` (>= 0).

    Examples
    --------
    >>> from optcore.schedules import PowerDecay
    >>> PowerDecay(0.1, decay_steps=10)(10)
    0.05
    """

    def __init__(self, initial_lr, decay_steps, power=1.0):
        self.initial_lr = _lr("initial_lr", initial_lr)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.power = ck.in_range("power", power, 0.0, math.inf, hi_open=True)

    def value(self, t):
        return self.initial_lr / (1.0 + t / self.decay_steps) ** self.power


class ExponentialDecay(Schedule):
    r"""Exponential scheduling, :math:`\eta_t = \eta_0\, r^{t/s}` (staircase:
    :math:`r^{\lfloor t/s \rfloor}`).

    Keras ``ExponentialDecay(initial_learning_rate, decay_steps, decay_rate, staircase)``,
    with the default ``decay_rate=0.1`` of Géron's exponential scheduling (the rate drops
    tenfold every :math:`s` steps). torch ``ExponentialLR(gamma)`` is ``decay_steps=1,
    decay_rate=gamma``; torch ``StepLR(step_size, gamma)`` is ``staircase=True``.

    Parameters
    ----------
    initial_lr : float
        :math:`\eta_0` (>= 0).
    decay_steps : float
        :math:`s` (> 0).
    decay_rate : float, default 0.1
        :math:`r`, in [0, 1].
    staircase : bool, default False
        Decay in discrete jumps every ``decay_steps``.
    """

    def __init__(self, initial_lr, decay_steps, decay_rate=0.1, staircase=False):
        self.initial_lr = _lr("initial_lr", initial_lr)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.decay_rate = ck.in_range("decay_rate", decay_rate, 0.0, 1.0)
        self.staircase = ck.boolean("staircase", staircase)

    def value(self, t):
        e = t / self.decay_steps
        if self.staircase:
            e = math.floor(e)
        return self.initial_lr * self.decay_rate**e


class PiecewiseConstant(Schedule):
    r"""Piecewise constant scheduling: ``values[i]`` for ``boundaries[i-1] <= t <
    boundaries[i]``.

    .. math::
        \eta_t = v_i \quad\text{with}\quad i = \#\{j : b_j \le t\}

    The switch happens *at* the boundary step, as in torch ``MultiStepLR`` and optax
    ``piecewise_constant_schedule``; Keras ``PiecewiseConstantDecay`` switches one step later
    (``t > b``).

    Parameters
    ----------
    boundaries : sequence of float
        Non-empty, strictly increasing, >= 0.
    values : sequence of float
        ``len(boundaries) + 1`` learning rates (>= 0).
    """

    def __init__(self, boundaries, values):
        self.boundaries = _boundaries("boundaries", boundaries)
        if not isinstance(values, (list, tuple, np.ndarray)):
            raise TypeError(f"values must be a sequence of floats, got {type(values).__name__}")
        if len(values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(values)}"
            )
        self.values = tuple(_lr(f"values[{i}]", v) for i, v in enumerate(values))

    def value(self, t):
        i = 0
        for b in self.boundaries:
            if t >= b:
                i += 1
        return self.values[i]


def _boundaries(name, boundaries):
    if not isinstance(boundaries, (list, tuple, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(boundaries).__name__}")
    if len(boundaries) == 0:
        raise ValueError(f"{name} must not be empty")
    out = tuple(ck.in_range(f"{name}[{i}]", b, 0.0, math.inf, hi_open=True)
                for i, b in enumerate(boundaries))
    for i in range(1, len(out)):
        if not out[i] > out[i - 1]:
            raise ValueError(f"{name} must be strictly increasing, got {list(out)}")
    return out


class ReduceLROnPlateau(Schedule):
    r"""Performance scheduling: multiply the rate by ``factor`` when a validation metric has
    stopped improving for more than ``patience`` evaluations.

    Feed it the metric once per evaluation with :meth:`step` (``sched.step(val_loss)``); the
    current rate is ``sched(t)`` (whatever ``t``) or :attr:`lr`. The logic, names and defaults
    are those of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (for one parameter group):

    - better means :math:`m < b(1 - \theta)` (``mode="min"``, ``threshold_mode="rel"``),
      :math:`m < b - \theta` (``"abs"``), and symmetrically for ``mode="max"``;
    - after more than ``patience`` evaluations without improvement,
      :math:`\eta \leftarrow \max(\eta \cdot \text{factor}, \text{min\_lr})` (skipped when the
      change is below ``eps``), then ``cooldown`` evaluations during which bad ones are not
      counted.

    A NaN metric counts as no improvement.

    Parameters
    ----------
    initial_lr : float
        Starting rate (>= 0).
    mode : {"min", "max"}, default "min"
    factor : float, default 0.1
        In [0, 1).
    patience : int, default 10
    threshold : float, default 1e-4
    threshold_mode : {"rel", "abs"}, default "rel"
    cooldown : int, default 0
    min_lr : float, default 0.0
    eps : float, default 1e-8

    References
    ----------
    Géron, Hands-On Machine Learning, ch. 11 ("performance scheduling"); Keras
    ``ReduceLROnPlateau`` callback (``min_delta`` is ``threshold`` with ``"abs"``).
    """

    def __init__(self, initial_lr, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        self.initial_lr = _lr("initial_lr", initial_lr)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.factor = ck.in_range("factor", factor, 0.0, 1.0, hi_open=True)
        self.patience = _count("patience", patience)
        self.threshold = ck.in_range("threshold", threshold, 0.0, math.inf, hi_open=True)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.threshold_mode = threshold_mode
        self.cooldown = _count("cooldown", cooldown)
        self.min_lr = _lr("min_lr", min_lr)
        self.eps = ck.nonnegative("eps", eps)
        self._reset()

    def _reset(self):
        self._lr = self.initial_lr
        self._best = math.inf if self.mode == "min" else -math.inf
        self._num_bad = 0
        self._cooldown_counter = 0
        self._evaluations = 0

    @property
    def lr(self):
        """The current learning rate."""
        return self._lr

    @property
    def best(self):
        """The best metric seen so far."""
        return self._best

    def value(self, t):
        return self._lr

    def _is_better(self, a):
        best, th = self._best, self.threshold
        if self.mode == "min":
            return a < best * (1.0 - th) if self.threshold_mode == "rel" else a < best - th
        return a > best * (1.0 + th) if self.threshold_mode == "rel" else a > best + th

    def step(self, metric):
        """Record one evaluation of the monitored metric; return the (possibly reduced) rate."""
        m = ck.real("metric", metric)
        self._evaluations += 1
        if self._is_better(m):
            self._best = m
            self._num_bad = 0
        else:
            self._num_bad += 1
        if self._cooldown_counter > 0:
            self._cooldown_counter -= 1
            self._num_bad = 0
        if self._num_bad > self.patience:
            new = max(self._lr * self.factor, self.min_lr)
            if self._lr - new > self.eps:
                self._lr = new
            self._cooldown_counter = self.cooldown
            self._num_bad = 0
        return self._lr

    _STATE = ("lr", "best", "num_bad_epochs", "cooldown_counter", "evaluations")

    def state_dict(self):
        return {"lr": self._lr, "best": self._best, "num_bad_epochs": self._num_bad,
                "cooldown_counter": self._cooldown_counter, "evaluations": self._evaluations}

    def load_state_dict(self, state):
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ValueError(f"state lacks {missing}")
        lr = _lr("state['lr']", float(np.asarray(state["lr"])))
        best = float(np.asarray(state["best"]))
        counts = [_count(f"state[{k!r}]", int(np.asarray(state[k])))
                  for k in ("num_bad_epochs", "cooldown_counter", "evaluations")]
        self._lr, self._best = lr, best
        self._num_bad, self._cooldown_counter, self._evaluations = counts


class OneCycle(Schedule):
    r"""The 1cycle policy (Smith 2018): warm up from ``max_lr / div_factor`` to ``max_lr``,
    then anneal down to ``max_lr / (div_factor * final_div_factor)``, while the momentum moves
    the opposite way between ``max_momentum`` and ``base_momentum``.

    Same names, defaults and formula as ``torch.optim.lr_scheduler.OneCycleLR`` (closed
    form): phase ends at steps :math:`p T - 1` and :math:`T - 1` (:math:`p` =
    ``pct_start``, :math:`T` = ``total_steps``), or :math:`pT - 1`, :math:`2pT - 2`,
    :math:`T - 1` with ``three_phase``; within a phase from step :math:`s_0` to :math:`s_1`
    with :math:`f = (t - s_0) / (s_1 - s_0)`,

    .. math::
        \text{cos: } e + \tfrac{a - e}{2}\,(1 + \cos \pi f) \qquad
        \text{linear: } a + (e - a) f

    from value :math:`a` to :math:`e`. Valid for :math:`0 \le t \le T` (a later step raises).

    When attached to an optimizer (``opt.schedule = sched``) with ``cycle_momentum=True``, the
    optimizer's ``momentum`` (SGD, RMSProp) or ``betas[0]`` (Adam family) follows
    :meth:`momentum`.

    Parameters
    ----------
    max_lr : float
    total_steps : int
    pct_start : float, default 0.3
    anneal_strategy : {"cos", "linear"}, default "cos"
    cycle_momentum : bool, default True
    base_momentum : float, default 0.85
    max_momentum : float, default 0.95
    div_factor : float, default 25.0
    final_div_factor : float, default 1e4
    three_phase : bool, default False

    References
    ----------
    Smith, Topin, "Super-Convergence: Very Fast Training of Neural Networks Using Large
    Learning Rates", 2017; Smith, "A disciplined approach to neural network
    hyper-parameters: Part 1", 2018.
    """

    def __init__(self, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False):
        self.max_lr = _lr("max_lr", max_lr)
        self.total_steps = _count("total_steps", total_steps, 1)
        self.pct_start = ck.in_range("pct_start", pct_start, 0.0, 1.0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.cycle_momentum = ck.boolean("cycle_momentum", cycle_momentum)
        self.base_momentum = ck.in_range("base_momentum", base_momentum, 0.0, 1.0, hi_open=True)
        self.max_momentum = ck.in_range("max_momentum", max_momentum, 0.0, 1.0, hi_open=True)
        self.div_factor = _positive("div_factor", div_factor)
        self.final_div_factor = _positive("final_div_factor", final_div_factor)
        self.three_phase = ck.boolean("three_phase", three_phase)
        self.cycles_momentum = self.cycle_momentum
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        T, p = self.total_steps, self.pct_start
        bm, mm = self.base_momentum, self.max_momentum
        if self.three_phase:
            self._phases = ((p * T - 1, initial, self.max_lr, mm, bm),
                            (2 * p * T - 2, self.max_lr, initial, bm, mm),
                            (T - 1, initial, final, mm, mm))
        else:
            self._phases = ((p * T - 1, initial, self.max_lr, mm, bm),
                            (T - 1, self.max_lr, final, bm, mm))

    def _anneal(self, a, e, f):
        if self.anneal_strategy == "cos":
            return _cosine(a, e, f)
        return a + (e - a) * f

    def _at(self, t, which):
        if t > self.total_steps:
            raise ValueError(f"step {t:g} is past total_steps={self.total_steps}")
        start = 0.0
        last = len(self._phases) - 1
        for i, (end, lr_a, lr_e, m_a, m_e) in enumerate(self._phases):
            if t <= end or i == last:
                f = (t - start) / (end - start) if end > start else 1.0
                return self._anneal(lr_a, lr_e, f) if which == 0 else self._anneal(m_a, m_e, f)
            start = end
        raise AssertionError("unreachable")

    def value(self, t):
        return self._at(t, 0)

    def momentum(self, step):
        if not self.cycle_momentum:
            return None
        return self._at(_step(step), 1)


class LinearWarmup(Schedule):
    r"""Linear warm-up to ``peak_lr`` over ``warmup_steps``, then constant:

    .. math::
        \eta_t = \eta_s + (\eta_p - \eta_s)\,\min(t / W, 1)

    torch ``LinearLR(start_factor=start_lr/peak_lr, end_factor=1, total_iters=W)`` on a base
    rate of ``peak_lr``; optax ``linear_schedule(start_lr, peak_lr, W)``. Warm-up (Goyal et al.,
    "Accurate, Large Minibatch SGD", 2017) keeps early updates small while Adam's or momentum's
    statistics are still poor; chain it with a decay by :func:`join`.

    Parameters
    ----------
    peak_lr : float
        :math:`\eta_p` (>= 0).
    warmup_steps : int
        :math:`W` (>= 0; 0 means constant ``peak_lr``).
    start_lr : float, default 0.0
        :math:`\eta_s` (>= 0).
    """

    def __init__(self, peak_lr, warmup_steps, start_lr=0.0):
        self.peak_lr = _lr("peak_lr", peak_lr)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.start_lr = _lr("start_lr", start_lr)

    def value(self, t):
        if t >= self.warmup_steps:
            return self.peak_lr
        return self.start_lr + (self.peak_lr - self.start_lr) * (t / self.warmup_steps)


class CosineDecay(Schedule):
    r"""Cosine decay (with optional linear warm-up) from ``peak_lr`` to ``min_lr``:

    .. math::
        \eta_t = \begin{cases}
          \eta_s + (\eta_p - \eta_s)\, t / W & t < W \\
          \eta_{min} + \tfrac12 (\eta_p - \eta_{min}) (1 + \cos(\pi \min(t - W, D) / D)) & t \ge W
        \end{cases}

    and ``min_lr`` from :math:`t = W + D` on. Keras ``CosineDecay(initial_learning_rate,
    decay_steps, alpha, warmup_target, warmup_steps)`` counts ``decay_steps`` after the
    warm-up, as here (``alpha`` there is ``min_lr / peak_lr``); optax
    ``warmup_cosine_decay_schedule`` counts them from step 0. Without warm-up this is torch
    ``CosineAnnealingLR(T_max=D, eta_min=min_lr)`` for :math:`t \le D` (torch's rate climbs
    again after ``T_max``; this one stays at ``min_lr``).

    Parameters
    ----------
    peak_lr : float
        :math:`\eta_p`, the rate at the end of the warm-up.
    decay_steps : int
        :math:`D` (>= 1).
    min_lr : float, default 0.0
        :math:`\eta_{min}` (torch's ``eta_min``).
    warmup_steps : int, default 0
        :math:`W`.
    warmup_start_lr : float, default 0.0
        :math:`\eta_s`.

    References
    ----------
    Loshchilov, Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017.
    """

    def __init__(self, peak_lr, decay_steps, min_lr=0.0, warmup_steps=0, warmup_start_lr=0.0):
        self.peak_lr = _lr("peak_lr", peak_lr)
        self.decay_steps = _count("decay_steps", decay_steps, 1)
        self.min_lr = _lr("min_lr", min_lr)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.warmup_start_lr = _lr("warmup_start_lr", warmup_start_lr)

    def value(self, t):
        w = self.warmup_steps
        if t < w:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * (t / w)
        f = min(t - w, self.decay_steps) / self.decay_steps
        return _cosine(self.peak_lr, self.min_lr, f)


class SGDR(Schedule):
    r"""Cosine annealing with warm restarts (SGDR), after an optional linear warm-up.

    Cycle :math:`i` (from 0) lasts :math:`T_i = T_0\, m^i` steps and starts at peak
    :math:`\eta_p \gamma^i`; inside it, with :math:`T_{cur}` steps since its start,

    .. math::
        \eta_t = \eta_{min} + \tfrac12 (\eta_p \gamma^i - \eta_{min})
                 (1 + \cos(\pi T_{cur} / T_i))

    Cycles are counted from the end of the warm-up (:math:`W` steps rising linearly from
    ``warmup_start_lr`` to ``peak_lr``, once). With ``warmup_steps=0`` and ``cycle_decay=1``
    this is torch ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)``.

    Parameters
    ----------
    peak_lr : float
        :math:`\eta_p`.
    first_cycle_steps : int
        :math:`T_0` (>= 1), torch's ``T_0``.
    t_mult : int, default 1
        :math:`m` (>= 1), torch's ``T_mult``.
    min_lr : float, default 0.0
        torch's ``eta_min``.
    cycle_decay : float, default 1.0
        :math:`\gamma` in (0, 1]: each restart peaks lower (as timm's ``cycle_decay``).
    warmup_steps : int, default 0
    warmup_start_lr : float, default 0.0

    References
    ----------
    Loshchilov, Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017.
    """

    def __init__(self, peak_lr, first_cycle_steps, t_mult=1, min_lr=0.0, cycle_decay=1.0,
                 warmup_steps=0, warmup_start_lr=0.0):
        self.peak_lr = _lr("peak_lr", peak_lr)
        self.first_cycle_steps = _count("first_cycle_steps", first_cycle_steps, 1)
        self.t_mult = _count("t_mult", t_mult, 1)
        self.min_lr = _lr("min_lr", min_lr)
        self.cycle_decay = ck.in_range("cycle_decay", cycle_decay, 0.0, 1.0, lo_open=True)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.warmup_start_lr = _lr("warmup_start_lr", warmup_start_lr)

    def cycle(self, t):
        """Return ``(i, t_cur, t_i)``: the cycle index, steps into it, and its length."""
        t = _step(t) - self.warmup_steps
        if t < 0:
            raise ValueError("step is inside the warm-up, before the first cycle")
        t0, m = self.first_cycle_steps, self.t_mult
        if m == 1:
            i = math.floor(t / t0)
            return i, t - i * t0, t0
        i, start, length = 0, 0, t0
        while t >= start + length:
            start += length
            length *= m
            i += 1
        return i, t - start, length

    def value(self, t):
        w = self.warmup_steps
        if t < w:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * (t / w)
        i, t_cur, t_i = self.cycle(t)
        return _cosine(self.peak_lr * self.cycle_decay**i, self.min_lr, t_cur / t_i)


class Join(Schedule):
    """Schedules chained at boundaries; see :func:`join`."""

    def __init__(self, schedules, boundaries):
        if not isinstance(schedules, (list, tuple)) or not schedules:
            raise ValueError("schedules must be a non-empty list of schedules")
        for i, s in enumerate(schedules):
            if not isinstance(s, Schedule):
                raise TypeError(f"schedules[{i}] must be a Schedule, got {type(s).__name__}")
            if isinstance(s, ReduceLROnPlateau):
                raise TypeError(
                    f"schedules[{i}] is a ReduceLROnPlateau, which follows a metric, not the "
                    "step; it cannot be joined"
                )
        self.schedules = tuple(schedules)
        self.boundaries = _boundaries("boundaries", boundaries)
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"boundaries must have len(schedules) - 1 = {len(self.schedules) - 1} entries, "
                f"got {len(self.boundaries)}"
            )
        self.cycles_momentum = any(s.cycles_momentum for s in self.schedules)

    def _active(self, t):
        start = 0.0
        for s, b in zip(self.schedules, self.boundaries):
            if t < b:
                return s, t - start
            start = b
        return self.schedules[-1], t - start

    def value(self, t):
        s, local = self._active(t)
        return s.value(local)

    def momentum(self, step):
        s, local = self._active(_step(step))
        return s.momentum(local)


def join(schedules, boundaries):
    r"""Chain schedules: ``schedules[i]`` runs for ``boundaries[i-1] <= t < boundaries[i]``,
    seeing the step counted from its own start, ``t - boundaries[i-1]``.

    As ``optax.join_schedules``. For example, 500 warm-up steps then a cosine decay over
    9500 steps::

        join([LinearWarmup(1e-3, 500), CosineDecay(1e-3, 9500)], [500])

    Parameters
    ----------
    schedules : list of Schedule
        ``len(boundaries) + 1`` schedules (not :class:`ReduceLROnPlateau`).
    boundaries : list of float
        Strictly increasing, >= 0.

    Returns
    -------
    Join
    """
    return Join(schedules, boundaries)
