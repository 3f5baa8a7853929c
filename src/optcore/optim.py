"""Optimizers over a :class:`~optcore.Parameters` arena or a list of ``(param, grad)`` arrays.

Names, defaults and update rules follow ``torch.optim``. One ``step()`` is one fused kernel
call per parameter group: every state buffer is read and written once, nothing the size of
the parameters is allocated, and Python does work proportional to the number of groups only.
"""
import numpy as np

from optcore import _checks as ck
from optcore import _rules
from optcore._kernels import _optim
from optcore._kernels._runtime import TensorList
from optcore.params import Arena, Layout, Parameters

__all__ = ["Optimizer", "SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaMax", "NAdam"]

# Hyper-parameters that decide which state buffers exist; fixed after construction.
_STRUCTURAL = ("momentum", "centered", "amsgrad")


class _Group:
    """The arrays, state and kernel table of one parameter group."""

    def __init__(self, rule, hyper, names, params, grads):
        self.names = names
        self.params = params
        self.grads = grads
        self.layout = Layout({n: p.shape for n, p in zip(names, params)})
        self.state_names = rule.state_names(hyper)
        init = rule.initial_state(hyper)
        self.state = {}
        for s in self.state_names:
            if s is not None:
                arena = Arena(self.layout)
                arena.flat.fill(init.get(s, 0.0))
                self.state[s] = arena
        self.step = 0
        self.scalars = {}
        self.structure = {k: hyper[k] != 0 for k in _STRUCTURAL if k in hyper}
        slots = [params, grads, None]
        slots += [None if s is None else [self.state[s][n] for n in names] for s in self.state_names]
        self.table = TensorList(slots)


def _pairs(arg, name):
    if not isinstance(arg, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in arg
    ):
        raise TypeError(f"{name} must be a list of (param, grad) array pairs")
    params = ck.array_list(f"{name} params", [p for p, _ in arg])
    grads = ck.array_list(f"{name} grads", [g for _, g in arg], writeable=False)
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"{name}[{i}]: param has shape {p.shape} but grad has shape {g.shape}")
    return params, grads


class Optimizer:
    r"""Base class: parameter groups, ``step``, ``zero_grad``, ``state_dict``.

    Parameters
    ----------
    params : Parameters, list of (param, grad) pairs, or list of dicts
        What to optimize. A :class:`~optcore.Parameters` arena; or float32 C-contiguous
        ``(param, grad)`` array pairs of any shapes, used in place without copying; or
        torch-style group dicts ``{"params": [(param, grad), ...], "lr": ...}``.
    groups : list of dict, optional
        With a ``Parameters`` arena only: groups ``{"params": [names], <hyper>: value}``
        overriding the defaults (e.g. no weight decay on biases). Names not listed form a last
        group with the defaults.
    constraints : dict, optional
        ``{name: constraint}``: callables applied in place to a parameter after every step,
        e.g. ``{"w1": MaxNorm(3.0)}`` (see :mod:`optcore.constraints`). Names are those of the
        arena, or, for array pairs, the index of the pair counted over all groups.
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

    def __init__(self, params, groups=None, *, constraints=None, **hyper):
        unknown = set(hyper) - set(self.rule.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected hyper-parameters {sorted(unknown)}")
        self.defaults = dict(self.rule.defaults, **hyper)
        self.rule.check(self.defaults)
        self.parameters = params if isinstance(params, Parameters) else None
        specs = self._group_specs(params, groups)
        seen = {}
        for i, (_, names, ps, gs) in enumerate(specs):
            for n, p, g in zip(names, ps, gs):
                seen[f"group {i} param {n}"] = [p]
                seen[f"group {i} grad {n}"] = [g]
        ck.no_overlap(seen)
        self.param_groups = []
        self._groups = []
        for h, names, ps, gs in specs:
            hyper_g = dict(self.defaults, **h)
            self.rule.check(hyper_g)
            self.param_groups.append(dict(hyper_g, params=list(names)))
            self._groups.append(_Group(self.rule, hyper_g, names, ps, gs))
        self._constraints = self._checked_constraints(constraints)
        self._schedule = None

    def _group_specs(self, params, groups):
        """Return [(overrides, names, params, grads)] for every group."""
        if isinstance(params, Parameters):
            specs, used = [], set()
            for i, g in enumerate(groups or ()):
                if not isinstance(g, dict) or "params" not in g:
                    raise TypeError(f"groups[{i}] must be a dict with a 'params' list of names")
                names = list(g["params"])
                for n in names:
                    if n not in params:
                        raise ValueError(f"groups[{i}] names unknown parameter {n!r}")
                    if n in used:
                        raise ValueError(f"parameter {n!r} appears in more than one group")
                    used.add(n)
                h = {k: v for k, v in g.items() if k != "params"}
                self._check_overrides(h, f"groups[{i}]")
                specs.append((h, names, [params[n] for n in names], [params.grads[n] for n in names]))
            rest = [n for n in params if n not in used]
            if rest:
                specs.append(({}, rest, [params[n] for n in rest], [params.grads[n] for n in rest]))
            return specs
        if groups is not None:
            raise TypeError("groups= is for a Parameters arena; pass group dicts as params instead")
        if isinstance(params, (list, tuple)) and params and all(isinstance(g, dict) for g in params):
            specs = []
            for i, g in enumerate(params):
                if "params" not in g:
                    raise TypeError(f"params[{i}] must have a 'params' list of (param, grad) pairs")
                ps, gs = _pairs(g["params"], f"params[{i}]['params']")
                h = {k: v for k, v in g.items() if k != "params"}
                self._check_overrides(h, f"params[{i}]")
                specs.append((h, [str(j) for j in range(len(ps))], ps, gs))
            return specs
        ps, gs = _pairs(params, "params")
        return [({}, [str(j) for j in range(len(ps))], ps, gs)]

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
            hypers.append(h)
        return hypers

    def step(self, lr=None):
        """Apply one update to every parameter group.

        Parameters
        ----------
        lr : float, optional
            Learning rate for this step and the following ones (stored in every group), e.g.
            from a schedule: ``opt.step(lr=sched(t))``. When None and a :attr:`schedule` is
            attached, it comes from the schedule.

        Constraints, if any, are applied after the update.
        """
        if lr is None and self._schedule is not None:
            lr = self._scheduled_lr()
        hypers = self._checked_hyper(lr)
        for h, g, pg in zip(hypers, self._groups, self.param_groups):
            go = _rules.grad_opts(lr=h["lr"], weight_decay=h["weight_decay"],
                                  decoupled=self.rule.decoupled(h), maximize=h["maximize"],
                                  grad_scale=1.0, l1=h["l1"])
            self.rule.run(g.table, go, h, g.step + 1, g.scalars)
            g.step += 1
            pg["lr"] = h["lr"]
        for c, w in self._constraints:
            c(w)

    def zero_grad(self):
        """Set every gradient of every group to zero."""
        if self.parameters is not None:
            self.parameters.zero_grad()
            return
        for g in self._groups:
            _optim.fill(g.table, 1, 0.0)

    # -- state ----------------------------------------------------------------------------

    def state_of(self, name, group=None):
        """Return the state views (``{"exp_avg": ndarray, ...}``) of one parameter.

        ``name`` is a parameter name of the arena, or, for array pairs, the index of the pair
        within its group (``group`` then selects the group, default 0).
        """
        key = str(name)
        for i, g in enumerate(self._groups):
            if (group is None or group == i) and key in g.layout.names:
                return {s: a[key] for s, a in g.state.items()}
        raise KeyError(f"no parameter {name!r} in this optimizer")

    @property
    def state_steps(self):
        """The number of steps applied to each group."""
        return [g.step for g in self._groups]

    def state_dict(self):
        """Return the optimizer state as a flat dict of NumPy arrays and numbers.

        It round-trips through ``np.savez`` / ``np.load`` without pickle::

            np.savez("opt.npz", **opt.state_dict())
            opt.load_state_dict(np.load("opt.npz"))
        """
        out = {"optimizer": np.array(self.rule.name), "groups": len(self._groups)}
        for i, (g, pg) in enumerate(zip(self._groups, self.param_groups)):
            p = f"group{i}."
            out[p + "names"] = np.array(g.names, dtype=str)
            out[p + "sizes"] = np.array([a.size for a in g.params], dtype=np.int64)
            out[p + "step"] = g.step
            for k, v in pg.items():
                if k != "params":
                    out[p + "hyper." + k] = np.asarray(v)
            for s, arena in g.state.items():
                out[p + "state." + s] = arena.flat.copy()
            for s, v in g.scalars.items():
                out[p + "scalar." + s] = v
        return out

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
            for k, default in self.defaults.items():
                v = state.get(p + "hyper." + k)
                if v is None:
                    raise ValueError(f"state lacks {p}hyper.{k}")
                v = np.asarray(v)
                hyper[k] = tuple(float(x) for x in v) if isinstance(default, tuple) else v.item()
            self.rule.check(hyper)
            for k, on in g.structure.items():
                if (hyper[k] != 0) != on:
                    raise ValueError(f"{p}hyper.{k} needs other state buffers than this optimizer has")
            arrays = {}
            for s, arena in g.state.items():
                a = state.get(p + "state." + s)
                if a is None:
                    raise ValueError(f"state lacks {p}state.{s}")
                a = np.asarray(a)
                if a.shape != arena.flat.shape or a.dtype != np.float32:
                    raise ValueError(
                        f"{p}state.{s} must be float32 of shape {arena.flat.shape}, "
                        f"got {a.dtype} {a.shape}"
                    )
                arrays[s] = a
            step = ck.in_range(p + "step", np.asarray(state.get(p + "step", -1)).item(), 0)
            scalars = {k[len(p + "scalar."):]: float(np.asarray(v)) for k, v in state.items()
                       if k.startswith(p + "scalar.")}
            plans.append((g, hyper, arrays, int(step), scalars))
        for (g, hyper, arrays, step, scalars), pg in zip(plans, self.param_groups):
            pg.update(hyper)
            for s, a in arrays.items():
                g.state[s].flat[...] = a
            g.step = step
            g.scalars = scalars

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


# torch.optim spellings
Adagrad = AdaGrad
RMSprop = RMSProp
Adamax = AdaMax
