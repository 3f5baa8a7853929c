r"""Drop-in replacements of ``torch.optim.SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, NAdam``.

Each class is a :class:`torch.optim.Optimizer` with torch's name, constructor signature,
defaults, ``param_groups`` and state (``opt.state[p]`` holds torch tensors under torch's
keys, so ``state_dict()`` / ``load_state_dict()`` interchange with ``torch.optim`` in both
directions). ``step()`` runs optcore's fused kernels on the tensors' own memory: one kernel
call per parameter group (per distinct step count within a group, usually one), no copies.

Two keyword-only arguments are added to torch's signatures:

``clip``
    An :mod:`optcore.clip` policy (``GlobalNorm``, ``PerTensorNorm``, ``Value``,
    ``Adaptive``) applied to the gradient inside the step, without rewriting ``p.grad``;
    ``GlobalNorm(max_norm)`` equals ``torch.nn.utils.clip_grad_norm_(params, max_norm)``
    followed by the step (over all groups together).
``nonfinite``
    ``"propagate"`` (torch's behaviour), ``"skip"`` (a NaN or inf gradient skips the step:
    nothing changes) or ``"raise"`` (FloatingPointError naming the tensor, nothing changes).

Low precision (see :doc:`/low_precision`), six more keyword-only arguments:

``state_dtype``
    ``"float32"``, ``"bfloat16"`` or ``"int8"``: how the state buffers are stored, under
    torch's keys in ``opt.state[p]``: float32 or ``torch.bfloat16`` tensors, or for 8-bit
    ``torch.uint8`` codes with a float32 ``<key>_absmax`` tensor of ``ceil(n / 256)`` block
    scales (blocks over the parameter's memory order; tensors below ``min_8bit_size``, default
    4096, keep float32 state). Default None: bfloat16 state for bfloat16 parameters (torch's
    own state dtype there), float32 otherwise (also for float16 parameters, whose moments
    would underflow in float16; torch keeps them in float16). :class:`Adam8bit` and
    :class:`AdamW8bit` default to ``"int8"``.
``rounding``
    How a bfloat16 or float16 parameter is written back: ``"stochastic"`` (the default,
    unbiased: an update far below half an ulp still moves the weight on average; torch rounds
    to nearest) or ``"nearest"``.
``compensation``
    True: a Kahan buffer ``kahan_comp`` (the parameter's dtype, in the state as torch-optimi
    keeps it) carries each bfloat16 or float16 parameter's rounding error to the next step
    (the parameter is then rounded to nearest; ValueError when every parameter is float32).
``model_copy``
    Master weights: the parameters are float32 (with float32 or low-precision state) and
    ``model_copy`` is a sequence of bfloat16/float16 tensors, one per parameter in
    ``param_groups`` order, with the parameters' shapes and strides: the model that runs
    forward and backward. The step reads the gradient from each copy's ``.grad`` (a master
    with a ``.grad`` of its own raises ValueError) and writes the updated master, rounded to
    nearest, into the copy in the same sweep (DeepSpeed's ``adam_update_copy`` pattern);
    ``zero_grad()`` resets the copies' gradients. ``add_param_group`` is refused.
``seed``
    Seed of the stochastic rounding (state and parameters): a hash of (seed, step, element
    index), so the bits do not depend on the thread count.

A bfloat16 or float16 parameter's gradient has its dtype (torch guarantees it); the kernels
read both converted in the tile and compute in float32. ``load_state_dict`` stores every
state buffer in this optimizer's format (quantizing, rounding or dequantizing through the
kernels' own conversions), so states move between ``torch.optim``, 8-bit, bfloat16 and float32
optcore optimizers in every direction.

After every ``step()``, ``opt.last_result`` is the :class:`~optcore.optim.StepResult` of that
step (``grad_norm``, ``clip_factor``, ``skipped``, ``loss_scale``, ``applied``).

Mixed precision: ``_step_supports_amp_scaling`` is True, so ``torch.amp.GradScaler`` hands the
optimizer its scale and overflow flag (``grad_scale``, ``found_inf``) instead of unscaling the
gradients itself; the step unscales on the fly and skips when ``found_inf`` is set, as torch's
fused optimizers do.

Accepted tensors: float32, bfloat16 or float16, CPU, dense (contiguous, channels_last or any
permutation of the dimensions), parameters not sharing memory; a gradient must have its parameter's strides and
be dense. Anything else raises TypeError/ValueError naming the group and parameter index
before anything of the step is written. ``capturable=True`` and ``differentiable=True`` are
refused; ``foreach`` and ``fused`` are accepted and ignored (optcore is always one fused
call).

The kernel tables are cached between steps and rebuilt when a parameter's storage, the set
of parameters with a gradient or a parameter's state dict changes (``load_state_dict``,
``opt.state[p] = {...}`` as ``ZeroRedundancyOptimizer`` does, or a new ``opt.state``).
Replacing one tensor inside a state dict (``opt.state[p]["exp_avg"] = t``) is not seen:
assign the whole dict instead. Per-parameter ``step`` (and NAdam's ``mu_product``) tensors
are 0-d views of one float32 buffer per group, so that one write per step updates them all.
"""
import operator
import sys
from collections import defaultdict

import numpy as np
import torch

from optcore import _checks as ck
from optcore import _fused, _lowp, _rules
from optcore import clip as _clip
from optcore.optim import StepResult
from optcore.torch import _lowp as lp
from optcore.torch import _tensors as tt
from optcore.torch._plan import KAHAN, Plan, param_name

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "Adam8bit",
           "AdamW8bit"]

# the per-group offset of the rounding seed (the NumPy optimizers' own)
_GROUP_SEED = 0x9E3779B9

_grad = operator.attrgetter("grad")
_increment_version = torch._C._increment_version


class _State(defaultdict):
    """``opt.state``: torch's ``defaultdict(dict)`` that counts how often a parameter's state
    dict is set or removed (``load_state_dict``, ``ZeroRedundancyOptimizer.load_state_dict``
    assigns ``optim.state[p]``), so that the cached kernel tables notice new state tensors."""

    def __init__(self, default_factory=dict, *args):
        super().__init__(default_factory, *args)
        self.version = 0

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def _changed(name):
        def method(self, *args, **kwargs):
            self.version += 1
            return getattr(defaultdict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    pop = _changed("pop")
    popitem = _changed("popitem")
    clear = _changed("clear")
    update = _changed("update")
    setdefault = _changed("setdefault")
    del _changed


def _built_by_zero_redundancy_optimizer():
    """Whether the caller (a few frames up) is a ``ZeroRedundancyOptimizer`` building its
    local optimizer over one rank's shard of the parameters."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # torch built without distributed support
        return False
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def _refuse_sharded_global_decisions(clip, nonfinite):
    """Under ZeroRedundancyOptimizer each rank's optimizer holds a shard of the parameters,
    so a decision over all tensors (the global norm, skipping a step with a non-finite
    gradient) would be taken per shard and differ between ranks: refuse it rather than
    compute something else silently."""
    global_decision = isinstance(clip, _clip.GlobalNorm) or nonfinite == "skip"
    if global_decision and _built_by_zero_redundancy_optimizer():
        raise ValueError(
            "clip=GlobalNorm and nonfinite='skip' decide over all parameters, but under "
            "ZeroRedundancyOptimizer each rank's optimizer holds only its shard; call "
            "optcore.torch.clip_grad_norm_(model.parameters(), max_norm) before opt.step() "
            "instead (exact: every rank holds the whole averaged gradient)"
        )


class _Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is one of optcore's update rules."""

    rule = _rules.Rule
    _step_supports_amp_scaling = True
    # torch's per-parameter scalar state, in part-key order
    _scalar_keys = ("step",)
    # state buffers created on first use even when the parameter already has state
    _lazy_state = ()
    # state_dtype=None: follow the parameter (bfloat16 state for bfloat16 parameters)
    _default_state_dtype = None

    def __init__(self, params, defaults, clip, nonfinite, lowp, model_copy=None):
        self.clip, self.nonfinite, _ = _fused.options(clip, nonfinite)
        _refuse_sharded_global_decisions(self.clip, self.nonfinite)
        self._set_lowp(**lowp)
        if self.state_dtype not in (None, "float32") and isinstance(self.clip, _clip.Adaptive):
            raise ValueError("Adaptive clipping needs float32 state (state_dtype='float32')")
        self._sr_steps = 0
        self._unit_tables = isinstance(self.clip, _clip.Adaptive)
        self._plans = []
        self.last_result = None
        self.skipped_steps = 0
        self._checked_hyper(defaults, "the defaults")
        self._copies = None
        super().__init__(params, defaults)
        self.state = _State(dict, self.state)
        self._state_version = None
        any_half = any(p.dtype in lp.HALF_DTYPES for g in self.param_groups for p in g["params"])
        self.rounding, self.compensation = _lowp.check_rounding(self.rounding, self.compensation,
                                                                any_half)
        if model_copy is not None:
            self._copies = self._checked_copies(model_copy)

    def _set_lowp(self, state_dtype, min_8bit_size, seed, rounding, compensation):
        """Validate and store the low-precision options (see :mod:`optcore.torch.optim`)."""
        if state_dtype is None:
            state_dtype = self._default_state_dtype
        if state_dtype is not None:
            state_dtype, _ = _lowp.check_state_dtype(state_dtype, 1)
        self.min_8bit_size = ck.positive_int("min_8bit_size", min_8bit_size)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(ck.in_range("seed", int(seed), 0, 2**32 - 1))
        self.state_dtype = state_dtype
        self.rounding, self.compensation = rounding, compensation

    def _checked_copies(self, model_copy):
        """``model_copy`` as one list of 16-bit tensors per group, checked against the float32
        master parameters (same shape and strides, no shared memory, masters without .grad)."""
        if isinstance(model_copy, torch.Tensor) or not hasattr(model_copy, "__iter__"):
            raise TypeError("model_copy must be a sequence of tensors, one per parameter")
        copies = list(model_copy)
        masters = [p for g in self.param_groups for p in g["params"]]
        if len(copies) != len(masters):
            raise ValueError(f"model_copy has {len(copies)} tensors for {len(masters)} parameters")
        names, tensors, out, k = [], [], [], 0
        for gi, g in enumerate(self.param_groups):
            out.append(copies[k: k + len(g["params"])])
            for j, (p, c) in enumerate(zip(g["params"], out[-1])):
                name = param_name(gi, j)
                tt.check_tensor(f"model copy of {name}", c, dtypes=lp.HALF_DTYPES)
                if p.dtype != torch.float32:
                    raise TypeError(f"{name} is {p.dtype}: with model_copy the parameters are "
                                    "the float32 master weights")
                tt.same_layout(f"model copy of {name}", c, name, p)
                if p.grad is not None:
                    raise ValueError(f"{name} has its own .grad: with model_copy the gradient "
                                     "is read from the model copy's .grad")
                names += [name, f"model copy of {name}"]
                tensors += [p, c]
            k += len(g["params"])
        tt.no_overlap(names, tensors)
        return out

    # -- torch.optim.Optimizer plumbing ---------------------------------------------------

    _LOWP_DEFAULTS = dict(state_dtype=None, min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0,
                          rounding="stochastic", compensation=False, _sr_steps=0,
                          _copies=None)

    def __getstate__(self):
        state = super().__getstate__()
        state.update(clip=self.clip, nonfinite=self.nonfinite, skipped_steps=self.skipped_steps,
                     last_result=self.last_result)
        state.update({k: getattr(self, k) for k in self._LOWP_DEFAULTS})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self._torch_defaults.items():
                group.setdefault(k, v)
        self.__dict__.setdefault("clip", None)
        self.__dict__.setdefault("nonfinite", "propagate")
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("last_result", None)
        for k, v in self._LOWP_DEFAULTS.items():
            self.__dict__.setdefault(k, v)
        self._unit_tables = isinstance(self.clip, _clip.Adaptive)
        # new state tensors (load_state_dict): every table is rebuilt at the next step
        self.state = _State(dict, self.state)
        self._state_version = None
        self._plans = [None] * len(self.param_groups)

    def add_param_group(self, param_group):
        """Add a parameter group, as :meth:`torch.optim.Optimizer.add_param_group`; its tensors
        are checked (float32, CPU, dense, not sharing memory with any other parameter)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if self._copies is not None:
            raise ValueError("model_copy pairs the parameters given at construction with their "
                             "copies; add_param_group is not supported with model_copy")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        params = list(params)
        gi = len(self.param_groups)
        for j, p in enumerate(params):
            if not isinstance(p, torch.Tensor):  # torch accepts (name, tensor) pairs
                p = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            tt.check_tensor(param_name(gi, j), p, dtypes=tuple(lp.PARAM_KINDS))
            if torch.is_complex(p):
                raise TypeError(f"{param_name(gi, j)} is complex; optcore updates real tensors")
        hyper = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        self._checked_hyper(hyper, f"param_groups[{gi}]")
        super().add_param_group(dict(param_group, params=params))
        names, tensors = [], []
        for i, g in enumerate(self.param_groups):
            for j, p in enumerate(g["params"]):
                names.append(param_name(i, j))
                tensors.append(p)
        try:
            tt.no_overlap(names, tensors)
        except ValueError:
            self.param_groups.pop()
            raise
        self._plans.append(None)
        self._init_state(self.param_groups[-1])

    def _init_state(self, group):
        """State a rule creates at construction (Adagrad); none by default."""

    def zero_grad(self, set_to_none=True):
        """:meth:`torch.optim.Optimizer.zero_grad`; with ``model_copy`` it resets the model
        copies' gradients (those the step reads) too."""
        super().zero_grad(set_to_none)
        for c in () if self._copies is None else (c for cs in self._copies for c in cs):
            if c.grad is not None:
                if set_to_none:
                    c.grad = None
                else:
                    c.grad.zero_()

    def load_state_dict(self, state_dict):
        """Load a state saved by this class or by ``torch.optim`` (as
        :meth:`torch.optim.Optimizer.load_state_dict`), then store every state buffer in this
        optimizer's format: float32 state is quantized (8-bit) or rounded to nearest
        (bfloat16), low-precision state is dequantized, through the kernels' own conversions.
        torch would cast each state tensor to its parameter's dtype; the saved tensors are
        taken as they were instead (8-bit codes and scales are not floating-point values)."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        where = [(gi, j, p) for gi, g in enumerate(self.param_groups)
                 for j, p in enumerate(g["params"])]
        # check every saved state buffer before anything is loaded
        loaded = [(gi, j, p, saved[k]) for k, (gi, j, p) in zip(ids, where) if k in saved]
        for gi, j, p, st in loaded:
            for s in self._buffer_keys(st):
                name = f"state {s!r} of {param_name(gi, j)}"
                t = tt.check_tensor(name, st[s], dtypes=lp.STATE_DTYPES)
                if t.shape != p.shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                if lp.stored_kind(s, t) in lp.Q8:
                    lp.check_absmax(name, st, s, p)
        super().load_state_dict(state_dict)
        for gi, j, p, saved_st in loaded:
            st = {key: (v.to(device=p.device) if isinstance(v, torch.Tensor)
                        and key not in self._scalar_keys else self.state[p][key])
                  for key, v in saved_st.items()}
            for s in self._buffer_keys(st):
                kind = self._state_kinds([p], s)[0]
                if lp.stored_kind(s, st[s]) != kind or st[s].stride() != p.stride():
                    lp.convert(st, s, p, kind)
            if st.get(KAHAN) is not None:
                st[KAHAN] = st[KAHAN].to(dtype=p.dtype)
            self.state[p] = st

    def _buffer_keys(self, st):
        """The keys of the state buffers (parameter-shaped, in a state format) of ``st``."""
        return [k for k, v in st.items() if isinstance(v, torch.Tensor) and k != KAHAN
                and k not in self._scalar_keys and not k.endswith(lp.ABSMAX)]

    @property
    def state_nbytes(self):
        """Bytes of the per-parameter state tensors held (state buffers, 8-bit scales, Kahan
        buffers; not the 0-d ``step`` scalars)."""
        return sum(v.numel() * v.element_size() for st in self.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor) and v.dim())

    @property
    def state_bytes_per_param(self):
        """:attr:`state_nbytes` per parameter element (float32 Adam: 8; bfloat16 state: 4;
        8-bit Adam: 2 + 8/256)."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        return self.state_nbytes / n if n else 0.0

    # -- hyper-parameters -----------------------------------------------------------------

    def _checked_hyper(self, group, where):
        """The rule's hyper-parameters of ``group`` as plain floats/bools, checked."""
        for k in ("capturable", "differentiable"):
            if group.get(k):
                raise ValueError(f"{where}: {k}=True is not supported by optcore (CPU kernels "
                                 "outside autograd); use torch.optim for it")
        h = {}
        for k in self.rule.defaults:
            v = group[k] if k != "l1" else 0.0
            if k == "lr" and isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"{where}: a Tensor lr must have one element")
                v = v.item()
            elif k == "betas" and isinstance(v, (tuple, list)):
                v = tuple(x.item() if isinstance(x, torch.Tensor) else x for x in v)
            h[k] = v
        try:
            self.rule.check(h)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        return _rules.plain(h)

    # -- per-rule hooks -------------------------------------------------------------------

    def _keeps_state(self, state_names):
        return True

    def _state_kinds(self, params, s):
        """The kernel format of state buffer ``s`` of each of ``params`` (uint8 array)."""
        return lp.state_kinds(self.state_dtype, params, s, self.min_8bit_size)

    def _state_entries(self, p, s, value):
        """State buffer ``s`` of parameter ``p`` filled with ``value``, in its format."""
        return lp.filled(p, self._state_kinds([p], s)[0], value, s)

    def _new_state(self, p, group, state_names):
        """torch's initial state of parameter ``p`` (its lazy ``len(state) == 0`` branch)."""
        st = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for s in state_names:
            if s is not None:
                st.update(self._state_entries(p, s, 0.0))
        return st

    def _part_key(self, st):
        return (float(st["step"]),)

    def _step_args(self, key):
        """The 1-based step number and the rule's scalar state for a part with ``key``."""
        return key[0] + 1.0, {}

    def _next_key(self, key, scalars):
        return (key[0] + 1.0,)

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the model and returns the
        loss, run with gradients enabled, as torch). Returns the closure's loss or None; the
        :class:`~optcore.optim.StepResult` is at :attr:`last_result`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # validate everything before writing anything
        if type(self.state) is not _State:  # opt.state was replaced as a whole
            self.state = _State(dict, self.state)
        if self.state.version != self._state_version:  # a parameter's state was replaced
            self._plans = [None] * len(self.param_groups)
        work = []
        for gi, group in enumerate(self.param_groups):
            h = self._checked_hyper(group, f"param_groups[{gi}]")
            names = [s for s in self.rule.state_names(h)]
            copies = None if self._copies is None else self._copies[gi]
            if copies is not None:
                for j, p in enumerate(group["params"]):
                    if p.grad is not None:
                        raise ValueError(f"{param_name(gi, j)} has its own .grad: with "
                                         "model_copy the gradient is read from the model "
                                         "copy's .grad")
            grads = list(map(_grad, group["params"] if copies is None else copies))
            plan = self._plans[gi]
            pending = None
            if plan is not None:
                pending = plan.refresh(grads) if plan.current(group, grads, names) else False
            if plan is None or pending is False:
                plan = Plan(self, gi, group, grads, names, copies)
                pending = None
            work.append((plan, pending, h))
        for gi, (plan, pending, _) in enumerate(work):
            if not plan.committed:
                plan.commit(self, self.param_groups[gi])
                self._plans[gi] = plan
            else:
                plan.set_grads(pending)
        self._state_version = self.state.version
        try:
            self.last_result = self._update(work, grad_scale, found_inf)
        finally:
            for plan, _, _ in work:
                plan.release()
        return loss

    def _update(self, work, grad_scale, found_inf):
        """Everything of the step after validation: the scaler's skip, the norm pass and
        clipping decision, one kernel call per part; returns the StepResult."""
        loss_scale = None if grad_scale is None else float(grad_scale)
        if found_inf is not None and float(found_inf) != 0.0:
            return self._skipped(loss_scale)
        parts = [part for plan, _, _ in work for part in plan.parts]
        if not parts:
            return StepResult(None, 1.0, False, loss_scale, False)
        mult = 1.0 if grad_scale is None else 1.0 / loss_scale
        d = _fused.decide(parts, self.clip, self.nonfinite, mult,
                          name_of=lambda i: self._tensor_name(work, i))
        if d is None:
            return self._skipped(loss_scale)
        k = 0
        for plan, _, h in work:
            decoupled = self.rule.decoupled(h)
            for part in plan.parts:
                go = _rules.grad_opts(lr=h["lr"], weight_decay=h["weight_decay"],
                                      decoupled=decoupled, maximize=h["maximize"],
                                      grad_scale=d.scale, tensor_scale=d.tensor_scale[k],
                                      clamp=d.clamp)
                step, scalars = self._step_args(part.key)
                sr_step = int(part.key[0]) + 1 if "step" in self._scalar_keys else self._sr_steps + 1
                go.set_rounding(self.seed + _GROUP_SEED * plan.gi, sr_step,
                                self.rounding == "stochastic")
                self.rule.run(part.table if part.units is None else part.units, go, h, step,
                              scalars)
                part.next_key = self._next_key(part.key, scalars)
                k += 1
            plan.advance(self)
            _increment_version(plan.params)
            if plan.copies is not None:
                _increment_version(plan.copies)
        self._sr_steps += 1
        return StepResult(d.grad_norm, d.clip_factor, False, loss_scale, True)

    def _skipped(self, loss_scale):
        self.skipped_steps += 1
        return StepResult(None, 1.0, True, loss_scale, False)
    @staticmethod
    def _tensor_name(work, i):
        for plan, _, _ in work:
            for part in plan.parts:
                rows = range(part.table.ntensors) if part.rows is None else part.rows
                if i < len(rows):
                    return param_name(plan.gi, plan.js[rows[i]])
                i -= len(rows)
        raise IndexError(i)


class SGD(_Optimizer):
    r"""Stochastic gradient descent with momentum, a drop-in for ``torch.optim.SGD``.

    .. math::

        g \leftarrow \pm\nabla + \lambda\theta, \quad
        b \leftarrow \mu b + (1-\tau) g \ (b \leftarrow g \text{ at the first step}), \quad
        \theta \leftarrow \theta - \gamma\,(g + \mu b \text{ if nesterov else } b)

    (``b`` only when ``momentum != 0``). Same signature, defaults, ``param_groups`` and state
    (``momentum_buffer``; no state at all when ``momentum == 0``) as ``torch.optim.SGD``, plus
    the keyword-only ``clip`` and ``nonfinite`` (see :mod:`optcore.torch.optim`). Switching
    ``momentum`` on mid-training starts the buffers as torch does.
    """

    rule = _rules.SGDRule
    _scalar_keys = ()
    _lazy_state = ("momentum_buffer",)
    _torch_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False,
                           fused=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None, clip=None,
                 nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)

    def _keeps_state(self, state_names):
        return bool(state_names) or self.compensation

    def _new_state(self, p, group, state_names):
        return {}

    def _part_key(self, st):
        return (st.get("momentum_buffer") is None,)

    def _step_args(self, key):
        return (1 if key[0] else 2), {}

    def _next_key(self, key, scalars):
        return (False,)


class Adagrad(_Optimizer):
    r"""Adagrad, a drop-in for ``torch.optim.Adagrad``.

    .. math::

        \tilde\gamma = \frac{\gamma}{1 + (t-1)\,\eta}, \quad
        g \leftarrow \pm\nabla + \lambda\theta, \quad s \leftarrow s + g^2, \quad
        \theta \leftarrow \theta - \tilde\gamma\,\frac{g}{\sqrt{s} + \epsilon}

    with ``t`` the parameter's own step count and ``eta = lr_decay``. State ``step`` (0-d
    float32 tensor) and ``sum``, created at construction with ``initial_accumulator_value``
    as torch does (also for groups added later). Plus ``clip`` and ``nonfinite``.
    """

    rule = _rules.AdaGradRule
    _torch_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None)

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 clip=None, nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)

    def _new_state(self, p, group, state_names):
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                **self._state_entries(p, "sum", group["initial_accumulator_value"])}

    def _init_state(self, group):
        for p in group["params"]:
            if not self.state.get(p):
                self.state[p].update(self._new_state(p, group, ()))


class RMSprop(_Optimizer):
    r"""RMSprop (optionally centered, with momentum), a drop-in for ``torch.optim.RMSprop``.

    .. math::

        g \leftarrow \pm\nabla + \lambda\theta, \quad v \leftarrow \alpha v + (1-\alpha) g^2,
        \quad \bar g \leftarrow \alpha \bar g + (1-\alpha) g \ \text{(centered)}, \quad
        d = \sqrt{v - \bar g^2} + \epsilon \ \text{(centered) else } \sqrt{v} + \epsilon,

    then :math:`b \leftarrow \mu b + g/d,\ \theta \leftarrow \theta - \gamma b` when
    ``momentum > 0``, else :math:`\theta \leftarrow \theta - \gamma g/d`. State ``step``,
    ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered), as torch.
    Switching ``momentum`` or ``centered`` on after the first step raises ValueError (torch
    fails with a KeyError there). Plus ``clip`` and ``nonfinite``.
    """

    rule = _rules.RMSPropRule
    _torch_defaults = dict(momentum=0, centered=False, foreach=None, maximize=False,
                           differentiable=False, capturable=False)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, clip=None, nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)


class Adam(_Optimizer):
    r"""Adam (and AMSGrad), a drop-in for ``torch.optim.Adam``.

    .. math::

        g \leftarrow \pm\nabla + \lambda\theta \ (\text{or } \theta \leftarrow (1-\gamma\lambda)
        \theta \text{ when decoupled}), \quad m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,

    :math:`\theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
    \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}`, ``t`` the parameter's own step count;
    with ``amsgrad``, :math:`\hat v \leftarrow \max(\hat v, v)` takes the place of ``v`` in
    the denominator.
    State ``step`` (0-d float32 tensor), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``
    (amsgrad), as torch; ``betas`` and ``lr`` may be tensors or change every step
    (schedulers). Switching ``amsgrad`` on after the first step raises ValueError (torch
    fails with a KeyError there). Plus ``clip`` and ``nonfinite``.
    """

    rule = _rules.AdamRule
    _torch_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                           differentiable=False, fused=None, decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, clip=None,
                 nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)


class AdamW(_Optimizer):
    r"""AdamW, a drop-in for ``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay,
    :math:`\theta \leftarrow (1-\gamma\lambda)\theta` before the Adam update (default
    ``weight_decay=1e-2``). Same state as torch. Plus ``clip`` and ``nonfinite``.
    """

    rule = _rules.AdamWRule
    _torch_defaults = dict(Adam._torch_defaults, decoupled_weight_decay=True)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, clip=None, nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)


class Adamax(_Optimizer):
    r"""Adamax, a drop-in for ``torch.optim.Adamax``.

    .. math::

        g \leftarrow \pm\nabla + \lambda\theta, \quad m \leftarrow \beta_1 m + (1-\beta_1) g,
        \quad u \leftarrow \max(\beta_2 u, |g| + \epsilon), \quad
        \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,\frac{m}{u}

    State ``step``, ``exp_avg``, ``exp_inf``, as torch. Plus ``clip`` and ``nonfinite``.
    """

    rule = _rules.AdaMaxRule
    _torch_defaults = dict(foreach=None, maximize=False, differentiable=False, capturable=False)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False,
                 clip=None, nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)


class NAdam(_Optimizer):
    r"""NAdam, a drop-in for ``torch.optim.NAdam``.

    With :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})` (``psi = momentum_decay``) and the
    per-parameter product :math:`\Pi_t = \prod_{i\le t} \mu_i` (state ``mu_product``):

    .. math::

        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \quad \theta \leftarrow \theta - \gamma\,\frac{\frac{1-\mu_t}{1-\Pi_t}\,g
        + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\,m}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    with coupled (or, ``decoupled_weight_decay``, decoupled) weight decay. State ``step``,
    ``mu_product`` (0-d float32 tensors), ``exp_avg``, ``exp_avg_sq``, as torch. Plus
    ``clip`` and ``nonfinite``.
    """

    rule = _rules.NAdamRule
    _scalar_keys = ("step", "mu_product")
    _torch_defaults = dict(maximize=False, foreach=None, capturable=False, differentiable=False,
                           decoupled_weight_decay=False)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, clip=None,
                 nonfinite="propagate", state_dtype=None,
                 min_8bit_size=_lowp.MIN_8BIT_SIZE, seed=0, rounding=None, compensation=False,
                 model_copy=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable)
        super().__init__(params, defaults, clip, nonfinite, dict(
            state_dtype=state_dtype, min_8bit_size=min_8bit_size, seed=seed, rounding=rounding,
            compensation=compensation), model_copy)

    def _new_state(self, p, group, state_names):
        st = super()._new_state(p, group, state_names)
        st["mu_product"] = torch.tensor(1.0, dtype=torch.float32)
        return st

    def _part_key(self, st):
        return (float(st["step"]), float(st["mu_product"]))

    def _step_args(self, key):
        return key[0] + 1.0, {"mu_product": key[1]}

    def _next_key(self, key, scalars):
        return (key[0] + 1.0, scalars["mu_product"])


class Adam8bit(Adam):
    r"""Adam with 8-bit block-wise quantized state (Dettmers et al. 2022), the name of
    bitsandbytes' ``bnb.optim.Adam8bit``: :class:`Adam` with ``state_dtype="int8"`` by
    default. ``exp_avg`` and ``exp_avg_sq`` are ``torch.uint8`` codes (the signed and unsigned
    dynamic codes) with a float32 ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` per block of 256
    elements of the parameter's memory order, about 2 bytes of state per element instead of
    8; tensors below ``min_8bit_size`` (4096) elements keep float32 state. See
    :doc:`/low_precision`.
    """

    _default_state_dtype = "int8"


class AdamW8bit(AdamW):
    r"""AdamW with 8-bit block-wise quantized state, the name of bitsandbytes'
    ``bnb.optim.AdamW8bit``: :class:`AdamW` with ``state_dtype="int8"`` by default (see
    :class:`Adam8bit`)."""

    _default_state_dtype = "int8"
