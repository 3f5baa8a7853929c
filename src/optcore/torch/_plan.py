"""The kernel tables of one torch parameter group, kept across steps.

A :class:`Plan` holds, for the parameters of one group that have a gradient, the validated
address tables the kernels walk, split into *parts*: the tensors that share a per-parameter
step count (torch counts steps per parameter) run in one kernel call. It is built in two
phases, so that a bad tensor of any group raises before anything of the step is written:
the constructor (and :meth:`Plan.refresh` for a cached plan) validates and computes addresses
without writing, and :meth:`Plan.commit` creates the missing state and binds the tables.

From one step to the next only the gradients usually change (``zero_grad(set_to_none=True)``
makes backward allocate new ones), and the plan keeps no reference to a gradient between
steps (that would keep a second set of gradients alive through the next backward): at each
step :meth:`Plan.refresh` checks the gradients with the cheapest sound test and re-points only
the gradient slot. torch's ``.grad`` setter and autograd already guarantee a gradient the
parameter's dtype, device and shape; what remains is one ``is_contiguous`` per gradient when
the parameters are contiguous (else a comparison of strides), which also refuses sparse
gradients (they raise on it). Assigning ``p.grad.data`` bypasses torch's guarantees and is
not supported. A parameter whose storage was replaced (``p.data = ...``), a new gradient
pattern (a gradient became None), new state dicts (``load_state_dict``) or other state
buffers (e.g. ``momentum`` switched on) rebuild the plan.
"""
import operator
from itertools import repeat

import numpy as np
import torch

from optcore import _fused
from optcore._kernels._runtime import TensorList
from optcore.torch import _lowp as lp
from optcore.torch import _tensors as tt

_is = operator.is_
_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_contiguous = torch.Tensor.is_contiguous


#: state key of the Kahan compensation of a 16-bit parameter (torch-optimi's name)
KAHAN = "kahan_comp"
#: table slots of the model copy and of the Kahan compensation (oc_optim.h)
OC_SLOT_COPY, OC_SLOT_COMP = 6, 7


def param_name(gi, j):
    return f"param_groups[{gi}] param {j}"


def _pointers(tensors):
    return np.fromiter(map(_ptr, tensors), dtype=np.uint64, count=len(tensors))


class Part:
    """Tensors of one group that share a step count: one kernel call per step.

    ``rows`` indexes the group's active tensors (None: all of them); ``key`` is the per-tensor
    state the step scalars depend on (the step count, NAdam's momentum product, SGD's first
    step), identical for every tensor of the part.
    """

    def __init__(self, rows, key, lengths, slots, refs, units, formats):
        self.rows = rows
        self.key = key
        self.table = TensorList.from_addresses(_take(lengths, rows), [_take(a, rows) for a in slots],
                                               refs)
        for s, (kinds, absmax) in formats.items():
            if s < len(slots):
                self.table.set_slot_format(
                    s, _take(kinds, rows),
                    absmax if absmax is None or rows is None else [absmax[r] for r in rows])
        self.units = None
        self.unit_tensor = None
        if units is not None:
            self.units, self.unit_tensor = units.table(rows, slots, refs)

    def set_grads(self, gptrs, grads, units):
        """Point the gradient slot at ``gptrs`` (None: clear it)."""
        self.table.set_slot_addresses(1, _take(gptrs, self.rows), grads)
        if self.units is not None:
            if gptrs is None:
                self.units.set_slot_addresses(1, None, None)
            else:
                units.set_grads(self.units, self.rows, gptrs, grads)

    def sums(self, acc_slot):
        return _fused.sums(self.table, self.units, self.unit_tensor, acc_slot)


def _take(a, rows):
    if a is None or rows is None:
        return a
    return a[rows]


class Units:
    """The units of adaptive clipping over a group's tensors: the rows along dim 0 (a 0-d or
    1-d tensor is one unit). Each row must be one block of memory, so dim 0 must be the
    outermost dimension (contiguous and channels_last tensors)."""

    def __init__(self, gi, js, params):
        counts, rowlen = [], []
        for j, p in zip(js, params):
            n = p.numel()
            if p.dim() >= 2 and p.shape[0] > 0:
                r = n // p.shape[0]
                if p.shape[0] > 1 and p.stride(0) != r:
                    raise ValueError(
                        f"{param_name(gi, j)}: adaptive clipping needs the rows along dim 0 to be "
                        f"blocks of memory (strides {p.stride()}); use a contiguous or "
                        "channels_last parameter"
                    )
                counts.append(p.shape[0])
                rowlen.append(r)
            else:
                counts.append(1)
                rowlen.append(n)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.rowlen = np.asarray(rowlen, dtype=np.int64)

    def _layout(self, rows):
        counts = _take(self.counts, rows)
        rowlen = _take(self.rowlen, rows)
        unit_len = np.repeat(rowlen, counts)
        first = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
        offsets = (within * unit_len * 4).astype(np.uint64)
        unit_tensor = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
        return counts, unit_len, offsets, unit_tensor

    def table(self, rows, slots, refs):
        counts, unit_len, offsets, unit_tensor = self._layout(rows)
        addrs = [None if a is None else np.repeat(_take(a, rows), counts) + offsets for a in slots]
        return TensorList.from_addresses(unit_len, addrs, refs), unit_tensor

    def set_grads(self, units, rows, gptrs, grads):
        counts, _, offsets, _ = self._layout(rows)
        units.set_slot_addresses(1, np.repeat(_take(gptrs, rows), counts) + offsets, grads)


class Plan:
    """Validated kernel tables over the parameters of group ``gi`` that have a gradient.

    ``opt`` supplies the rule (``opt.rule``), the state a parameter starts with
    (``opt._new_state``) and the part key of a state (``opt._part_key``). The constructor
    only validates; :meth:`commit` writes (new state, tables).
    """

    def __init__(self, opt, gi, group, grads, state_names, copies=None):
        ps = group["params"]
        self.gi = gi
        self.group_params = list(ps)
        self.mask = tuple(map(_is, grads, repeat(None)))
        self.dense = not any(self.mask)
        self.js = [j for j, g in enumerate(grads) if g is not None]
        self.params = [ps[j] for j in self.js]
        self.grads = [grads[j] for j in self.js]
        # model copies (model_copy=): written in the sweep, their .grad is the gradient
        self.copies = None if copies is None else [copies[j] for j in self.js]
        self.cptr_list = None if copies is None else list(map(_ptr, self.copies))
        self.state_names = state_names
        self.committed = False
        names, tensors = [], []
        for i, (j, p, g) in enumerate(zip(self.js, self.params, self.grads)):
            name = param_name(gi, j)
            tt.check_tensor(name, p, dtypes=tuple(lp.PARAM_KINDS))
            gdtype = p.dtype if copies is None else self.copies[i].dtype
            tt.check_tensor(f"gradient of {name}", g, dtypes=(gdtype,))
            tt.same_layout(f"gradient of {name}", g, name, p)
            names += [name, f"gradient of {name}"]
            tensors += [p, g]
            if copies is not None:
                names.append(f"model copy of {name}")
                tensors.append(self.copies[i])
        self.contiguous = all(map(_contiguous, self.params))
        self.strides = list(map(_stride, self.params))
        self.lengths = tt.lengths(self.params)
        self.pptr_list = list(map(_ptr, self.params))
        self.pptrs = np.array(self.pptr_list, dtype=np.uint64).reshape(-1)
        self.gptrs = _pointers(self.grads)
        # formats: of each parameter (and gradient), of each state buffer, Kahan compensation
        self.param_kinds = np.array([lp.PARAM_KINDS[p.dtype] for p in self.params], np.uint8)
        self.grad_kinds = np.array([lp.PARAM_KINDS[g.dtype] for g in self.grads], np.uint8)
        self.kinds = {s: opt._state_kinds(self.params, s) for s in state_names if s is not None}
        self.comp = np.array([opt.compensation and p.dtype in lp.HALF_DTYPES for p in self.params],
                             dtype=bool)
        # existing state: every buffer this configuration needs, in the parameter's shape
        self.fresh = []
        self.convert = []
        for i, (j, p) in enumerate(zip(self.js, self.params)):
            st = opt.state.get(p)
            if not st:
                self.fresh.append(p)
                continue
            for s in state_names:
                if s is None:
                    continue
                name = f"state {s!r} of {param_name(gi, j)}"
                if s in opt._lazy_state and st.get(s) is None:
                    continue
                if s not in st:
                    raise ValueError(
                        f"{name} is missing: param_groups[{gi}] now needs buffers the earlier "
                        "steps did not create (torch.optim fails here too); create a new "
                        "optimizer to switch this option on"
                    )
                t = tt.check_tensor(name, st[s], dtypes=lp.STATE_DTYPES)
                if t.shape != p.shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
                kind = lp.stored_kind(s, t)
                if kind in lp.Q8:
                    lp.check_absmax(name, st, s, p)
                if kind != self.kinds[s][i] or t.stride() != p.stride():
                    self.convert.append((st, s, p, self.kinds[s][i]))
                else:
                    names.append(name)
                    tensors.append(t)
                    if kind in lp.Q8:
                        names.append(f"state {lp.absmax_key(s)!r} of {param_name(gi, j)}")
                        tensors.append(st[lp.absmax_key(s)])
            if self.comp[i] and st.get(KAHAN) is not None:
                name = f"state {KAHAN!r} of {param_name(gi, j)}"
                t = tt.check_tensor(name, st[KAHAN], dtypes=(p.dtype,))
                if t.shape != p.shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
                if t.stride() != p.stride():
                    self.convert.append((st, KAHAN, p, None))
                else:
                    names.append(name)
                    tensors.append(t)
        tt.no_overlap(names, tensors)
        self.units = None
        if opt._unit_tables:
            if (self.param_kinds.any() or self.grad_kinds.any()
                    or any(k.any() for k in self.kinds.values())):
                raise ValueError(f"param_groups[{gi}]: adaptive clipping needs float32 "
                                 "parameters and state")
            self.units = Units(gi, self.js, self.params)

    # -- per step -------------------------------------------------------------------------

    def current(self, group, grads, state_names):
        """Whether this plan still covers ``group`` (same parameters, same gradient pattern,
        same state buffers): then :meth:`refresh` suffices."""
        ps = group["params"]
        return (state_names == self.state_names and len(ps) == len(self.group_params)
                and all(map(_is, ps, self.group_params))
                and (not any(map(_is, grads, repeat(None))) if self.dense
                     else tuple(map(_is, grads, repeat(None))) == self.mask))

    def refresh(self, grads):
        """Check this step's gradients; return ``(grads, pointers)`` for :meth:`set_grads`,
        or False when a parameter's storage changed (``p.data = ...``: rebuild the plan).
        Raises naming the first bad gradient; writes nothing."""
        gs = grads if len(self.js) == len(grads) else [grads[j] for j in self.js]
        if list(map(_ptr, self.params)) != self.pptr_list:
            return False
        if self.copies is not None and list(map(_ptr, self.copies)) != self.cptr_list:
            return False
        # torch's grad setter and autograd guarantee the parameter's dtype, device and shape;
        # not its strides, nor a dense layout (a sparse tensor raises on is_contiguous,
        # stride and data_ptr)
        try:
            ok = (all(map(_contiguous, gs)) if self.contiguous
                  else list(map(_stride, gs)) == self.strides)
            gptrs = _pointers(gs) if ok else None
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            ok = False
        if not ok:
            for j, p, g in zip(self.js, self.params, gs):
                name = param_name(self.gi, j)
                tt.check_tensor(f"gradient of {name}", g, dtypes=(p.dtype,))
                tt.same_layout(f"gradient of {name}", g, name, p)
            gptrs = _pointers(gs)
        return gs, gptrs

    def set_grads(self, pending):
        """Point every table's gradient slot at this step's gradients."""
        self.grads, self.gptrs = pending
        for part in self.parts:
            part.set_grads(self.gptrs, self.grads, self.units)

    def release(self):
        """Forget the gradients after the step, so that ``zero_grad()`` frees them: the
        tables keep no reference (and no address) of a gradient between steps."""
        self.grads = self.gptrs = None
        for part in self.parts:
            part.set_grads(None, None, None)

    # -- commit ---------------------------------------------------------------------------

    def commit(self, opt, group):
        """Create the state of parameters that have none, convert state tensors whose memory
        format differs from their parameter's, bind the per-parameter scalars and build the
        tables. Called once per plan, after every group was validated."""
        keeps = opt._keeps_state(self.state_names)
        for p in self.fresh if keeps else ():
            opt.state[p].update(opt._new_state(p, group, self.state_names))
        for st, s, p, kind in self.convert:
            if s == KAHAN:
                st[s] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(st[s])
            else:
                lp.convert(st, s, p, kind)
        self.fresh = self.convert = None
        states = [opt.state[p] for p in self.params] if keeps else [{} for _ in self.params]
        keys = [opt._part_key(st) for st in states]
        for i, (st, p) in enumerate(zip(states, self.params)):
            for s in self.state_names:
                if s is not None and st.get(s) is None:
                    st.update(lp.filled(p, self.kinds[s][i], 0.0, s))
            if self.comp[i] and st.get(KAHAN) is None:
                st[KAHAN] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # per-parameter scalars (step, mu_product) become views of one float32 buffer each,
        # so that one write per part updates them all
        self.scalars = {}
        for k in opt._scalar_keys:
            buf = torch.tensor([float(st[k]) for st in states], dtype=torch.float32)
            for i, st in enumerate(states):
                st[k] = buf[i]
            self.scalars[k] = buf
        slots = [self.pptrs, self.gptrs, None]
        slots += [None if s is None else _pointers([st[s] for st in states]) for s in self.state_names]
        slots += [None] * (OC_SLOT_COPY - len(slots))
        slots.append(None if self.copies is None else _pointers(self.copies))
        slots.append(np.array([st[KAHAN].data_ptr() if c else 0 for st, c in zip(states, self.comp)],
                              dtype=np.uint64))
        formats = {}
        if self.param_kinds.any():
            formats[0] = formats[OC_SLOT_COMP] = (self.param_kinds, None)
        if self.grad_kinds.any():
            formats[1] = (self.grad_kinds, None)
        if self.copies is not None:
            formats[OC_SLOT_COPY] = (self.grad_kinds, None)
        for k, s in enumerate(self.state_names):
            if s is not None and self.kinds[s].any():
                formats[3 + k] = (self.kinds[s], lp.absmax_arrays(states, s, self.kinds[s]))
        # the tables own what they address (the gradients' slot gets its own refs per step)
        refs = (self.params, self.copies, [v for st in states for v in st.values() if isinstance(v, torch.Tensor)])
        by_key = {}
        for i, k in enumerate(keys):
            by_key.setdefault((k, bool(self.comp[i])), []).append(i)
        whole = len(by_key) == 1
        self.parts = [Part(None if whole else np.asarray(rows, dtype=np.int64), k, self.lengths,
                           slots if comp else slots[:OC_SLOT_COMP], refs, self.units, formats)
                      for (k, comp), rows in by_key.items()]
        self.committed = True
        self.set_grads((self.grads, self.gptrs))

    def advance(self, opt):
        """After an applied step: every part's key moves on to its ``next_key`` (step + 1, the
        new momentum product, SGD's buffers exist), written to the bound scalar tensors."""
        for part in self.parts:
            part.key = tuple(float(np.float32(v)) for v in part.next_key)
            for k, v in zip(opt._scalar_keys, part.key):
                buf = self.scalars[k]
                if part.rows is None:
                    buf.fill_(v)
                else:
                    buf[torch.from_numpy(part.rows)] = v
