"""Optimizers over a :class:`~optcore.Parameters` arena or a list of ``(param, grad)`` arrays.

Names, defaults and update rules follow ``torch.optim``. One ``step()`` is one fused kernel
call per parameter group: every state buffer is read and written once, nothing the size of
the parameters is allocated, and Python does work proportional to the number of groups only.
"""
from dataclasses import dataclass

import numpy as np

from optcore import _checks as ck
from optcore import _fused, _lowp, _rules
from optcore import clip as _clip
from optcore._kernels import _norms, _optim
from optcore._kernels._runtime import TensorList
from optcore.params import Arena, Layout, Parameters
from optcore.scaling import GradScaler

__all__ = ["Optimizer", "StepResult", "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaMax", "NAdam",
           "Adam8bit", "AdamW8bit"]

# Hyper-parameters that decide which state buffers exist; fixed after construction.
_STRUCTURAL = ("momentum", "centered", "amsgrad")

# Kernel slots of the model copy and of the Kahan compensation (see oc_optim.h).
_SLOT_COPY, _SLOT_COMP = 6, 7

# Parameter and gradient dtypes of the (param, grad) pairs API.
_DTYPES = ("float32",) + ck.HALF_DTYPES


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`Optimizer.step` did.

    Attributes
    ----------
    grad_norm : float or None
        Global norm (of the clip policy's ``norm_type``, else L2) of the gradient the update
        used -- after unscaling by the loss scale and averaging over accumulated
        micro-batches, before clipping -- when the step ran a norm pass (clipping by norm,
        a scaler, or ``nonfinite`` other than ``"propagate"``); None otherwise, and on
        micro-steps.
    clip_factor : float
        The factor clipping applied to the gradient: the global factor for ``GlobalNorm``,
        the smallest per-tensor (per-unit) factor for ``PerTensorNorm`` (``Adaptive``);
        1.0 when nothing was scaled (no clipping, ``Value``, micro-steps, skipped steps).
    skipped : bool
        True when the step was skipped because the gradient held a NaN or inf
        (``nonfinite="skip"``, or a scaler found an overflow): nothing changed.
    loss_scale : float or None
        The scaler's scale the gradients of this step were multiplied by (before the scaler
        adjusted it), or None without an enabled scaler.
    applied : bool
        True when the parameters were updated; False on skipped steps and on the first
        ``accumulate - 1`` calls of a window (micro-steps), which only add the gradient to
        the accumulation buffer.
    """

    grad_norm: object
    clip_factor: float
    skipped: bool
    loss_scale: object
    applied: bool


class _Group:
    """The arrays, state and kernel table of one parameter group."""

    def __init__(self, rule, hyper, names, params, grads, state_dtype="float32",
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, copies=None, compensation=False):
        self.names = names
        self.params = params
        self.grads = grads
        self.layout = Layout({n: p.shape for n, p in zip(names, params)})
        self.state_names = rule.state_names(hyper)
        init = rule.initial_state(hyper)
        self.state_dtype = state_dtype
        self.state = {}
        sizes = [a.size for a in params]
        for s in self.state_names:
            if s is None:
                continue
            if state_dtype == "float32":
                buf = Arena(self.layout)
                buf.flat.fill(init.get(s, 0.0))
            else:
                buf = _lowp.StateBuffer(sizes, _lowp.kinds_for(
                    state_dtype, sizes, s not in _rules.NONNEGATIVE_STATE, min_8bit_size))
                buf.fill(init.get(s, 0.0))
            self.state[s] = buf
        self.step = 0
        self.scalars = {}
        self.structure = {k: hyper[k] != 0 for k in _STRUCTURAL if k in hyper}
        slots = [[_lowp.kernel_view(a) for a in params], [_lowp.kernel_view(a) for a in grads],
                 None] + [None if s is None else self._state_arrays(s) for s in self.state_names]
        self.table = TensorList(slots)
        self.table.set_slot_format(0, _lowp.formats(params))
        self.table.set_slot_format(1, _lowp.formats(grads))
        if copies is not None:
            self.table.set_slot(_SLOT_COPY, [_lowp.kernel_view(a) for a in copies])
            self.table.set_slot_format(_SLOT_COPY, _lowp.formats(copies))
        self.comp = _lowp.Compensation(params) if compensation else None
        if self.comp is not None:
            self.table.set_slot_addresses(_SLOT_COMP, self.comp.addresses(), self.comp)
            self.table.set_slot_format(_SLOT_COMP, self.comp.kinds)
        if state_dtype != "float32":
            for k, s in enumerate(self.state_names):
                if s is not None:
                    self.table.set_slot_format(3 + k, self.state[s].kinds, self.state[s].absmax)
        self.acc = None
        self.units = None
        self.unit_tensor = None

    def _state_arrays(self, s):
        """The kernel's arrays of state buffer ``s``, one per tensor."""
        if self.state_dtype == "float32":
            return [self.state[s][n] for n in self.names]
        return self.state[s].data

    def state_view(self, s, name):
        """State ``s`` of tensor ``name``: a view (float32 state) or a float32 copy."""
        if self.state_dtype == "float32":
            return self.state[s][name]
        i = self.names.index(name)
        return self.state[s].get(i).reshape(self.params[i].shape)

    @property
    def state_nbytes(self):
        """Bytes of the state buffers (and compensation buffers) of this group."""
        return sum(b.flat.nbytes if self.state_dtype == "float32" else b.nbytes
                   for b in self.state.values()) + (self.comp.nbytes if self.comp else 0)

    def enable_accumulation(self):
        """Give the group a gradient accumulator, read by the update kernel as slot 2."""
        self.acc = Arena(self.layout)
        self.table.set_slot(2, [self.acc[n] for n in self.names])

    def enable_units(self):
        """A second table over the same buffers whose entries are the units of adaptive
        clipping (the rows along axis 0 of every tensor; a 0-d/1-d tensor is one unit), so
        that per-unit factors ride on the update kernel's per-tensor scale."""
        def rows(arrays):
            return [r for a in arrays for r in _unit_rows(a)]

        slots = [rows(self.params), rows(self.grads),
                 None if self.acc is None else rows([self.acc[n] for n in self.names])]
        slots += [None if s is None else rows([self.state[s][n] for n in self.names])
                  for s in self.state_names]
        self.units = TensorList(slots)
        counts = [len(_unit_rows(a)) for a in self.params]
        self.unit_tensor = np.repeat(np.arange(len(self.params), dtype=np.int64), counts)

    def sums(self, acc_slot):
        """Norm pass over the gradient (+ accumulator), see :func:`optcore._fused.sums`."""
        return _fused.sums(self.table, self.units, self.unit_tensor, acc_slot)


def _unit_rows(a):
    """The units of one tensor as 1-d views: rows along axis 0, or the whole 0-d/1-d tensor."""
    if a.ndim >= 2:
        return list(a.reshape(a.shape[0], -1))
    return [a.reshape(-1)]


def _scaler_arg(scaler):
    if scaler is None:
        return None
    if not isinstance(scaler, GradScaler):
        raise TypeError(f"scaler must be an optcore.scaling.GradScaler, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def _pairs(arg, name, half=False):
    """Check ``(param, grad)`` pairs: float32, or with ``half`` also bfloat16/float16 (a
    16-bit param takes a grad of its own dtype or float32; a float32 param any grad)."""
    if not isinstance(arg, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in arg
    ):
        raise TypeError(f"{name} must be a list of (param, grad) array pairs")
    dtypes = _DTYPES if half else ("float32",)
    params = [ck.float_buffer(f"{name}[{i}][0] (param)", p, dtypes=dtypes)
              for i, (p, _) in enumerate(arg)]
    grads = [ck.float_buffer(f"{name}[{i}][1] (grad)", g, writeable=False, dtypes=dtypes)
             for i, (_, g) in enumerate(arg)]
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != np.float32 and g.dtype not in (p.dtype, np.float32):
            raise TypeError(f"{name}[{i}]: a {p.dtype} param takes a {p.dtype} or float32 grad, "
                            f"got a {g.dtype} grad")
        if p.shape != g.shape:
            raise ValueError(f"{name}[{i}]: param has shape {p.shape} but grad has shape {g.shape}")
    return params, grads


def _named_groups(params, groups):
    """Split the names of a Parameters arena into groups: ``[(overrides, names)]``.

    ``groups`` is a list of ``{"params": [names], <hyper>: value}`` dicts; the names no group
    lists form a last group with no overrides. Unknown or repeated names raise ValueError.
    """
    if groups is not None and not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of dicts, got {type(groups).__name__}")
    specs, used = [], set()
    for i, g in enumerate(groups or ()):
        if (not isinstance(g, dict) or "params" not in g
                or not isinstance(g["params"], (list, tuple))):
            raise TypeError(f"groups[{i}] must be a dict with a 'params' list of names")
        names = list(g["params"])
        for n in names:
            if n not in params:
                raise ValueError(f"groups[{i}] names unknown parameter {n!r}")
            if n in used:
                raise ValueError(f"parameter {n!r} appears in more than one group")
            used.add(n)
        specs.append(({k: v for k, v in g.items() if k != "params"}, names))
    rest = [n for n in params if n not in used]
    if rest:
        specs.append(({}, rest))
    return specs


class Optimizer:
    r"""Base class: parameter groups, ``step``, ``zero_grad``, ``state_dict``.

    Parameters
    ----------
    params : Parameters, list of (param, grad) pairs, or list of dicts
        What to optimize. A :class:`~optcore.Parameters` arena (float32); or C-contiguous
        ``(param, grad)`` array pairs of any shapes, used in place without copying; or
        torch-style group dicts ``{"params": [(param, grad), ...], "lr": ...}``. Pairs are
        float32, or 16-bit (``ml_dtypes.bfloat16``, ``numpy.float16``): a float32 param takes
        a float32, bfloat16 or float16 grad (master weights fed 16-bit gradients); a 16-bit
        param a grad of its own dtype or float32. The arithmetic is float32 either way
        (16-bit values widened exactly in the update's tile loop). See
        :doc:`/low_precision`.
    groups : list of dict, optional
        With a ``Parameters`` arena only: groups ``{"params": [names], <hyper>: value}``
        overriding the defaults (e.g. no weight decay on biases). Names not listed form a last
        group with the defaults.
    clip : ClipPolicy, optional
        ``optcore.clip.GlobalNorm(max_norm)``, ``PerTensorNorm(max_norm)``, ``Value(limit)``
        or ``Adaptive(clipping, eps)``: clip the gradient inside :meth:`step` (over all groups
        together for ``GlobalNorm``), without rewriting the gradient buffer.
    nonfinite : {"propagate", "skip", "raise"}
        What :meth:`step` does with a gradient holding a NaN or inf: update anyway (torch's
        behaviour), skip the step leaving everything unchanged and count it in
        ``skipped_steps`` (optax's ``apply_if_finite``), or raise FloatingPointError naming
        the first such tensor, leaving everything unchanged.
    accumulate : int
        Gradient accumulation over ``k`` micro-batches (optax ``MultiSteps``, Keras
        ``gradient_accumulation_steps``): the first ``k - 1`` calls of :meth:`step` add the
        gradient into an accumulation buffer; the ``k``-th updates with the mean
        :math:`(\sum_j g_j) / k`, read on the fly.
    constraints : dict, optional
        ``{name: constraint}``: callables applied in place to a parameter after every step,
        e.g. ``{"w1": MaxNorm(3.0)}`` (see :mod:`optcore.constraints`). Names are those of the
        arena, or, for array pairs, the index of the pair counted over all groups.
    state_dtype : {"float32", "bfloat16", "int8"}, optional
        How the state buffers are stored (default float32; :class:`Adam8bit` and
        :class:`AdamW8bit` default to int8): bfloat16 written back with stochastic rounding,
        or the 8-bit block-wise dynamic code of Dettmers et al. (2022) with a float32 absmax
        per block of 256. The arithmetic is float32 either way. See :doc:`/low_precision`.
    min_8bit_size : int
        With ``state_dtype="int8"``, tensors with fewer elements keep float32 state
        (default 4096, as bitsandbytes).
    seed : int
        Seed in ``[0, 2**32)`` of the stochastic rounding (a hash of seed, step and element
        index, so results do not depend on the thread count).
    rounding : {"stochastic", "nearest"}, optional
        How a 16-bit parameter is rounded after the update (ignored for float32 ones):
        stochastically, up with probability equal to the distance to the number below in
        ulps, so that :math:`E[\mathrm{round}(x)] = x` (the default), or to nearest even,
        which loses every update smaller than half an ulp of the weight. With
        ``compensation=True`` the default, and the only choice, is ``"nearest"``.
    compensation : bool
        Keep a Kahan compensation buffer (same dtype and shape) for every 16-bit parameter:
        the parameter is held as :math:`p + c`; after the float32 update :math:`r`,
        :math:`p = \mathrm{rne}(r)` and :math:`c = \mathrm{rne}(r - p)`, so updates below
        half an ulp accumulate in :math:`c` instead of being lost. The buffers are optimizer
        state (``state_dict``, ``state_nbytes``). Needs a 16-bit parameter (ValueError
        otherwise).
    model_copy : list of ndarray or dict, optional
        With float32 parameters (master weights) only: bfloat16 or float16 arrays, one per
        parameter in order over all groups (a dict name -> array for a ``Parameters``
        arena), each of its parameter's shape, C-contiguous, writeable and sharing memory
        with no other buffer. Each step also writes the new parameters, rounded to nearest
        even, into them in the same sweep (the ZeRO-Offload ``adam_update_copy`` pattern).
    **hyper
        The rule's hyper-parameters (same names and defaults as ``torch.optim``), plus ``l1``
        (default 0): the L1 proximal step :math:`p \leftarrow \operatorname{sign}(p)
        \max(|p| - \eta\,\ell_1, 0)` fused into the update (see :mod:`optcore.kernels`).

    Attributes
    ----------
    schedule : callable or None
        A learning-rate schedule (:mod:`optcore.schedules`) attached with ``opt.schedule =
        sched``: each ``step()`` without ``lr=`` then sets every group's ``lr`` to
        ``sched(t)``, ``t`` the number of steps taken, and, for a schedule that cycles the
        momentum (:class:`~optcore.schedules.OneCycle`), each group's ``momentum`` or
        ``betas[0]`` to ``sched.momentum(t)``.

    Notes
    -----
    Arrays are validated once, at construction; afterwards the optimizer reads the gradients
    from and writes the parameters to those same arrays, so the training loop must write
    gradients into them in place. Hyper-parameters in ``param_groups`` may be changed between
    steps (they are validated at every step), except those that decide which state buffers
    exist (``momentum`` zero or not, ``centered``, ``amsgrad``).
    """

    rule = _rules.Rule

    default_state_dtype = "float32"

    def __init__(self, params, groups=None, *, clip=None, nonfinite="propagate", accumulate=1,
                 constraints=None, state_dtype=None, min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0,
                 rounding=None, compensation=False, model_copy=None, **hyper):
        unknown = set(hyper) - set(self.rule.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected hyper-parameters {sorted(unknown)}")
        self.clip, self.nonfinite, self.accumulate = _fused.options(clip, nonfinite, accumulate)
        self.state_dtype, self.min_8bit_size = _lowp.check_state_dtype(
            self.default_state_dtype if state_dtype is None else state_dtype, min_8bit_size)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(ck.in_range("seed", int(seed), 0, 2**32 - 1))
        if self.state_dtype != "float32" and isinstance(clip, _clip.Adaptive):
            raise ValueError("Adaptive clipping needs float32 state (state_dtype='float32')")
        self.skipped_steps = 0
        self._micro = 0
        self.defaults = dict(self.rule.defaults, **hyper)
        self.rule.check(self.defaults)
        self.parameters = params if isinstance(params, Parameters) else None
        specs = self._group_specs(params, groups)
        # the 16-bit arrays, params first: [(label, is_param)]
        half = [(f"group {i} {kind} {n}", kind == "param") for kind in ("param", "grad")
                for i, (_, names, ps, gs) in enumerate(specs)
                for n, a in zip(names, ps if kind == "param" else gs) if a.dtype != np.float32]
        self.rounding, self.compensation = _lowp.check_rounding(
            rounding, compensation, any(is_param for _, is_param in half))
        if half and isinstance(clip, _clip.Adaptive):
            raise ValueError(f"Adaptive clipping needs float32 parameters and gradients; "
                             f"{half[0][0]} is 16-bit")
        copies = self._checked_copies(model_copy, specs)
        seen = {}
        for i, (_, names, ps, gs) in enumerate(specs):
            for n, p, g in zip(names, ps, gs):
                seen[f"group {i} param {n}"] = [p]
                seen[f"group {i} grad {n}"] = [g]
        for label, c in (copies[1] if copies else ()):
            seen[label] = [c]
        ck.no_overlap(seen)
        # zero_grad writes the gradients: remember the first one it may not write
        self._readonly_grad = next(
            (f"group {i} grad {n}" for i, (_, names, _, gs) in enumerate(specs)
             for n, g in zip(names, gs) if not g.flags.writeable), None)
        self.param_groups = []
        self._groups = []
        for gi, (h, names, ps, gs) in enumerate(specs):
            hyper_g = dict(self.defaults, **h)
            self.rule.check(hyper_g)
            self.param_groups.append(dict(hyper_g, params=list(names)))
            self._groups.append(_Group(self.rule, hyper_g, names, ps, gs, self.state_dtype,
                                       self.min_8bit_size, copies[0][gi] if copies else None,
                                       self.compensation))
        for g in self._groups:
            if self.accumulate > 1:
                g.enable_accumulation()
            if isinstance(self.clip, _clip.Adaptive):
                g.enable_units()
        self._constraints = self._checked_constraints(constraints)
        self._schedule = None

    def _group_specs(self, params, groups):
        """Return [(overrides, names, params, grads)] for every group."""
        if isinstance(params, Parameters):
            specs = []
            for i, (h, names) in enumerate(_named_groups(params, groups)):
                self._check_overrides(h, f"groups[{i}]")
                specs.append((h, names, [params[n] for n in names], [params.grads[n] for n in names]))
            return specs
        if groups is not None:
            raise TypeError("groups= is for a Parameters arena; pass group dicts as params instead")
        if isinstance(params, (list, tuple)) and params and all(isinstance(g, dict) for g in params):
            specs = []
            for i, g in enumerate(params):
                if "params" not in g:
                    raise TypeError(f"params[{i}] must have a 'params' list of (param, grad) pairs")
                ps, gs = _pairs(g["params"], f"params[{i}]['params']", half=True)
                h = {k: v for k, v in g.items() if k != "params"}
                self._check_overrides(h, f"params[{i}]")
                specs.append((h, [str(j) for j in range(len(ps))], ps, gs))
            return specs
        ps, gs = _pairs(params, "params", half=True)
        return [({}, [str(j) for j in range(len(ps))], ps, gs)]

    def _checked_copies(self, model_copy, specs):
        """Check ``model_copy`` against the parameters of ``specs``; return None, or
        ``(per-group lists of arrays, [(label, array)])``."""
        if model_copy is None:
            return None
        entries = [(gi, n, p) for gi, (_, names, ps, _) in enumerate(specs)
                   for n, p in zip(names, ps)]
        if self.parameters is not None:
            if not isinstance(model_copy, dict):
                raise TypeError("model_copy must be a dict name -> array for a Parameters "
                                f"arena, got {type(model_copy).__name__}")
            names = [n for _, n, _ in entries]
            if set(model_copy) != set(names):
                missing = sorted(set(names) - set(model_copy), key=names.index)
                unknown = sorted(map(repr, set(model_copy) - set(names)))
                raise ValueError(f"model_copy must name every parameter once: missing {missing}, "
                                 f"unknown {unknown}")
            arrays = [(f"model_copy[{n!r}]", model_copy[n]) for _, n, _ in entries]
        else:
            if not isinstance(model_copy, (list, tuple)):
                raise TypeError("model_copy must be a list of arrays, one per parameter, got "
                                f"{type(model_copy).__name__}")
            if len(model_copy) != len(entries):
                raise ValueError(f"model_copy has {len(model_copy)} arrays but there are "
                                 f"{len(entries)} parameters")
            arrays = [(f"model_copy[{i}]", c) for i, c in enumerate(model_copy)]
        per_group = [[] for _ in specs]
        for (gi, n, p), (label, c) in zip(entries, arrays):
            if p.dtype != np.float32:
                raise ValueError(f"model_copy needs float32 parameters (master weights); "
                                 f"group {gi} param {n} is {p.dtype}")
            ck.float_buffer(label, c, dtypes=ck.HALF_DTYPES)
            if c.shape != p.shape:
                raise ValueError(f"{label} has shape {c.shape} but its parameter has shape "
                                 f"{p.shape}")
            per_group[gi].append(c)
        return per_group, arrays

    def _check_overrides(self, h, where):
        unknown = set(h) - set(self.defaults)
        if unknown:
            raise ValueError(f"{where} has unknown hyper-parameters {sorted(unknown)}")

    def _checked_constraints(self, constraints):
        """Return [(constraint, array)] after checking every name and constraint."""
        if constraints is None:
            return []
        if not isinstance(constraints, dict):
            raise TypeError(f"constraints must be a dict of name -> constraint, got {type(constraints).__name__}")
        if self.parameters is not None:
            arrays = {n: self.parameters[n] for n in self.parameters}
        else:
            arrays = {i: p for i, p in enumerate(p for g in self._groups for p in g.params)}
        out = []
        for name, c in constraints.items():
            if name not in arrays:
                raise ValueError(f"constraints names unknown parameter {name!r}")
            if arrays[name].dtype != np.float32:
                raise ValueError(f"constraints[{name!r}]: constraints need float32 parameters, "
                                 f"this one is {arrays[name].dtype}")
            if not callable(c):
                raise TypeError(f"constraints[{name!r}] must be callable, got {type(c).__name__}")
            if hasattr(c, "check"):
                c.check(arrays[name], f"constraints[{name!r}]")
            out.append((c, arrays[name]))
        return out

    @property
    def schedule(self):
        """The attached learning-rate schedule (``opt.schedule = sched``), or None."""
        return self._schedule

    @schedule.setter
    def schedule(self, sched):
        if sched is not None and not callable(sched):
            raise TypeError(f"schedule must be callable (step -> lr) or None, got {type(sched).__name__}")
        if getattr(sched, "cycles_momentum", False):
            for i, h in enumerate(self.param_groups):
                if "betas" not in h and not h.get("momentum", 0) > 0:
                    raise ValueError(
                        f"the schedule cycles the momentum, but param_groups[{i}] has neither "
                        "betas nor a momentum > 0"
                    )
        self._schedule = sched

    def _scheduled_lr(self):
        """Set the momentum (or beta1) from the attached schedule; return this step's lr."""
        t = self._groups[0].step
        lr = self._schedule(t)
        m = self._schedule.momentum(t) if getattr(self._schedule, "cycles_momentum", False) else None
        if m is not None:
            for h in self.param_groups:
                if "betas" in h:
                    h["betas"] = (m, h["betas"][1])
                else:
                    h["momentum"] = m
        return lr

    # -- the step -------------------------------------------------------------------------

    def _checked_hyper(self, lr):
        hypers = []
        for i, (h, g) in enumerate(zip(self.param_groups, self._groups)):
            h = {k: v for k, v in h.items() if k != "params"}
            if lr is not None:
                h["lr"] = lr
            self.rule.check(h)
            for k, on in g.structure.items():
                if (h[k] != 0) != on:
                    raise ValueError(
                        f"param_groups[{i}]['{k}'] changed whether a state buffer is needed; "
                        "create a new optimizer instead"
                    )
            hypers.append(_rules.plain(h))
        return hypers

    def step(self, lr=None, scaler=None):
        """Apply one update to every parameter group (or one micro-step of accumulation).

        At most two sweeps over memory: a read-only norm pass over the gradient (only when
        clipping by norm, a scaler or a finite check is on), then the fused update, with the
        clip factor, the loss unscaling and the accumulation mean applied on the fly. The
        gradient buffers are never rewritten. ``Adaptive`` clipping reads the weights in one
        more pass (their unit-wise norms).

        Parameters
        ----------
        lr : float, optional
            Learning rate for this step and the following ones (stored in every group), e.g.
            from a schedule: ``opt.step(lr=sched(t))``. When None and a :attr:`schedule` is
            attached, it comes from the schedule.
        scaler : optcore.scaling.GradScaler, optional
            The gradients are those of ``scaler.scale(loss)``: they are unscaled on the fly;
            a NaN or inf skips the step (nothing changes, ``skipped_steps`` counts it)
            whatever ``nonfinite`` says, and the scaler backs off or grows (its ``update``).

        Returns
        -------
        StepResult
            ``grad_norm``, ``clip_factor``, ``skipped``, ``loss_scale``, ``applied``.

        Raises
        ------
        FloatingPointError
            With ``nonfinite="raise"``, naming the first tensor holding a NaN or inf; nothing
            is changed.

        Constraints, if any, are applied after an update (not after a skipped step or an
        accumulation micro-step).
        """
        if lr is None and self._schedule is not None:
            lr = self._scheduled_lr()
        hypers = self._checked_hyper(lr)
        scaler = _scaler_arg(scaler)
        loss_scale = scaler.get_scale() if scaler is not None else None
        k = self.accumulate
        if self._micro < k - 1:
            for g in self._groups:
                _norms.accumulate(g.table, 1, 2, self._micro == 0)
            self._micro += 1
            self._store_lr(hypers)
            return StepResult(None, 1.0, False, loss_scale, False)
        acc_slot = 2 if k > 1 else -1
        mult = 1.0 / k if scaler is None else 1.0 / (k * loss_scale)
        d = _fused.decide(self._groups, self.clip, self.nonfinite, mult, acc_slot=acc_slot,
                          norm_pass=scaler is not None, skip=scaler is not None,
                          name_of=self._tensor_name)
        if d is None:
            self.skipped_steps += 1
            self._micro = 0
            if scaler is not None:
                scaler.update(True)
            return StepResult(None, 1.0, True, loss_scale, False)
        self._update(hypers, d.scale, d.tensor_scale, d.clamp)
        self._micro = 0
        if scaler is not None:
            scaler.update(False)
        return StepResult(d.grad_norm, d.clip_factor, False, loss_scale, True)
    def _update(self, hypers, scale, tensor_scale, clamp):
        """The update half of :meth:`step`: one fused kernel call per group reading the
        gradient as ``clamp(grad * scale * tensor_scale)``, then the learning rates are stored
        and the constraints applied. ``hypers`` come from :meth:`_checked_hyper`;
        ``tensor_scale`` holds one per-tensor factor array (or None) per group."""
        for gi, (h, g, ts) in enumerate(zip(hypers, self._groups, tensor_scale)):
            go = _rules.grad_opts(lr=h["lr"], weight_decay=h["weight_decay"],
                                  decoupled=self.rule.decoupled(h), maximize=h["maximize"],
                                  grad_scale=scale, tensor_scale=ts, clamp=clamp, l1=h["l1"])
            go.set_rounding(self.seed + 0x9E3779B9 * gi, g.step + 1, self.rounding == "stochastic")
            self.rule.run(g.table if g.units is None else g.units, go, h, g.step + 1, g.scalars)
            g.step += 1
        self._store_lr(hypers)
        for c, w in self._constraints:
            c(w)

    def _store_lr(self, hypers):
        for h, pg in zip(hypers, self.param_groups):
            pg["lr"] = h["lr"]

    def _tensor_name(self, i):
        """Name tensor ``i`` counted over all groups (for non-finite errors)."""
        for gi, g in enumerate(self._groups):
            if i < len(g.names):
                return f"param_groups[{gi}] tensor {g.names[i]!r}"
            i -= len(g.names)
        raise IndexError(i)

    def zero_grad(self):
        """Set every gradient of every group to zero.

        Raises ValueError, writing nothing, when a gradient array was read-only at
        construction (the optimizer itself only reads gradients).
        """
        if self._readonly_grad is not None:
            raise ValueError(f"zero_grad: {self._readonly_grad} is read-only; zero it yourself")
        if self.parameters is not None:
            self.parameters.zero_grad()
            return
        for g in self._groups:
            _optim.fill(g.table, 1, 0.0)

    # -- state ----------------------------------------------------------------------------

    def state_of(self, name, group=None):
        """Return the state views (``{"exp_avg": ndarray, ...}``) of one parameter.

        ``name`` is a parameter name of the arena, or, for array pairs, the index of the pair
        within its group (``group`` then selects the group, default 0). With low-precision
        state (``state_dtype`` other than float32) the arrays are float32 copies of the
        decoded state, not views.
        """
        key = str(name)
        for i, g in enumerate(self._groups):
            if (group is None or group == i) and key in g.layout.names:
                return {s: g.state_view(s, key) for s in g.state}
        raise KeyError(f"no parameter {name!r} in this optimizer")

    @property
    def state_steps(self):
        """The number of steps applied to each group."""
        return [g.step for g in self._groups]

    @property
    def state_nbytes(self):
        """Bytes of optimizer state held (state buffers, with 8-bit scales)."""
        return sum(g.state_nbytes for g in self._groups)

    @property
    def state_bytes_per_param(self):
        """:attr:`state_nbytes` per parameter element (float32 Adam: 8; 8-bit Adam: ~2)."""
        n = sum(a.size for g in self._groups for a in g.params)
        return self.state_nbytes / n if n else 0.0

    def state_dict(self):
        """Return the optimizer state as a flat dict of NumPy arrays and numbers.

        It round-trips through ``np.savez`` / ``np.load`` without pickle::

            np.savez("opt.npz", **opt.state_dict())
            opt.load_state_dict(np.load("opt.npz"))
        """
        out = {"optimizer": np.array(self.rule.name), "groups": len(self._groups)}
        if self.state_dtype != "float32":
            out["state_dtype"] = np.array(self.state_dtype)
        for i, (g, pg) in enumerate(zip(self._groups, self.param_groups)):
            p = f"group{i}."
            out[p + "names"] = np.array(g.names, dtype=str)
            out[p + "sizes"] = np.array([a.size for a in g.params], dtype=np.int64)
            out[p + "step"] = g.step
            for k, v in pg.items():
                if k != "params":
                    out[p + "hyper." + k] = np.asarray(v)
            for s, buf in g.state.items():
                if self.state_dtype == "float32":
                    out[p + "state." + s] = buf.flat.copy()
                else:
                    out.update(buf.export(p + "state." + s))
            for s, v in g.scalars.items():
                out[p + "scalar." + s] = v
            if g.comp is not None:
                out.update(g.comp.export(p + "compensation"))
        out.update(self._fused_state())
        return out

    def _fused_state(self):
        """``skipped_steps`` and a partial accumulation window (count and accumulators)."""
        out = {"skipped_steps": self.skipped_steps}
        if self.accumulate > 1:
            out["accumulate.micro"] = self._micro
            if self._micro > 0:
                for i, g in enumerate(self._groups):
                    out[f"group{i}.accumulator"] = g.acc.flat.copy()
        return out

    def _check_fused_state(self, state):
        """Validate what :meth:`_fused_state` saved; return (skipped_steps, micro, arrays)."""
        skipped = ck.in_range("skipped_steps", np.asarray(state.get("skipped_steps", 0)).item(), 0)
        micro = np.asarray(state.get("accumulate.micro", 0)).item()
        ck.in_range("accumulate.micro", micro, 0, self.accumulate - 1)
        arrays = []
        if micro > 0:
            for i, g in enumerate(self._groups):
                a = state.get(f"group{i}.accumulator")
                a = None if a is None else np.asarray(a)
                if a is None or a.shape != g.acc.flat.shape or a.dtype != np.float32:
                    raise ValueError(
                        f"group{i}.accumulator must be float32 of shape {g.acc.flat.shape} "
                        "when accumulate.micro > 0"
                    )
                arrays.append(a)
        return int(skipped), int(micro), arrays

    def load_state_dict(self, state):
        """Load a state saved by :meth:`state_dict`; everything is checked before anything is
        written."""
        name = str(np.asarray(state.get("optimizer", "")))
        if name != self.rule.name:
            raise ValueError(f"state is for optimizer {name!r}, this is {self.rule.name!r}")
        if int(np.asarray(state.get("groups", -1))) != len(self._groups):
            raise ValueError(f"state has {state.get('groups')} groups, this optimizer has {len(self._groups)}")
        plans = []
        for i, g in enumerate(self._groups):
            p = f"group{i}."
            names = [str(n) for n in np.asarray(state.get(p + "names", ())).reshape(-1)]
            if names != g.names:
                raise ValueError(f"{p}names is {names}, expected {g.names}")
            sizes = np.asarray(state.get(p + "sizes", ())).reshape(-1)
            if sizes.tolist() != [a.size for a in g.params]:
                raise ValueError(f"{p}sizes is {sizes.tolist()}, expected {[a.size for a in g.params]}")
            hyper = {}
            for k, default in self.rule.defaults.items():
                v = state.get(p + "hyper." + k)
                if v is None:
                    raise ValueError(f"state lacks {p}hyper.{k}")
                v = np.asarray(v)
                hyper[k] = tuple(float(x) for x in v) if isinstance(default, tuple) else v.item()
            self.rule.check(hyper)
            for k, on in g.structure.items():
                if (hyper[k] != 0) != on:
                    raise ValueError(f"{p}hyper.{k} needs other state buffers than this optimizer has")
            arrays = {s: self._state_loader(g, p + "state." + s, state) for s in g.state}
            if g.comp is not None:
                arrays["compensation"] = g.comp.loader(p + "compensation", state)
            elif p + "compensation" in state:
                raise ValueError(f"state has {p}compensation but this optimizer has "
                                 "compensation=False")
            step = np.asarray(state.get(p + "step", -1))
            if step.shape != () or not np.issubdtype(step.dtype, np.integer) or step < 0:
                raise ValueError(f"{p}step must be an integer >= 0, got {step!r}")
            scalars = {}
            for s in self.rule.scalar_names if step > 0 else ():
                v = state.get(p + "scalar." + s)
                if v is None:
                    raise ValueError(f"state lacks {p}scalar.{s}")
                scalars[s] = ck.in_range(f"{p}scalar.{s}", np.asarray(v).item(), 0.0, 1.0)
            plans.append((g, hyper, arrays, int(step), scalars))
        self.skipped_steps, self._micro, accs = self._check_fused_state(state)
        for g, a in zip(self._groups, accs):
            g.acc.flat[...] = a
        for (g, hyper, arrays, step, scalars), pg in zip(plans, self.param_groups):
            pg.update(hyper)
            for load in arrays.values():
                load()
            g.step = step
            g.scalars = scalars

    def _state_loader(self, g, key, state):
        """Check state buffer ``key`` of ``state`` (saved in any format) for group ``g``;
        return a function writing it into ``g``, converting between formats (quantized or
        dequantized through float32) when the saved one differs."""
        sizes = [x.size for x in g.params]
        buf = g.state[key.rsplit("state.", 1)[1]]
        if (key + ".formats") in state:
            saved = _lowp.StateBuffer.read(sizes, key, state)
            if self.state_dtype != "float32":
                return lambda: buf.assign(saved)
            return lambda: [buf[n].__setitem__(Ellipsis, saved.get(i).reshape(buf[n].shape))
                            for i, n in enumerate(g.names)]
        a = state.get(key)
        if a is None:
            raise ValueError(f"state lacks {key}")
        a = np.asarray(a)
        if a.dtype != np.float32:
            raise TypeError(f"{key} must have dtype float32, got {a.dtype}")
        if a.shape != (g.layout.total,):
            raise ValueError(f"{key} must have shape {(g.layout.total,)}, got {a.shape}")
        if self.state_dtype != "float32":
            return lambda: [buf.set(i, g.layout.view(a, n)) for i, n in enumerate(g.names)]
        return lambda: buf.flat.__setitem__(Ellipsis, a)

    def __repr__(self):
        groups = ", ".join(f"group {i}: {len(g.params)} tensors" for i, g in enumerate(self._groups))
        return f"{type(self).__name__}({groups})"


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum (and Nesterov momentum).

    ``SGD(params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
    maximize=False)``; the update is :func:`optcore.kernels.sgd_`. Same names and defaults as
    ``torch.optim.SGD``.
    """

    rule = _rules.SGDRule


class AdaGrad(Optimizer):
    r"""AdaGrad.

    ``AdaGrad(params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
    eps=1e-10, maximize=False)``; the update is :func:`optcore.kernels.adagrad_`. Same names
    and defaults as ``torch.optim.Adagrad``.
    """

    rule = _rules.AdaGradRule


class RMSProp(Optimizer):
    r"""RMSProp (optionally centered, with momentum).

    ``RMSProp(params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
    centered=False, maximize=False)``; the update is :func:`optcore.kernels.rmsprop_`. Same
    names and defaults as ``torch.optim.RMSprop``.
    """

    rule = _rules.RMSPropRule


class Adam(Optimizer):
    r"""Adam (and AMSGrad).

    ``Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
    maximize=False, decoupled_weight_decay=False)``; the update is
    :func:`optcore.kernels.adam_`. Same names and defaults as ``torch.optim.Adam``.
    """

    rule = _rules.AdamRule


class AdamW(Optimizer):
    r"""Adam with decoupled weight decay.

    ``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
    maximize=False)``: before the Adam update, :math:`p \leftarrow (1 - \eta\lambda) p`. Same
    names and defaults as ``torch.optim.AdamW``.
    """

    rule = _rules.AdamWRule


class AdaMax(Optimizer):
    r"""AdaMax (Adam with the infinity norm).

    ``AdaMax(params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    maximize=False)``; the update is :func:`optcore.kernels.adamax_`. Same names and defaults
    as ``torch.optim.Adamax``.
    """

    rule = _rules.AdaMaxRule


class NAdam(Optimizer):
    r"""NAdam (Adam with Nesterov momentum and a momentum schedule).

    ``NAdam(params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False)``; the update is
    :func:`optcore.kernels.nadam_`. Same names and defaults as ``torch.optim.NAdam``.
    """

    rule = _rules.NAdamRule


class Adam8bit(Adam):
    r"""Adam with 8-bit block-wise quantized state (Dettmers et al. 2022).

    :class:`Adam` with ``state_dtype="int8"`` by default: ``exp_avg`` and ``exp_avg_sq`` are
    stored as one byte per element (the signed and unsigned dynamic codes) and a float32
    absmax per block of 256 elements, about 2 bytes of state per parameter instead of 8;
    tensors below ``min_8bit_size`` (4096) elements keep float32 state. The names of
    bitsandbytes' ``bnb.optim.Adam8bit``. See :doc:`/low_precision`.
    """

    default_state_dtype = "int8"


class AdamW8bit(AdamW):
    r"""AdamW with 8-bit block-wise quantized state: :class:`AdamW` with
    ``state_dtype="int8"`` by default (see :class:`Adam8bit`)."""

    default_state_dtype = "int8"


# torch.optim spellings
Adagrad = AdaGrad
RMSprop = RMSProp
Adamax = AdaMax
