r"""Data-parallel training across processes with MPI (through mpi4py).

Every rank runs the same model on its own part of the batch, writes its local gradient into
the gradient arena of a :class:`~optcore.Parameters`, and then either

- calls :func:`allreduce_grads_` (one in-place ``Allreduce`` of the whole flat gradient arena:
  one message per step, not one per tensor) followed by a plain optimizer step, every rank
  holding the full optimizer state; or
- steps a :class:`ShardedOptimizer` (ZeRO stage 1): the gradients are reduce-scattered, each
  rank keeps the optimizer state of and updates only its :math:`1/P` slice of the flat arena
  with the same fused kernels, and the parameters are all-gathered.

Distributed clipping uses the global norm over all ranks,
:math:`\lVert g\rVert = \sqrt{\sum_r s_r}` where :math:`s_r` is rank :math:`r`'s float64 sum
of squares; the :math:`P` partial sums are all-gathered and added in rank order on every rank,
so every rank gets the bitwise same norm and takes the same decision (clip factor, skip on a
non-finite gradient).

optcore has no transport of its own: ``comm`` is any ``mpi4py.MPI.Intracomm``
(``MPI.COMM_WORLD``, a split of it, or ``MPI.COMM_SELF``). Install with
``pip install optcore[mpi]`` (mpi4py and the MPICH wheel) and launch with
``mpiexec -n 4 python train.py``.
"""
import hashlib
import math
import weakref
import numpy as np

from optcore import _checks as ck
from optcore import clip as _clip
from optcore._fused import NONFINITE as _NONFINITE
from optcore._kernels import _norms
from optcore._kernels._runtime import TensorList
from optcore.optim import Optimizer, StepResult, _named_groups
from optcore.params import ALIGN_BYTES, Arena, Layout, Parameters, aligned_zeros

__all__ = ["allreduce_grads_", "global_norm", "clip_grad_norm_", "ShardedOptimizer",
           "shard_bounds"]

_ALIGN = ALIGN_BYTES // 4          # shard boundaries fall on 64-byte (16-element) boundaries


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - exercised only without mpi4py
        raise ImportError(
            "optcore.distributed needs mpi4py and an MPI library: pip install 'optcore[mpi]'"
        ) from e
    return MPI


def _check_comm(comm):
    MPI = _mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Intracomm (e.g. MPI.COMM_WORLD), got {comm!r}")
    return MPI


# -- layout agreement -----------------------------------------------------------------------

_digests = {}


def _layout_digest(layout):
    """A 63-bit digest of the names and shapes of ``layout`` (cached per Layout object)."""
    hit = _digests.get(id(layout))
    if hit is not None and hit[0]() is layout:
        return hit[1]
    h = hashlib.blake2b(digest_size=8)
    for n in layout.names:
        h.update(repr((n, layout.shapes[n])).encode())
    d = int.from_bytes(h.digest(), "little") >> 1
    key = id(layout)
    _digests[key] = (weakref.ref(layout, lambda _: _digests.pop(key, None)), d)
    return d


def _agree(comm, what, key, error=None):
    """Raise the same error on every rank when a rank failed locally (``error``) or when the
    ranks' ``key`` differ. Collective: every rank must call it.

    The common case costs one all-gather of two int64 per rank (an ok flag and a digest of
    ``repr(key)``); only on a failure or a mismatch are the keys and messages exchanged.
    """
    h = hashlib.blake2b(repr(key).encode(), digest_size=8)
    mine = np.array([error is None, int.from_bytes(h.digest(), "little") >> 1], dtype=np.int64)
    flags = np.empty((comm.Get_size(), 2), dtype=np.int64)
    comm.Allgather(mine, flags)
    if flags[:, 0].all() and (flags[:, 1] == flags[0, 1]).all():
        return
    everyone = comm.allgather((key, None if error is None else f"{type(error).__name__}: {error}"))
    failed = [(r, e) for r, (_, e) in enumerate(everyone) if e is not None]
    if failed:
        if error is not None:
            raise error
        r, e = failed[0]
        raise ValueError(f"{what}: rank {r} failed: {e}")
    keys = [k for k, _ in everyone]
    if any(k != keys[0] for k in keys):
        groups = {}
        for r, k in enumerate(keys):
            groups.setdefault(k, []).append(r)
        detail = "; ".join(f"ranks {rs}: {k}" for k, rs in groups.items())
        raise ValueError(f"{what}: the ranks disagree ({detail})")


# -- gradient all-reduce --------------------------------------------------------------------

def _grad_buffers(grads, name, writeable=True):
    """Return (list of float32 buffers, agreement key) for the accepted inputs."""
    if isinstance(grads, Parameters):
        grads = grads.grads
    if isinstance(grads, Arena):
        flat = ck.float32_buffer(f"{name}.flat", grads.flat, writeable=writeable)
        return [flat], ("arena", flat.size, _layout_digest(grads.layout))
    arrays = ck.array_list(name, grads, writeable=writeable)
    if writeable:
        ck.no_overlap({name: arrays})
    return arrays, ("arrays", tuple(a.shape for a in arrays))


def _buckets(arrays, bucket_elems):
    if bucket_elems is None:
        return [a.reshape(-1) for a in arrays if a.size]
    out = []
    for a in arrays:
        f = a.reshape(-1)
        out += [f[i : i + bucket_elems] for i in range(0, f.size, bucket_elems)]
    return out


def allreduce_grads_(grads, comm, op="mean", bucket_bytes=None):
    r"""Sum (or average) the gradients of all ranks in place.

    .. math::

        g \leftarrow \sum_{r=0}^{P-1} g^{(r)} \quad(\texttt{op="sum"}), \qquad
        g \leftarrow \frac{1}{P}\sum_{r=0}^{P-1} g^{(r)} \quad(\texttt{op="mean"})

    With equal local batch sizes, ``"mean"`` of the ranks' mean-loss gradients is the gradient
    of the mean loss over the concatenated batch (what ``torch.nn.parallel.
    DistributedDataParallel`` computes).

    Parameters
    ----------
    grads : Parameters, Arena, float32 ndarray or list of float32 ndarrays
        A :class:`~optcore.Parameters` (its gradient arena is reduced: **one** in-place
        ``MPI_Allreduce`` on the whole flat buffer, padding included, i.e. one message per
        step whatever the number of tensors), its ``.grads`` arena, or C-contiguous writeable
        float32 arrays. A list is reduced **one message per array** (all posted at once with
        non-blocking ``Iallreduce``, then waited in order): the arrays are never staged into
        a contiguous copy. For one message per step, keep the gradients in an arena.
    comm : mpi4py.MPI.Intracomm
        The ranks taking part; every rank must call with the same layout.
    op : {"mean", "sum"}
        ``"mean"`` scales by :math:`1/P` in place after the reduction (per bucket, while the
        following buckets are still in flight).
    bucket_bytes : int, optional
        Split each buffer into buckets of at most this many bytes, each reduced by a
        non-blocking ``Iallreduce``; all are posted at once and completed in order, so the
        transfer of later buckets overlaps the waiting on and scaling of earlier ones. None
        (default): one blocking ``Allreduce`` per buffer.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (nothing is written); and, on **every** rank, when the ranks disagree
        on the layout (names, shapes, element count), checked by a small all-gather before
        any gradient is sent.

    Notes
    -----
    Like ``MPI_Allreduce`` itself this is collective: every rank of ``comm`` must call it.
    NaN or inf on one rank propagates to every rank (IEEE sums), so the non-finite check of the
    following step reaches the same decision everywhere.

    Examples
    --------
    >>> from mpi4py import MPI                                        # doctest: +SKIP
    >>> loss_and_grad(params, local_batch)  # writes params.grads     # doctest: +SKIP
    >>> optcore.distributed.allreduce_grads_(params, MPI.COMM_WORLD)  # doctest: +SKIP
    >>> opt.step()                                                    # doctest: +SKIP
    """
    MPI = _check_comm(comm)
    err, arrays, key, bucket_elems = None, [], None, None
    try:  # an error on one rank is raised on every rank by _agree, not left to hang them
        if op not in ("mean", "sum"):
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        if bucket_bytes is not None:
            bucket_elems = max(1, ck.positive_int("bucket_bytes", bucket_bytes) // 4)
        arrays, key = _grad_buffers(grads, "grads")
    except (TypeError, ValueError) as e:
        err = e
    _agree(comm, "allreduce_grads_ layout", key, err)
    size = comm.Get_size()
    if size == 1:
        return
    scale = np.float32(1.0 / size)
    pieces = _buckets(arrays, bucket_elems)
    if len(pieces) == 1:
        comm.Allreduce(MPI.IN_PLACE, pieces[0], op=MPI.SUM)
        if op == "mean":
            np.multiply(pieces[0], scale, out=pieces[0])
        return
    requests = [comm.Iallreduce(MPI.IN_PLACE, p, op=MPI.SUM) for p in pieces]
    for r, p in zip(requests, pieces):
        r.Wait()
        if op == "mean":
            np.multiply(p, scale, out=p)


# -- global norm and clipping ---------------------------------------------------------------

def _local_norm_parts(arrays):
    """This rank's float64 sum of squares and max-abs, from one read pass of the norm kernel
    (:mod:`optcore.clip`: float32 lanes over short blocks folded into float64, overflow-safe,
    bitwise independent of the thread count; tensors summed in order)."""
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return 0.0, 0.0
    tsq, tmax = _norms.sumsq(TensorList([arrays]), 0)
    return float(np.sum(tsq)), float(np.max(tmax))


def _reduce_norm(comm, parts, partitioned, norm_type=2.0):
    """Combine the ranks' (sum of squares, max-abs) into a norm bitwise equal on every rank.

    Returns ``(norm, finite)``; ``finite`` is False when any element on any rank is NaN/inf.
    """
    buf = np.array(parts, dtype=np.float64)
    if partitioned:
        everyone = np.empty((comm.Get_size(), 2), dtype=np.float64)
        comm.Allgather(buf, everyone)
        total = 0.0
        for s in everyone[:, 0].tolist():  # rank order: the same sum on every rank
            total += s
        biggest = float(np.max(everyone[:, 1]))  # NaN if any rank's is
    else:
        comm.Bcast(buf, root=0)
        total, biggest = float(buf[0]), float(buf[1])
    finite = math.isfinite(total)
    if norm_type == 2.0:
        return (math.sqrt(total) if total >= 0 else math.nan), finite
    return biggest, finite


def global_norm(grads, comm, norm_type=2, *, partitioned=False):
    r"""The L2 norm of a gradient spread over ``comm``, the same (bitwise) on every rank.

    .. math::

        \lVert g\rVert_2 = \sqrt{\textstyle\sum_r \sum_i \big(g^{(r)}_i\big)^2}
        \quad(\texttt{partitioned=True}), \qquad
        \lVert g\rVert_2 = \sqrt{\textstyle\sum_i g_i^2}\ \text{of rank 0}
        \quad(\texttt{partitioned=False})

    Parameters
    ----------
    grads : Parameters, Arena, float32 ndarray or list of float32 ndarrays
        This rank's gradient (read only).
    comm : mpi4py.MPI.Intracomm
    norm_type : {2, inf}
        L2 norm (default) or max-abs.
    partitioned : bool
        True when every rank holds a disjoint part of the gradient (the slices of a
        :class:`ShardedOptimizer`): the float64 sums of squares (and max-abs) of the ranks
        are all-gathered and combined in rank order. False (default) when every rank holds
        the same, already all-reduced gradient (after :func:`allreduce_grads_`): rank 0's
        norm is broadcast, so all ranks agree even if an MPI library returned sums differing
        in the last bit.

    Returns
    -------
    float
        The norm; NaN if any element on any rank is NaN, inf if any is infinite (and none NaN).

    Notes
    -----
    The local sums come from one read pass of the norm kernel of :mod:`optcore.clip`
    (float32 lanes over short blocks folded into float64, overflow-safe, bitwise independent
    of the thread count). Same semantics as ``torch.nn.utils.clip_grad_norm_`` over all ranks'
    gradients, or optax ``global_norm``.
    """
    _check_comm(comm)
    err, arrays = None, []
    try:
        norm_type = _clip.norm_type_arg(norm_type)
        ck.boolean("partitioned", partitioned)
        arrays, _ = _grad_buffers(grads, "grads", writeable=False)
    except (TypeError, ValueError) as e:
        err = e
    _agree(comm, "global_norm", None, err)
    return _reduce_norm(comm, _local_norm_parts(arrays), partitioned, norm_type)[0]


def clip_grad_norm_(grads, comm, max_norm, norm_type=2, *, partitioned=False):
    r"""Scale the gradients of all ranks in place so that their global norm is at most
    ``max_norm``; return the global norm before clipping (the same on every rank).

    .. math::

        g \leftarrow g \cdot \min\!\Big(1, \frac{\text{max\_norm}}{\lVert g\rVert_2 + 10^{-6}}
        \Big)

    ``torch.nn.utils.clip_grad_norm_`` over the gradients of all ranks (same 1e-6 guard; a NaN
    norm multiplies by NaN, an infinite one by 0, as torch does). The buffers are rewritten
    (one pass of the scaling kernel) only when the factor is not 1. To fuse the factor into
    the update instead: after :func:`allreduce_grads_` every rank holds the same gradient, so
    a plain optimizer with ``clip=optcore.clip.GlobalNorm(max_norm)`` computes the same
    global norm on every rank with no communication; the :class:`ShardedOptimizer` takes
    ``clip=`` too.

    Parameters
    ----------
    grads : Parameters, Arena, float32 ndarray or list of float32 ndarrays
    comm : mpi4py.MPI.Intracomm
    max_norm : float
        Non-negative.
    norm_type : {2, inf}
    partitioned : bool
        See :func:`global_norm`.
    """
    _check_comm(comm)
    err, arrays = None, []
    try:
        max_norm = ck.nonnegative("max_norm", max_norm)
        norm_type = _clip.norm_type_arg(norm_type)
        ck.boolean("partitioned", partitioned)
        arrays, _ = _grad_buffers(grads, "grads")
    except (TypeError, ValueError) as e:
        err = e
    _agree(comm, "clip_grad_norm_", None, err)
    norm, _ = _reduce_norm(comm, _local_norm_parts(arrays), partitioned, norm_type)
    factor = _clip.factor(norm, max_norm)
    if factor != 1.0:
        live = [a for a in arrays if a.size]
        if live:
            _norms.scale(TensorList([live]), 0, factor)
    return norm


# -- ZeRO stage 1 ---------------------------------------------------------------------------

def shard_bounds(total, size):
    """Element bounds ``[lo_r, hi_r)`` of the ``size`` shards of a flat arena of ``total``
    elements: split as evenly as possible on 64-byte (16-element) boundaries, so shard sizes
    differ by at most 16 elements (some may be empty when ``total`` is small)."""
    blocks = -(-total // _ALIGN)
    cuts = [min(total, (blocks * r // size) * _ALIGN) for r in range(size + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class ShardedOptimizer:
    r"""ZeRO stage-1 data parallelism: optimizer state sharded over the ranks.

    One step, for :math:`P` ranks and the flat gradient arena :math:`g^{(r)}` of rank :math:`r`:

    1. ``Reduce_scatter``: rank :math:`r` receives :math:`\sum_q g^{(q)}[lo_r:hi_r]`, its slice
       of the summed gradient (into a buffer of its own; the local gradient is left as it was);
    2. when clipping by norm or checking for non-finite values: the norm pass over the slice
       (the kernel of :mod:`optcore.clip`) and an all-gather of :math:`P` pairs (sum of
       squares, max-abs): the global norm, bitwise equal on every rank (see
       :func:`global_norm`), hence the same decision on every rank;
    3. the fused update of ``opt_cls`` on the slice of the parameters, reading the gradient as
       :math:`g\cdot c/P` (mean over ranks times clip factor :math:`c`, applied on the fly by
       the kernel's gradient scale, no extra pass; ``Value`` clipping clamps on the fly);
    4. ``Allgatherv`` in place: every rank gets every updated slice.

    Each rank holds the optimizer state of its slice only: :math:`1/P` of the unsharded
    optimizer's memory. Communication is a reduce-scatter plus an all-gather, the same volume
    as one all-reduce of the arena.

    Parameters
    ----------
    opt_cls : subclass of optcore.Optimizer
        ``optcore.Adam``, ``optcore.SGD``, ...
    params : Parameters
        The model's arena; the same names and shapes on every rank (checked at construction:
        a mismatch raises ValueError on every rank).
    comm : mpi4py.MPI.Intracomm
    groups : list of dict, optional
        Parameter groups by name, as for the plain optimizers.
    clip : optcore.clip.GlobalNorm or optcore.clip.Value, optional
        Clip the averaged gradient by its global norm over all ranks (torch
        ``clip_grad_norm_`` semantics), or by value; fused into the update as in the plain
        optimizers. ``PerTensorNorm`` and ``Adaptive`` need whole tensors, which a shard may
        split, and are refused.
    nonfinite : {"propagate", "skip", "raise"}
        What to do when the global gradient has a NaN or inf: let it into the update (torch's
        default), skip the step on every rank (nothing changes; counted in
        ``skipped_steps``), or raise FloatingPointError on every rank.
    **hyper
        ``opt_cls``'s hyper-parameters.

    Notes
    -----
    The shards split the flat arena (padding included) at element granularity, on 64-byte
    boundaries, not at tensor boundaries: a tensor may straddle two ranks, and the shard sizes
    differ by at most 16 elements whatever the tensor sizes. The update rules are elementwise,
    so this changes nothing in the result: with a communicator of size 1 the optimizer is the
    plain ``opt_cls`` (bitwise; no communication, no copy).

    Hyper-parameters in ``param_groups`` may be changed between steps, identically on every
    rank (not checked per step).

    Examples
    --------
    >>> from mpi4py import MPI                                                 # doctest: +SKIP
    >>> opt = ShardedOptimizer(optcore.AdamW, params, MPI.COMM_WORLD, lr=1e-3)  # doctest: +SKIP
    >>> for batch in local_batches:                                           # doctest: +SKIP
    ...     loss_and_grad(params, batch)                                      # doctest: +SKIP
    ...     opt.step()                                                        # doctest: +SKIP

    References
    ----------
    Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
    SC 2020; ``torch.distributed.optim.ZeroRedundancyOptimizer``.
    """

    def __init__(self, opt_cls, params, comm, *, groups=None, clip=None,
                 nonfinite="propagate", **hyper):
        _check_comm(comm)
        self.comm = comm
        err = None
        key = None
        try:
            self._setup(opt_cls, params, groups, clip, nonfinite, hyper)
            key = (params.layout.total, _layout_digest(params.layout), opt_cls.__name__)
        except (TypeError, ValueError) as e:
            err = e
        _agree(comm, "ShardedOptimizer layout", key, err)

    def _setup(self, opt_cls, params, groups, clip, nonfinite, hyper):
        if not (isinstance(opt_cls, type) and issubclass(opt_cls, Optimizer)):
            raise TypeError(f"opt_cls must be an optcore optimizer class, got {opt_cls!r}")
        if opt_cls.default_state_dtype != "float32":
            raise ValueError(f"opt_cls {opt_cls.__name__} keeps low-precision state, which a "
                             "ShardedOptimizer does not shard; use a float32-state optimizer")
        if not isinstance(params, Parameters):
            raise TypeError(
                f"params must be an optcore.Parameters arena, got {type(params).__name__}")
        if isinstance(clip, (_clip.PerTensorNorm, _clip.Adaptive)):
            raise ValueError(
                f"clip={type(clip).__name__}(...) needs whole tensors, which the shards of a "
                "ShardedOptimizer split; use GlobalNorm or Value")
        if clip is not None and not isinstance(clip, (_clip.GlobalNorm, _clip.Value)):
            raise TypeError("clip must be None, optcore.clip.GlobalNorm or optcore.clip.Value, "
                            f"got {type(clip).__name__}")
        self.clip = clip
        if not isinstance(nonfinite, str):
            raise TypeError(f"nonfinite must be a str, got {type(nonfinite).__name__}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.params = params
        self.opt_cls = opt_cls
        self.size = self.comm.Get_size()
        self.rank = self.comm.Get_rank()
        layout = params.layout
        unknown = set(hyper) - set(opt_cls.rule.defaults)
        if unknown:
            raise TypeError(f"{opt_cls.__name__} got unexpected hyper-parameters {sorted(unknown)}")
        defaults = dict(opt_cls.rule.defaults, **hyper)
        opt_cls.rule.check(defaults)
        specs = _named_groups(params, groups)
        for i, (h, _) in enumerate(specs):
            bad = set(h) - set(defaults)
            if bad:
                raise ValueError(f"groups[{i}] has unknown hyper-parameters {sorted(bad)}")
            opt_cls.rule.check(dict(defaults, **h))
        self.defaults = defaults
        self.param_groups = [dict(defaults, **h, params=list(names)) for h, names in specs]
        self.bounds = shard_bounds(layout.total, self.size)
        lo, hi = self.bounds[self.rank]
        self.lo, self.hi = lo, hi
        if self.size == 1:
            self.grad_shard = params.grads.flat
        else:
            self.grad_shard = aligned_zeros(hi - lo)
        # pieces[g] = [(name, a, b)]: the part [a, b) of the arena, inside tensor `name`, that
        # this rank updates, for every group g, in the group's name order.
        self._pieces = [self._pieces_of(names, lo, hi) for _, names in specs]
        inner = []
        for g, pieces in enumerate(self._pieces):
            pairs = [(params.flat[a:b], self.grad_shard[a - lo : b - lo]) for _, a, b in pieces]
            if not pairs:  # keep the group (its step count and scalars) on every rank
                pairs = [(np.zeros(0, np.float32), np.zeros(0, np.float32))]
            h = {k: v for k, v in self.param_groups[g].items() if k != "params"}
            inner.append(dict(h, params=pairs))
        self._inner = opt_cls(inner)
        self.skipped_steps = 0

    def _pieces_of(self, names, lo, hi):
        layout = self.params.layout
        out = []
        for n in names:
            off = layout.offsets[n]
            a, b = max(off, lo), min(off + layout.size(n), hi)
            if a < b:
                out.append((n, a, b))
        return out

    # -- the step -------------------------------------------------------------------------

    def zero_grad(self):
        """Set this rank's gradient arena to zero (one fill)."""
        self.params.zero_grad()

    def step(self, lr=None):
        """Reduce-scatter the gradients, update this rank's slice, all-gather the parameters.

        Collective: every rank must call it. Returns an :class:`~optcore.optim.StepResult` (the
        same on every rank; ``loss_scale`` is None).

        Raises
        ------
        FloatingPointError
            With ``nonfinite="raise"``, on every rank when the gradient of any rank holds a
            NaN or inf; nothing is changed.

        Parameters
        ----------
        lr : float, optional
            Learning rate for this step and the following ones (stored in every group).
        """
        MPI = _mpi()
        inner = self._inner
        for pg, ipg in zip(self.param_groups, inner.param_groups):
            ipg.update({k: v for k, v in pg.items() if k != "params"})
        hypers = inner._checked_hyper(lr)  # validate before any communication
        if self.size > 1:
            counts = [b - a for a, b in self.bounds]
            self.comm.Reduce_scatter(self.params.grads.flat, self.grad_shard, counts, op=MPI.SUM)
        norm = None
        factor, clamp = 1.0, math.inf
        by_norm = isinstance(self.clip, _clip.GlobalNorm)
        if by_norm or self.nonfinite != "propagate":
            norm_type = self.clip.norm_type if by_norm else 2.0
            norm, finite = _reduce_norm(self.comm, _local_norm_parts([self.grad_shard]), True,
                                        norm_type)
            norm /= self.size
            if not finite:
                if self.nonfinite == "skip":
                    self.skipped_steps += 1
                    return StepResult(norm, 1.0, True, None, False)
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"the gradient of some rank (of {self.size}) has a non-finite value "
                        f"(NaN or inf; global norm {norm}); nothing was changed")
            if by_norm:
                factor = _clip.factor(norm, self.clip.max_norm)
        elif isinstance(self.clip, _clip.Value):
            clamp = self.clip.limit
        # the update half of the plain step; the norm pass was the ranks' combined one
        inner._update(hypers, factor / self.size, [None] * len(inner._groups), clamp)
        for pg, ipg in zip(self.param_groups, inner.param_groups):
            pg["lr"] = ipg["lr"]
        if self.size > 1:
            counts = [b - a for a, b in self.bounds]
            displs = [a for a, _ in self.bounds]
            self.comm.Allgatherv(MPI.IN_PLACE, [self.params.flat, counts, displs, MPI.FLOAT])
        return StepResult(norm, factor, False, None, True)

    # -- state ----------------------------------------------------------------------------

    @property
    def state_nbytes(self):
        """Bytes of optimizer state held by this rank (about 1/P of the unsharded optimizer)."""
        return sum(a.flat.nbytes for g in self._inner._groups for a in g.state.values())

    @property
    def state_steps(self):
        """The number of steps applied to each group."""
        return self._inner.state_steps

    def _group_layouts(self):
        layout = self.params.layout
        return [Layout({n: layout.shapes[n] for n in pg["params"]}) for pg in self.param_groups]

    def state_dict(self, root=0):
        """Gather the sharded state into the format of the plain optimizer's ``state_dict``.

        Collective. Returns the dict (plain arrays and numbers, ``np.savez``-able without
        pickle) on ``root`` and None on the other ranks (``root=None``: on every rank). The
        result is exactly what ``opt_cls(params, groups)`` would return after the same steps,
        so it loads into a plain optimizer, or into a :class:`ShardedOptimizer` on any number
        of ranks.
        """
        MPI = _mpi()
        if root is not None:
            if isinstance(root, (bool, np.bool_)) or not isinstance(root, (int, np.integer)):
                raise TypeError(f"root must be an int or None, got {type(root).__name__}")
            if not 0 <= root < self.size:
                raise ValueError(f"root must be in [0, {self.size}), got {root}")
        inner = self._inner.state_dict()
        gather_all = root is None
        me = gather_all or self.rank == root
        out = {"optimizer": inner["optimizer"], "groups": len(self.param_groups),
               "skipped_steps": self.skipped_steps} if me else None
        layout = self.params.layout
        for g, (pg, glayout) in enumerate(zip(self.param_groups, self._group_layouts())):
            p = f"group{g}."
            state_names = [k[len(p + "state."):] for k in inner if k.startswith(p + "state.")]
            all_pieces = [self._pieces_of(pg["params"], a, b) for a, b in self.bounds]
            counts = [sum(b - a for _, a, b in ps) for ps in all_pieces]
            ilayout = Layout({str(j): (b - a,) for j, (_, a, b) in enumerate(self._pieces[g])})
            if me:
                out[p + "names"] = np.array(pg["params"], dtype=str)
                out[p + "sizes"] = np.array([layout.size(n) for n in pg["params"]], dtype=np.int64)
                out[p + "step"] = inner[p + "step"]
                for k, v in pg.items():
                    if k != "params":
                        out[p + "hyper." + k] = np.asarray(v)
                for k, v in inner.items():
                    if k.startswith(p + "scalar."):
                        out[k] = v
            for s in state_names:
                flat = inner[p + "state." + s]
                mine = np.concatenate([np.zeros(0, np.float32)] + [
                    flat[ilayout.offsets[str(j)] : ilayout.offsets[str(j)] + (b - a)]
                    for j, (_, a, b) in enumerate(self._pieces[g])])
                recv = np.empty(sum(counts), np.float32) if me else None
                displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
                if gather_all:
                    self.comm.Allgatherv(mine, [recv, counts, displs, MPI.FLOAT])
                else:
                    self.comm.Gatherv(mine, [recv, counts, displs, MPI.FLOAT] if me else None,
                                      root=root)
                if me:
                    full = aligned_zeros(glayout.total)
                    full.fill(self.opt_cls.rule.initial_state(
                        {k: v for k, v in pg.items() if k != "params"}).get(s, 0.0))
                    pos = 0
                    for ps in all_pieces:
                        for n, a, b in ps:
                            o = glayout.offsets[n] + a - layout.offsets[n]
                            full[o : o + b - a] = recv[pos : pos + b - a]
                            pos += b - a
                    out[p + "state." + s] = full
        return out

    def load_state_dict(self, state):
        """Load a state saved by :meth:`state_dict` (on any number of ranks) or by the plain
        optimizer. Collective: every rank passes the whole state and keeps its slice;
        everything is checked on every rank before anything is written, and an error on one
        rank is raised on all."""
        err = None
        try:
            plan = self._plan_load(state)
        except (TypeError, ValueError, KeyError) as e:
            err = e
        _agree(self.comm, "ShardedOptimizer.load_state_dict", None, err)
        self._inner.load_state_dict(plan)
        self.skipped_steps = plan["skipped_steps"]
        for g, pg in enumerate(self.param_groups):
            pg.update({k: v for k, v in self._inner.param_groups[g].items() if k != "params"})

    def _plan_load(self, state):
        """Validate ``state`` and translate it into the inner optimizer's state dict."""
        name = str(np.asarray(state.get("optimizer", "")))
        if name != self.opt_cls.rule.name:
            raise ValueError(f"state is for optimizer {name!r}, this is {self.opt_cls.rule.name!r}")
        if int(np.asarray(state.get("groups", -1))) != len(self.param_groups):
            raise ValueError(f"state has {state.get('groups')} groups, this optimizer has "
                             f"{len(self.param_groups)}")
        layout = self.params.layout
        inner_now = self._inner.state_dict()
        plan = {"optimizer": inner_now["optimizer"], "groups": inner_now["groups"],
                "skipped_steps": int(ck.in_range(
                    "skipped_steps", np.asarray(state.get("skipped_steps", 0)).item(), 0))}
        for g, (pg, glayout) in enumerate(zip(self.param_groups, self._group_layouts())):
            p = f"group{g}."
            names = [str(n) for n in np.asarray(state.get(p + "names", ())).reshape(-1)]
            if names != pg["params"]:
                raise ValueError(f"{p}names is {names}, expected {pg['params']}")
            sizes = np.asarray(state.get(p + "sizes", ())).reshape(-1).tolist()
            if sizes != [layout.size(n) for n in names]:
                raise ValueError(f"{p}sizes is {sizes}, expected {[layout.size(n) for n in names]}")
            for k in ("names", "sizes"):
                plan[p + k] = inner_now[p + k]
            for k, v in state.items():
                if k.startswith(p) and not k.startswith((p + "state.", p + "names", p + "sizes")):
                    plan[k] = v
            for k in inner_now:
                if not k.startswith(p + "state."):
                    continue
                a_full = state.get(k)
                if a_full is None:
                    raise ValueError(f"state lacks {k}")
                a_full = np.asarray(a_full)
                if a_full.shape != (glayout.total,) or a_full.dtype != np.float32:
                    raise ValueError(f"{k} must be float32 of shape {(glayout.total,)}, got "
                                     f"{a_full.dtype} {a_full.shape}")
                mine = np.zeros_like(inner_now[k])
                ilayout = Layout({str(j): (b - a,) for j, (_, a, b) in enumerate(self._pieces[g])})
                for j, (n, a, b) in enumerate(self._pieces[g]):
                    o = glayout.offsets[n] + a - layout.offsets[n]
                    io = ilayout.offsets[str(j)]
                    mine[io : io + b - a] = a_full[o : o + b - a]
                plan[k] = mine
        return plan

    def __repr__(self):
        return (f"ShardedOptimizer({self.opt_cls.__name__}, rank {self.rank}/{self.size}, "
                f"elements [{self.lo}, {self.hi}) of {self.params.layout.total})")
