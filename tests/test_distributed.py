"""Tests of optcore.distributed.

The multi-process checks run ``tests/mpi_scripts/distributed_checks.py`` under ``mpiexec -n 2``
and ``-n 3`` (one launch each: MPI start-up dominates) and report here one test per check; the
size-1 behaviour and argument checking run in-process on ``MPI.COMM_SELF``. Skipped when
mpi4py or mpiexec is absent (``pip install 'optcore[mpi]'`` brings both).
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optcore

MPI = pytest.importorskip("mpi4py.MPI")
from optcore import distributed as D  # noqa: E402
from optcore.clip import GlobalNorm, PerTensorNorm, Value  # noqa: E402

SCRIPT = Path(__file__).parent / "mpi_scripts" / "distributed_checks.py"
OPTIMIZERS = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax", "nadam"]
CHECKS = [f"{kind}-{o}-{c}" for o in OPTIMIZERS for kind in ("allreduce", "sharded")
          for c in ("noclip", "clip")]
CHECKS += [f"sharded-matches-allreduce-{o}" for o in OPTIMIZERS]
CHECKS += ["allreduce-adam-clip_grad_norm_", "lr-change", "layout-mismatch", "nan-rank",
           "bucketed-list", "tiny-arena", "messages-per-step"]


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _launch(n, outdir, *extra):
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'optcore[mpi]')")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               # MPICH's hydra: start the ranks locally with fork (no ssh) in containers
               HYDRA_LAUNCHER="fork",
               # Open MPI: allow root (CI containers) and more ranks than cores
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    proc = subprocess.run([exe, "-n", str(n), sys.executable, str(SCRIPT), str(outdir), *extra],
                          capture_output=True, text=True, timeout=180, env=env)
    result = Path(outdir) / f"results-{n}.json"
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"mpiexec -n {n} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def mpi_outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mpi")


@pytest.fixture(scope="module")
def results2(mpi_outdir):
    return _launch(2, mpi_outdir)


@pytest.fixture(scope="module")
def results3(mpi_outdir, results2):
    # 3 ranks (uneven shards) also resume the checkpoint the 2-rank run saved
    return _launch(3, mpi_outdir, str(mpi_outdir / "ckpt-2.npz"))


def test_every_check_ran(results2, results3):
    assert set(results2) == set(CHECKS) | {"checkpoint-save-2-resume-2"}
    assert set(results3) == set(CHECKS) | {"checkpoint-resume-3"}


@pytest.mark.parametrize("check", CHECKS + ["checkpoint-save-2-resume-2"])
def test_two_ranks(results2, check):
    assert results2[check] == "ok", results2[check]


@pytest.mark.parametrize("check", CHECKS + ["checkpoint-resume-3"])
def test_three_ranks_uneven(results3, check):
    assert results3[check] == "ok", results3[check]


# -- in process: a communicator of size 1 ---------------------------------------------------

SELF = MPI.COMM_SELF
SHAPES = {"w": (120, 300), "b": (300,), "v": (37,)}   # > 32768 elements: several chunks
HYPER = {
    optcore.SGD: dict(lr=1e-2, momentum=0.9, nesterov=True),
    optcore.AdaGrad: dict(lr=1e-2, lr_decay=1e-3),
    optcore.RMSProp: dict(lr=1e-2, centered=True),
    optcore.Adam: dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    optcore.AdamW: dict(lr=1e-2),
    optcore.AdaMax: dict(lr=1e-2),
    optcore.NAdam: dict(lr=1e-2),
}
GROUPS = [{"params": ["b", "v"], "weight_decay": 0.0}]


def _params(seed=0):
    p = optcore.Parameters(SHAPES)
    r = np.random.default_rng(seed)
    for n in p:
        p[n] = r.standard_normal(p[n].shape)
    return p


def _grads(p, step):
    r = np.random.default_rng(100 + step)
    for n in p:
        p.grads[n] = r.standard_normal(p[n].shape)


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


@pytest.mark.parametrize("cls", list(HYPER), ids=lambda c: c.__name__)
def test_size_one_is_the_plain_optimizer_bitwise(cls):
    p, q = _params(), _params()
    plain = cls(p, groups=GROUPS, **HYPER[cls])
    sharded = D.ShardedOptimizer(cls, q, SELF, groups=GROUPS, **HYPER[cls])
    for s in range(3):
        _grads(p, s)
        _grads(q, s)
        plain.step()
        rec = sharded.step()
        assert rec == optcore.StepResult(None, 1.0, False, None, True)
    assert np.array_equal(p.flat, q.flat)
    _state_equal(plain.state_dict(), sharded.state_dict())
    # and its checkpoint loads into a plain optimizer, and back
    again = cls(_params(), groups=GROUPS, **HYPER[cls])
    again.load_state_dict(sharded.state_dict())
    _state_equal(again.state_dict(), plain.state_dict())
    back = D.ShardedOptimizer(cls, _params(), SELF, groups=GROUPS, **HYPER[cls])
    back.load_state_dict(plain.state_dict())
    _state_equal(back.state_dict(root=None), plain.state_dict())
    assert sharded.state_nbytes == sum(v.nbytes for k, v in plain.state_dict().items()
                                       if ".state." in k)


def test_size_one_l1_matches_plain():
    """The fused L1 proximal step reaches the sharded update (it shares Optimizer._update)."""
    p, q = _params(), _params()
    plain = optcore.Adam(p, lr=1e-2, l1=0.5)
    sharded = D.ShardedOptimizer(optcore.Adam, q, SELF, lr=1e-2, l1=0.5)
    for s in range(3):
        _grads(p, s)
        _grads(q, s)
        plain.step()
        sharded.step()
    assert np.count_nonzero(p.flat == 0) > 0  # L1 made exact zeros
    assert np.array_equal(p.flat, q.flat)


def test_size_one_clipping_matches_clip_then_plain_step():
    p, q = _params(), _params()
    plain = optcore.Adam(p, lr=1e-2)
    sharded = D.ShardedOptimizer(optcore.Adam, q, SELF, lr=1e-2, clip=GlobalNorm(10.0))
    for s in range(3):
        _grads(p, s)
        _grads(q, s)
        g = p.grads.flat.astype(np.float64)
        want = math.sqrt(g @ g)
        norm = D.global_norm(p, SELF)  # the norm pass, checked against float64 below
        factor = min(1.0, 10.0 / (norm + 1e-6))
        p.grads.flat[...] *= np.float32(factor)  # the kernel multiplies by float32(factor) too
        plain.step()
        rec = sharded.step()
        assert rec.grad_norm == norm == pytest.approx(want, rel=1e-8)
        assert rec.clip_factor == factor and not rec.skipped
    assert np.array_equal(p.flat, q.flat)


def test_size_one_fused_clipping_matches_plain_optimizer():
    """Same policies as the plain optimizer's ``clip=``: Value bitwise; GlobalNorm to the last
    bits of the float64 norm (the plain optimizer sums per tensor, the shard over the flat
    arena, so the float32 clip factor may differ by an ulp)."""
    for policy, exact in ((Value(0.5), True), (GlobalNorm(10.0), False),
                          (GlobalNorm(0.5, norm_type="inf"), False)):
        p, q = _params(), _params()
        plain = optcore.Adam(p, lr=1e-2, clip=policy)
        sharded = D.ShardedOptimizer(optcore.Adam, q, SELF, lr=1e-2, clip=policy)
        for s in range(3):
            _grads(p, s)
            _grads(q, s)
            a, b = plain.step(), sharded.step()
            assert a.clip_factor == pytest.approx(b.clip_factor, rel=1e-6)
            if a.grad_norm is not None:
                assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-8)
        if exact:
            assert np.array_equal(p.flat, q.flat)
        else:
            np.testing.assert_allclose(p.flat, q.flat, rtol=1e-6, atol=1e-7)


def test_size_one_allreduce_is_identity():
    p = _params()
    _grads(p, 0)
    before = p.grads.flat.copy()
    for op in ("mean", "sum"):
        for bucket in (None, 1000):
            D.allreduce_grads_(p, SELF, op=op, bucket_bytes=bucket)
            D.allreduce_grads_([p.grads[n] for n in p], SELF, op=op, bucket_bytes=bucket)
    assert np.array_equal(before, p.grads.flat)


def test_determinism_across_threads():
    out = []
    for threads in (1, 2):
        optcore.set_num_threads(threads)
        p = _params()
        opt = D.ShardedOptimizer(optcore.Adam, p, SELF, clip=GlobalNorm(5.0))
        for s in range(2):
            _grads(p, s)
            opt.step()
        out.append(p.flat.copy())
    assert np.array_equal(out[0], out[1])


def test_resume_two_rank_checkpoint_with_one(results2, mpi_outdir):
    """The 2-rank run's checkpoint loads into the plain optimizer and a size-1 sharded one."""
    ckpt = dict(np.load(mpi_outdir / "ckpt-2.npz", allow_pickle=False))
    shapes = {"W": (4, 37), "b": (4,), "e": (301,)}
    groups = [{"params": ["b"], "weight_decay": 0.0}]
    results = []
    for make in (lambda p: optcore.Adam(p, groups=groups, lr=1e-2, weight_decay=1e-2),
                 lambda p: D.ShardedOptimizer(optcore.Adam, p, SELF, groups=groups, lr=1e-2,
                                              weight_decay=1e-2)):
        p = optcore.Parameters(shapes)
        opt = make(p)
        p.load_state_dict(ckpt)
        opt.load_state_dict(ckpt)
        assert opt.state_steps == [4, 4]
        for s in range(2):
            r = np.random.default_rng(s)
            for n in p:
                p.grads[n] = r.standard_normal(p[n].shape)
            opt.step()
        results.append(p.flat.copy())
    assert np.array_equal(results[0], results[1])


# -- global norm ----------------------------------------------------------------------------

def _norm64(arrays):
    flat = [a.astype(np.float64).ravel() for a in arrays]
    return math.sqrt(math.fsum(float(np.dot(f, f)) for f in flat))


@pytest.mark.parametrize("n", [0, 5, 4096, 4097, 70001])
def test_global_norm_float64_reference(rng, n):
    # mixed magnitudes 1e-30 .. 1e18: the norm kernel of optcore.clip (float32 lanes over
    # short blocks folded into float64) is specified within 1e-6 relative of float64
    a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 18, n)).astype(np.float32)
    assert D.global_norm(a, SELF) == pytest.approx(_norm64([a]), rel=1e-6, abs=0)
    assert D.global_norm(a, SELF, partitioned=True) == D.global_norm(a, SELF)
    assert D.global_norm(a, SELF, norm_type=np.inf) == (float(np.max(np.abs(a))) if n else 0.0)


def test_global_norm_overflowing_block_is_finite():
    a = np.full(10000, 3e19, np.float32)  # squares overflow float32, values are finite
    assert D.global_norm(a, SELF) == pytest.approx(_norm64([a]), rel=1e-8)
    a[1] = np.inf
    assert D.global_norm(a, SELF) == math.inf
    assert D.global_norm(a, SELF, norm_type="inf") == math.inf
    a[2] = np.nan
    assert math.isnan(D.global_norm(a, SELF))


def test_clip_grad_norm_matches_torch_formula(rng):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (10, 5000, 3)]
    want = [a.copy() for a in arrays]
    norm = _norm64(want)
    got = D.clip_grad_norm_(arrays, SELF, 1.5)
    assert got == pytest.approx(norm, rel=1e-8)
    for a, w in zip(arrays, want):
        assert np.array_equal(a, w * np.float32(1.5 / (norm + 1e-6)))
    before = [a.copy() for a in arrays]
    D.clip_grad_norm_(arrays, SELF, 1e9)  # factor 1: nothing rewritten
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))


def test_clip_matches_torch(rng):
    torch = pytest.importorskip("torch")
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (10, 5000)]
    t = [torch.tensor(a, requires_grad=True) for a in arrays]
    for x, a in zip(t, arrays):
        x.grad = torch.tensor(a)
    tn = torch.nn.utils.clip_grad_norm_(t, 2.0)
    n = D.clip_grad_norm_(arrays, SELF, 2.0)
    assert n == pytest.approx(float(tn), rel=1e-6)
    for x, a in zip(t, arrays):
        np.testing.assert_allclose(a, x.grad.numpy(), rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**7), st.integers(1, 64))
def test_shard_bounds(total, size):
    b = D.shard_bounds(total, size)
    assert b[0][0] == 0 and b[-1][1] == total and len(b) == size
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))
    assert all(lo % 16 == 0 and lo <= hi for lo, hi in b)
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 16


# -- bad input: clear errors, nothing changed -----------------------------------------------

def test_bad_arguments_change_nothing():
    p = _params()
    _grads(p, 0)
    before = (p.flat.copy(), p.grads.flat.copy())
    cases = [
        (TypeError, "comm", lambda: D.allreduce_grads_(p, "world")),
        (ValueError, "op", lambda: D.allreduce_grads_(p, SELF, op="max")),
        (ValueError, "bucket_bytes", lambda: D.allreduce_grads_(p, SELF, bucket_bytes=0)),
        (TypeError, "bucket_bytes", lambda: D.allreduce_grads_(p, SELF, bucket_bytes=1.5)),
        (TypeError, "float32", lambda: D.allreduce_grads_([np.zeros(3)], SELF)),
        (ValueError, "C-contiguous", lambda: D.allreduce_grads_([p["w"][:, ::2]], SELF)),
        (ValueError, "share memory", lambda: D.allreduce_grads_([p["b"], p["b"][1:]], SELF)),
        (ValueError, "max_norm", lambda: D.clip_grad_norm_(p, SELF, -1.0)),
        (TypeError, "partitioned", lambda: D.global_norm(p, SELF, partitioned=1)),
        (TypeError, "opt_cls", lambda: D.ShardedOptimizer(int, p, SELF)),
        (TypeError, "Parameters", lambda: D.ShardedOptimizer(optcore.Adam, [(p["b"], p.grads["b"])], SELF)),
        (TypeError, "unexpected", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, momentum=0.9)),
        (ValueError, "lr", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, lr=-1.0)),
        (ValueError, "nonfinite", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, nonfinite="ignore")),
        (ValueError, "whole tensors", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, clip=PerTensorNorm(1.0))),
        (TypeError, "clip", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, clip=1.0)),
        (ValueError, "norm_type", lambda: D.global_norm(p, SELF, norm_type=3)),
        (ValueError, "unknown parameter", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, groups=[{"params": ["zz"]}])),
        (ValueError, "more than one group", lambda: D.ShardedOptimizer(optcore.Adam, p, SELF, groups=[{"params": ["b"]}, {"params": ["b"]}])),
    ]
    ro = p.grads.flat.copy()
    ro.flags.writeable = False
    cases.append((ValueError, "read-only", lambda: D.allreduce_grads_(ro, SELF)))
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()
    assert np.array_equal(before[0], p.flat) and np.array_equal(before[1], p.grads.flat)


def test_bad_state_dict_changes_nothing():
    p = _params()
    opt = D.ShardedOptimizer(optcore.Adam, p, SELF, lr=1e-2)
    _grads(p, 0)
    opt.step()
    good = opt.state_dict()
    bad_cases = [
        ("optimizer", optcore.SGD(_params(), momentum=0.9).state_dict()),
        ("names", dict(good, **{"group0.names": np.array(["w", "v", "b"])})),
        ("float32", dict(good, **{"group0.state.exp_avg": good["group0.state.exp_avg"].astype(np.float64)})),
        ("lacks", {k: v for k, v in good.items() if k != "group0.state.exp_avg_sq"}),
    ]
    for word, state in bad_cases:
        with pytest.raises(ValueError, match=word):
            opt.load_state_dict(state)
        _state_equal(opt.state_dict(), good)


def test_nonfinite_policies_size_one():
    for policy in ("skip", "raise"):
        p = _params()
        opt = D.ShardedOptimizer(optcore.Adam, p, SELF, nonfinite=policy)
        _grads(p, 0)
        p.grads["b"][3] = np.nan
        before, state = p.flat.copy(), opt.state_dict()
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="norm"):
                opt.step()
        else:
            rec = opt.step()
            assert rec.skipped and math.isnan(rec.grad_norm) and opt.skipped_steps == 1
        assert np.array_equal(before, p.flat)
        after = opt.state_dict()
        assert after.pop("skipped_steps") == (policy == "skip")  # the skip is counted
        state.pop("skipped_steps")
        _state_equal(after, state)
