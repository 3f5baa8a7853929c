"""Benchmarks of optcore.distributed (pytest-benchmark).

- ``test_mpi_ranks``: launches ``mpiexec -n 2`` on bench/mpi_scripts/distributed_bench_child.py,
  which times (slowest rank, median) one ``MPI_Allreduce`` of the arena's size (the baseline),
  ``allreduce_grads_`` (plain and bucketed), all-reduce + Adam step, and the ZeRO-1 sharded
  Adam step (with and without global-norm clipping), and measures the per-rank optimizer state
  (tracemalloc and the state arrays). The child's numbers are in ``extra_info``; the timing
  pytest-benchmark records is the whole launch.
- ``test_size_one``: in process, the sharded step on ``MPI.COMM_SELF`` beside the plain Adam
  step of the same arena (the wrapper's overhead), same ``group``.

``OPTCORE_BENCH_SMOKE=1`` shrinks the sizes. Skipped without mpi4py (and the launch without
mpiexec).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import optcore

MPI = pytest.importorskip("mpi4py.MPI")
from optcore import distributed as D  # noqa: E402

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE") == "1"
N = 1 << 16 if SMOKE else 1 << 22
REPEATS = 3 if SMOKE else 10
CHILD = Path(__file__).parent / "mpi_scripts" / "distributed_bench_child.py"


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def test_mpi_ranks(benchmark, tmp_path):
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install 'optcore[mpi]')")
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_LAUNCHER="fork",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")

    def launch():
        subprocess.run([exe, "-n", "2", sys.executable, str(CHILD), str(N), str(REPEATS), str(out)],
                       check=True, timeout=300, env=env, capture_output=True)

    benchmark.group = "distributed-mpi"
    benchmark.pedantic(launch, rounds=1, iterations=1)
    res = json.loads(out.read_text())
    benchmark.extra_info.update(res)
    # the sharded optimizer holds 1/P of the state on every rank (up to 16 elements per shard)
    assert abs(res["state_ratio"] - 1 / res["ranks"]) < 1e-3


@pytest.mark.parametrize("kind", ["plain-adam", "sharded-adam-comm-self"])
def test_size_one(benchmark, kind):
    params = optcore.Parameters({"w": (N,), "b": (1000,)})
    params.grads.flat[...] = 1e-3
    if kind == "plain-adam":
        opt = optcore.Adam(params, lr=1e-6)
    else:
        opt = D.ShardedOptimizer(optcore.Adam, params, MPI.COMM_SELF, lr=1e-6)
    benchmark.group = "distributed-size1-step"
    # bytes + pattern: bench/conftest.py records GB/s and the ratio to the Adam-sweep limit
    benchmark.extra_info.update(elements=params.layout.total, bytes=28 * params.layout.total,
                                pattern="adam", threads=optcore.get_num_threads(),
                                isa=optcore.config()["isa"])
    benchmark(opt.step)
    assert np.isfinite(params.flat).all()
