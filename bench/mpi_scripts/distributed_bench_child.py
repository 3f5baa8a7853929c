"""Measurements of optcore.distributed under ``mpiexec -n P`` (run by
bench/test_distributed_bench.py). Usage: ``mpiexec -n P python distributed_bench_child.py
N_ELEMENTS REPEATS OUT.json``. Rank 0 writes the results:

- ``*_s``: median over REPEATS of the slowest rank's time for one call (a Barrier before each);
- ``allreduce_raw_s``: the baseline, one ``MPI_Allreduce`` of the same number of floats;
- ``*_payload_bytes``: bytes handed to MPI per rank per step (sent + received buffers);
  ``ring_bytes_per_rank``: what a ring algorithm moves per rank, 2 (P-1)/P * 4 N, the same
  for an all-reduce and for a reduce-scatter + all-gather;
- ``*_state_bytes``: optimizer state per rank, measured with tracemalloc around construction
  (NumPy reports its allocations to it) and from the optimizers' own state arrays.
"""
import json
import statistics
import sys
import time
import tracemalloc

import numpy as np
from mpi4py import MPI

import optcore
from optcore import distributed as D
from optcore.clip import GlobalNorm

comm = MPI.COMM_WORLD
P, RANK = comm.Get_size(), comm.Get_rank()
N, REPEATS, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# a model-like arena: a few large tensors and many small ones
shapes = {f"w{i}": (N // 4 - 64,) for i in range(4)}
shapes.update({f"b{i}": (16,) for i in range(16)})


def timed(fn):
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        dt = np.array([time.perf_counter() - t])
        comm.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
        times.append(float(dt[0]))
    return statistics.median(times)


def fill(p):
    p.grads.flat[...] = np.float32(1e-3 * (RANK + 1))


def traced(make):
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    obj = make()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, after - before


res = {"ranks": P, "elements": 0, "threads": optcore.get_num_threads(),
       "mpi": MPI.Get_library_version().splitlines()[0].strip()}
params = optcore.Parameters(shapes)
n = params.layout.total
res["elements"] = n
fill(params)
raw = np.ones(n, np.float32)
res["allreduce_raw_s"] = timed(lambda: comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM))
res["allreduce_grads_s"] = timed(lambda: D.allreduce_grads_(params, comm))
res["allreduce_grads_bucketed_4MiB_s"] = timed(
    lambda: D.allreduce_grads_(params, comm, bucket_bytes=4 << 20))

plain, plain_bytes = traced(lambda: optcore.Adam(params, lr=1e-6))


def plain_step():
    D.allreduce_grads_(params, comm)
    plain.step()


res["step_allreduce_adam_s"] = timed(plain_step)
del plain
sharded, sharded_bytes = traced(lambda: D.ShardedOptimizer(optcore.Adam, params, comm, lr=1e-6))
res["step_sharded_adam_s"] = timed(sharded.step)
clipped = D.ShardedOptimizer(optcore.Adam, params, comm, lr=1e-6, clip=GlobalNorm(1.0))
res["step_sharded_adam_clip_s"] = timed(clipped.step)

res["allreduce_payload_bytes"] = 2 * 4 * n
res["sharded_payload_bytes"] = 4 * n + 4 * (n // P) + 4 * (n // P) + 4 * n
res["ring_bytes_per_rank"] = 2 * (P - 1) * 4 * n // P
res["unsharded_state_bytes_traced"] = plain_bytes
res["sharded_state_bytes_traced"] = sharded_bytes   # state + the 1/P gradient shard buffer
res["sharded_state_bytes"] = sharded.state_nbytes
res["unsharded_state_bytes"] = 2 * 4 * n
res["state_ratio"] = sharded.state_nbytes / (2 * 4 * n)
everyone = comm.gather(res, root=0)
if RANK == 0:
    res["sharded_state_bytes_per_rank"] = [r["sharded_state_bytes"] for r in everyone]
    res["sharded_state_bytes_traced_per_rank"] = [r["sharded_state_bytes_traced"] for r in everyone]
    res["gbs_allreduce_raw"] = res["ring_bytes_per_rank"] / res["allreduce_raw_s"] / 1e9
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)
