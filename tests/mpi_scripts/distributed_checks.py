"""Checks of optcore.distributed run under ``mpiexec -n P`` (driven by tests/test_distributed.py).

Usage: ``mpiexec -n P python distributed_checks.py OUTDIR [CHECKPOINT_TO_RESUME]``.
Every rank runs every check; rank 0 writes ``OUTDIR/results-P.json`` mapping a check name to
"ok" or the error of the first failing rank. A 2-rank run also writes ``OUTDIR/ckpt-2.npz``
(parameters and sharded Adam state after N_STEPS steps), which a later run resumes.

The problem: a linear least-squares model ``W x + b`` plus a separable quadratic ``e``, the
loss being the mean over a batch of which every rank holds ``B`` rows. The reference is the
plain optimizer of one process stepped with the float64 gradient of the concatenated batch
(rounded to float32), which every rank computes on its own.
"""
import json
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import optcore
from optcore import distributed as D
from optcore.clip import GlobalNorm

comm = MPI.COMM_WORLD
P, RANK = comm.Get_size(), comm.Get_rank()
OUT = sys.argv[1]
RESUME = sys.argv[2] if len(sys.argv) > 2 else None
# 4*37 + 4 + 301 elements: the arena (with 64-byte padding) splits unevenly over 2 or 3 ranks,
# inside tensors.
SHAPES = {"W": (4, 37), "b": (4,), "e": (301,)}
B = 8
N_STEPS = 4
OPTIMIZERS = {
    "sgd": (optcore.SGD, dict(lr=1e-2, momentum=0.9)),
    "adagrad": (optcore.AdaGrad, dict(lr=1e-2)),
    "rmsprop": (optcore.RMSProp, dict(lr=1e-2, centered=True, momentum=0.5)),
    "adam": (optcore.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (optcore.AdamW, dict(lr=1e-2)),
    "adamax": (optcore.AdaMax, dict(lr=1e-2)),
    "nadam": (optcore.NAdam, dict(lr=1e-2)),
}
GROUPS = [{"params": ["b"], "weight_decay": 0.0}]
MAX_NORM = 2.0  # the gradient norm is ~30-60 here: clipping is active at every step


def init_params():
    p = optcore.Parameters(SHAPES)
    r = np.random.default_rng(7)
    p["W"] = r.uniform(-0.1, 0.1, SHAPES["W"])
    p["e"] = r.uniform(-0.1, 0.1, SHAPES["e"])
    return p


def batch(step, rank):
    # Positive features and targets offset far from the model: the gradients of the ranks
    # share their sign, so their mean suffers no cancellation (see the tolerance below).
    r = np.random.default_rng([step, rank])
    x = r.uniform(0.5, 1.5, (B, 37))
    y = x @ np.full((37, 4), 0.1) + 5.0 + r.normal(0, 0.1, (B, 4))
    t = 3.0 + r.normal(0, 0.5, (B, 301))
    return x, y, t


def grads64(p, step, ranks):
    """Float64 gradient of the mean loss over the concatenated batches of ``ranks``."""
    x, y, t = (np.concatenate(a) for a in zip(*(batch(step, r) for r in ranks)))
    w, b, e = (p[n].astype(np.float64) for n in ("W", "b", "e"))
    res = x @ w.T + b - y
    return {"W": res.T @ x / len(x), "b": res.mean(0), "e": e - t.mean(0)}


def write_grads(p, g):
    p.grads.flat[...] = 0
    for n, v in g.items():
        p.grads[n] = v


def reference(name, clip, steps):
    cls, hyper = OPTIMIZERS[name]
    p = init_params()
    opt = cls(p, groups=GROUPS, **hyper)
    for s in range(steps):
        write_grads(p, grads64(p, s, range(P)))
        if clip:
            g = p.grads.flat
            norm = np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64)))
            g *= np.float32(min(1.0, MAX_NORM / (norm + 1e-6)))
        opt.step()
    return p, opt


# float32 rounding: the distributed gradient is a float32 sum of the ranks' float32 gradients
# (a few ulp from the float64 reference rounded once); over 4 steps of size <= lr = 1e-2 the
# normalized rules turn that into <~1e-7 relative error of each update.
RTOL, ATOL = 2e-5, 2e-7


def same_on_all_ranks(a):
    everyone = np.empty((P, a.size), a.dtype)
    comm.Allgather(np.ascontiguousarray(a).reshape(-1), everyone)
    assert all(np.array_equal(everyone[0], e, equal_nan=True) for e in everyone), "ranks differ"


def check_allreduce(name, clip, bucket, explicit_clip=False):
    """All-reduce then the plain optimizer; clipping fused (``clip=GlobalNorm``: every rank
    holds the same reduced gradient, so the same norm) or explicit (``clip_grad_norm_``)."""
    cls, hyper = OPTIMIZERS[name]
    p = init_params()
    fused = GlobalNorm(MAX_NORM) if clip and not explicit_clip else None
    opt = cls(p, groups=GROUPS, clip=fused, **hyper)
    for s in range(N_STEPS):
        write_grads(p, grads64(p, s, [RANK]))
        D.allreduce_grads_(p, comm, bucket_bytes=bucket)
        same_on_all_ranks(p.grads.flat)
        if explicit_clip:
            norm = D.clip_grad_norm_(p, comm, MAX_NORM)
            assert norm > MAX_NORM
        rec = opt.step()
        assert (rec.clip_factor < 1.0) == (fused is not None)
    ref, _ = reference(name, clip, N_STEPS)
    np.testing.assert_allclose(p.flat, ref.flat, rtol=RTOL, atol=ATOL)
    same_on_all_ranks(p.flat)
    return p


def check_sharded(name, clip):
    cls, hyper = OPTIMIZERS[name]
    p = init_params()
    opt = D.ShardedOptimizer(cls, p, comm, groups=GROUPS, clip=GlobalNorm(MAX_NORM) if clip else None,
                             **hyper)
    for s in range(N_STEPS):
        write_grads(p, grads64(p, s, [RANK]))
        rec = opt.step()
        assert not rec.skipped and (rec.clip_factor < 1.0) == clip
    ref, ref_opt = reference(name, clip, N_STEPS)
    np.testing.assert_allclose(p.flat, ref.flat, rtol=RTOL, atol=ATOL)
    same_on_all_ranks(p.flat)
    # the gathered state is the plain optimizer's state_dict (to float32 rounding)
    state = opt.state_dict(root=None)
    want = ref_opt.state_dict()
    assert state.keys() == want.keys(), state.keys() ^ want.keys()
    for k, v in want.items():
        if k.startswith("group") and ".state." in k:
            np.testing.assert_allclose(state[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        elif np.asarray(v).dtype.kind in "fc":
            np.testing.assert_allclose(np.asarray(state[k]), np.asarray(v), rtol=1e-12, err_msg=k)
        else:
            assert np.array_equal(np.asarray(state[k]), np.asarray(v)), k
    # 1/P of the state (shard sizes differ by at most 16 elements)
    total = sum(v.nbytes for k, v in want.items() if ".state." in k)
    nstate = sum(1 for k in want if k.startswith("group0.state."))
    assert abs(opt.state_nbytes - total / P) <= 16 * 4 * nstate * 2 + 64 * nstate * 2, (
        opt.state_nbytes, total)
    return p


def check_sharded_matches_allreduce(name):
    a = check_allreduce(name, False, None)
    b = check_sharded(name, False)
    np.testing.assert_allclose(a.flat, b.flat, rtol=1e-6, atol=1e-8)


def check_lr_change():
    p, q = init_params(), init_params()
    ref = optcore.Adam(q, lr=1e-2)
    opt = D.ShardedOptimizer(optcore.Adam, p, comm, lr=1e-2)
    for s in range(4):
        write_grads(p, grads64(p, s, [RANK]))
        write_grads(q, grads64(q, s, range(P)))
        if s < 3:  # through param_groups
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 1e-2 / (s + 1)
            opt.step()
            ref.step()
        else:      # through step(lr=...)
            opt.step(lr=1e-3)
            ref.step(lr=1e-3)
    np.testing.assert_allclose(p.flat, q.flat, rtol=RTOL, atol=ATOL)
    assert opt.param_groups[0]["lr"] == 1e-3
    # a structural change is refused before any communication, on every rank
    opt.param_groups[0]["amsgrad"] = True
    try:
        opt.step()
    except ValueError as e:
        assert "amsgrad" in str(e)
    else:
        raise AssertionError("amsgrad change accepted")


def check_layout_mismatch():
    shapes = dict(SHAPES, e=(301 + (RANK == P - 1),))
    p = optcore.Parameters(shapes)
    for what, call in [("ShardedOptimizer", lambda: D.ShardedOptimizer(optcore.Adam, p, comm)),
                       ("allreduce_grads_", lambda: D.allreduce_grads_(p, comm))]:
        before = p.grads.flat.copy()
        try:
            call()
        except ValueError as e:
            assert "disagree" in str(e) and "layout" in str(e), str(e)
        else:
            raise AssertionError(f"{what}: no error on rank {RANK}")
        assert np.array_equal(before, p.grads.flat)
    # an argument error on one rank only: every rank raises, none hangs
    q = init_params()
    odd = RANK == 1
    for word, call in [
        ("lr", lambda: D.ShardedOptimizer(optcore.Adam, q, comm, lr=-1.0 if odd else 1e-3)),
        ("op", lambda: D.allreduce_grads_(q, comm, op="max" if odd else "mean")),
        ("norm_type", lambda: D.global_norm(q, comm, norm_type=3 if odd else 2)),
        ("max_norm", lambda: D.clip_grad_norm_(q, comm, -1.0 if odd else 1.0)),
    ]:
        try:
            call()
        except ValueError as e:
            assert word in str(e), str(e)
        else:
            raise AssertionError(f"{word}: no error on rank {RANK}")


def check_nan_rank():
    p = init_params()
    write_grads(p, grads64(p, 0, [RANK]))
    if RANK == P - 1:
        p.grads["e"][5] = np.nan
    D.allreduce_grads_(p, comm)
    assert np.isnan(p.grads["e"][5]) and np.isfinite(np.delete(p.grads.flat, p.layout.offsets["e"] + 5)).all()
    assert np.isnan(D.global_norm(p, comm))
    for policy in ("skip", "raise", "propagate"):
        p = init_params()
        opt = D.ShardedOptimizer(optcore.Adam, p, comm, nonfinite=policy, clip=GlobalNorm(1.0))
        write_grads(p, grads64(p, 0, [RANK]))
        opt.step()
        write_grads(p, grads64(p, 1, [RANK]))
        if RANK == P - 1:
            p.grads["W"][0, 0] = np.inf
        before = p.flat.copy()
        state = opt.state_dict(root=None)
        try:
            rec = opt.step()
        except FloatingPointError:
            assert policy == "raise"
            rec = None
        if policy in ("skip", "raise"):
            assert rec is None or (rec.skipped and np.isinf(rec.grad_norm))
            assert np.array_equal(before, p.flat)
            after = opt.state_dict(root=None)
            # everything but the skip counter is unchanged; the counter counts the skip
            assert all(np.array_equal(np.asarray(after[k]), np.asarray(state[k]))
                       for k in state if k != "skipped_steps")
            assert after["skipped_steps"] == opt.skipped_steps == (policy == "skip")
            assert opt.state_steps == [1]
        else:
            assert not rec.skipped and np.isinf(rec.grad_norm) and rec.clip_factor == 0.0
            assert np.isnan(p.flat).any()  # inf * 0 -> NaN, as torch's clip_grad_norm_
        same_on_all_ranks(p.flat)


def check_bucketed_list():
    p = init_params()
    write_grads(p, grads64(p, 0, [RANK]))
    q = init_params()
    q.grads.flat[...] = p.grads.flat
    D.allreduce_grads_(p, comm)
    arrays = [q.grads[n] for n in q]
    D.allreduce_grads_(arrays, comm, op="sum", bucket_bytes=256)
    for n in q:
        np.testing.assert_allclose(q.grads[n] / P, p.grads[n], rtol=1e-6)
    same_on_all_ranks(q.grads.flat)


def check_tiny_arena():
    """An arena smaller than P shards of 16 elements: some ranks own nothing."""
    p = optcore.Parameters({"a": (5,), "c": (3,)})
    q = optcore.Parameters({"a": (5,), "c": (3,)})
    opt = D.ShardedOptimizer(optcore.NAdam, p, comm, lr=1e-2)
    ref = optcore.NAdam(q, lr=1e-2)
    for s in range(3):
        r = [np.random.default_rng([s, k]).uniform(1, 2, 8) for k in range(P)]
        p.grads.flat[:8] = r[RANK]
        q.grads.flat[:8] = np.mean(r, axis=0)
        opt.step()
        ref.step()
    np.testing.assert_allclose(p.flat, q.flat, rtol=RTOL, atol=ATOL)
    state = opt.state_dict(root=None)
    want = ref.state_dict()
    for k in want:
        if ".state." in k:
            np.testing.assert_allclose(state[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(state["group0.scalar.mu_product"]) == want["group0.scalar.mu_product"]


class CountingComm(MPI.Intracomm):
    """COMM_WORLD, recording the gradient-sized MPI calls made through it."""

    def __init__(self, comm):
        super().__init__()
        self.calls = []

    def __new__(cls, comm):
        return super().__new__(cls, comm)


for _name in ("Allreduce", "Iallreduce", "Reduce_scatter", "Allgatherv"):
    def _counted(self, *args, _name=_name, **kwargs):
        self.calls.append(_name)
        return getattr(MPI.Intracomm, _name)(self, *args, **kwargs)
    setattr(CountingComm, _name, _counted)


def check_messages_per_step():
    """One Allreduce per step for an arena; one Iallreduce per bucket; one per array for a
    list; one Reduce_scatter + one Allgatherv per sharded step."""
    c = CountingComm(comm)
    p = init_params()
    write_grads(p, grads64(p, 0, [RANK]))
    D.allreduce_grads_(p, c)
    assert c.calls == ["Allreduce"], c.calls
    c.calls.clear()
    nbytes = p.grads.flat.nbytes
    D.allreduce_grads_(p, c, bucket_bytes=1024)
    assert c.calls == ["Iallreduce"] * -(-nbytes // 1024), c.calls
    c.calls.clear()
    D.allreduce_grads_([p.grads[n] for n in p], c)
    assert c.calls == ["Iallreduce"] * len(p), c.calls
    for clip in (None, GlobalNorm(1.0)):
        opt = D.ShardedOptimizer(optcore.Adam, p, c, clip=clip)
        c.calls.clear()
        opt.step()
        assert c.calls == ["Reduce_scatter", "Allgatherv"], c.calls


def save_checkpoint():
    """2 ranks: N_STEPS sharded Adam steps; rank 0 saves parameters + gathered state."""
    cls, hyper = OPTIMIZERS["adam"]
    p = init_params()
    opt = D.ShardedOptimizer(cls, p, comm, groups=GROUPS, **hyper)
    for s in range(N_STEPS):
        write_grads(p, grads64(p, s, [RANK]))
        opt.step()
    state = opt.state_dict()
    if RANK == 0:
        np.savez(os.path.join(OUT, "ckpt-2.npz"), **p.state_dict(), **state)
    comm.Barrier()
    ckpt = dict(np.load(os.path.join(OUT, "ckpt-2.npz"), allow_pickle=False))
    check_resume(ckpt)


def check_resume(ckpt):
    """Resume a 2-rank checkpoint on this communicator for N_STEPS more steps; compare with
    2N steps of the reference (first N on 2 ranks' batches, then on P ranks' batches)."""
    cls, hyper = OPTIMIZERS["adam"]
    p = init_params()
    opt = D.ShardedOptimizer(cls, p, comm, groups=GROUPS, **hyper)
    p.load_state_dict(ckpt)
    opt.load_state_dict(ckpt)
    assert opt.state_steps == [N_STEPS, N_STEPS]
    for s in range(N_STEPS, 2 * N_STEPS):
        write_grads(p, grads64(p, s, [RANK]))
        opt.step()
    q = init_params()
    ref = cls(q, groups=GROUPS, **hyper)
    for s in range(N_STEPS):
        write_grads(q, grads64(q, s, range(2)))
        ref.step()
    for s in range(N_STEPS, 2 * N_STEPS):
        write_grads(q, grads64(q, s, range(P)))
        ref.step()
    np.testing.assert_allclose(p.flat, q.flat, rtol=RTOL, atol=ATOL)
    same_on_all_ranks(p.flat)


def main():
    checks = {}
    for name in OPTIMIZERS:
        for clip in (False, True):
            checks[f"allreduce-{name}-{'clip' if clip else 'noclip'}"] = (
                lambda n=name, c=clip: check_allreduce(n, c, 4096 if c else None))
            checks[f"sharded-{name}-{'clip' if clip else 'noclip'}"] = (
                lambda n=name, c=clip: check_sharded(n, c))
        checks[f"sharded-matches-allreduce-{name}"] = lambda n=name: check_sharded_matches_allreduce(n)
    checks["allreduce-adam-clip_grad_norm_"] = lambda: check_allreduce("adam", True, None, True)
    checks["lr-change"] = check_lr_change
    checks["layout-mismatch"] = check_layout_mismatch
    checks["nan-rank"] = check_nan_rank
    checks["bucketed-list"] = check_bucketed_list
    checks["tiny-arena"] = check_tiny_arena
    checks["messages-per-step"] = check_messages_per_step
    if P == 2:
        checks["checkpoint-save-2-resume-2"] = save_checkpoint
    if RESUME is not None:
        checks[f"checkpoint-resume-{P}"] = lambda: check_resume(
            dict(np.load(RESUME, allow_pickle=False)))
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            err = None
        except Exception:  # reported per check, by rank
            err = f"rank {RANK}: {traceback.format_exc(limit=4)}"
        errors = comm.gather(err, root=0)
        if RANK == 0:
            bad = [e for e in errors if e is not None]
            results[name] = bad[0] if bad else "ok"
    if RANK == 0:
        with open(os.path.join(OUT, f"results-{P}.json"), "w") as f:
            json.dump(results, f, indent=1)


main()
