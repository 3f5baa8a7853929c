"""Benchmarks: gradient norms, global-norm clipping, and Adam + clipping in one step.

Run with ``pytest bench/test_clip_bench.py --benchmark-only``; each ``group`` holds optcore (on
float32 gradients, and on bfloat16 ones in the ``-bf16-`` groups)
beside NumPy and (when installed) torch baselines on the same data. ``extra_info`` records
``elements``, ``bytes`` (moved per call by optcore's passes), ``pattern`` ("sumsq" or
"adam"), ``threads`` and ``isa``; GB/s = bytes / time. ``OPTCORE_BENCH_SMOKE=1`` shrinks
every size to at most 64k elements (a quick check that the suite runs).

Targets on the 2-core AVX-512 machine of KERNEL-NOTES.md: the norm pass >= 90% of the
sum-of-squares bandwidth limit at 64M (>= 2x torch); 1000 small tensors >= 10x torch
``clip_grad_norm_``; Adam + clipping >= 1.3x torch ``clip_grad_norm_`` + fused Adam (32
instead of 40 bytes per element).
"""
import math
import os

import numpy as np
import pytest

import optcore
from optcore import clip
from optcore.clip import GlobalNorm

try:
    import torch
except ImportError:  # the torch baselines are skipped
    torch = None

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") == "1"
SMOKE_MAX = 1 << 16


def resnet50_shapes(div=1):
    """Parameter shapes of a ResNet-50 (torch layout), channel widths divided by ``div``."""
    c = lambda n: max(1, n // div)  # noqa: E731
    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    cin = c(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        w, out = c(width), c(width * 4)
        for b in range(blocks):
            shapes += [(w, cin, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,), (out, w, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, cin, 1, 1), (out,), (out,)]
            cin = out
    shapes += [(c(1000), cin), (c(1000),)]
    return shapes


def cases():
    if SMOKE:
        return {
            "flat-16M": [(SMOKE_MAX,)],
            "flat-64M": [(SMOKE_MAX,)],
            "resnet50": resnet50_shapes(div=32),
            "1000x1000": [(64,)] * 1000,
        }
    return {
        "flat-16M": [(1 << 24,)],
        "flat-64M": [(1 << 26,)],
        "resnet50": resnet50_shapes(),
        "1000x1000": [(1000,)] * 1000,
    }


CASES = cases()
ADAM_CASES = [k for k in CASES if k != "flat-64M"]  # 64M Adam state does not fit beside torch's


def make_grads(shapes, seed=0, dtype="float32"):
    """Standard normal gradients, float32 or rounded to ``dtype`` (bfloat16: ml_dtypes)."""
    rng = np.random.default_rng(seed)
    g = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    if dtype == "bfloat16":
        import ml_dtypes

        g = [a.astype(ml_dtypes.bfloat16) for a in g]
    return g


# The norm and clipping groups run on float32 gradients and on bfloat16 ones (``-bf16-``
# groups: read widened in L1, clipping rounds back to nearest). A bfloat16 pass moves 2 bytes
# per element while the probe's "sumsq" pattern reads 4, so its of_limit is the share of the
# float32 norm pass's bandwidth, not of a 16-bit roofline.
DTYPES = {"float32": ("", 4), "bfloat16": ("-bf16", 2)}


def torch_grads(arrays, dtype):
    g = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
    return g if dtype == "float32" else [t.to(torch.bfloat16) for t in g]


def info(benchmark, arrays, bytes_per_element, pattern):
    n = sum(math.prod(a.shape) for a in arrays)
    benchmark.extra_info.update(
        elements=n,
        bytes=n * bytes_per_element,
        pattern=pattern,
        threads=optcore.get_num_threads(),
        isa=optcore.config()["isa"],
    )


def run(benchmark, fn, *args, **kwargs):
    """Benchmark ``fn``; bench/conftest.py turns ``extra_info['bytes']`` into GB/s."""
    return benchmark(fn, *args, **kwargs)


# ---- global norm -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_norm_optcore(benchmark, case, dtype):
    g = make_grads(CASES[case], dtype=dtype)
    suffix, size = DTYPES[dtype]
    benchmark.group = f"global-norm{suffix}-{case}"
    info(benchmark, g, size, "sumsq")
    run(benchmark, clip.global_norm, g)


@pytest.mark.parametrize("case", list(CASES))
def test_norm_optcore_arena(benchmark, case):
    params = optcore.Parameters({f"p{i}": s for i, s in enumerate(CASES[case])})
    for n, a in zip(params, make_grads(CASES[case])):
        params.grads[n] = a
    benchmark.group = f"global-norm-{case}"
    info(benchmark, [params.grads[n] for n in params], 4, "sumsq")
    run(benchmark, clip.global_norm, params.grads)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_norm_numpy_loop(benchmark, case, dtype):
    g = make_grads(CASES[case], dtype=dtype)
    suffix, size = DTYPES[dtype]
    benchmark.group = f"global-norm{suffix}-{case}"
    info(benchmark, g, size, "sumsq")
    flat = [a.reshape(-1) for a in g]

    def norm():
        total = 0.0
        for a in flat:
            w = a.astype(np.float32, copy=False)
            total += float(np.dot(w, w))
        return math.sqrt(total)

    run(benchmark, norm)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_norm_torch_foreach(benchmark, case, dtype):
    g = torch_grads(make_grads(CASES[case]), dtype)
    suffix, size = DTYPES[dtype]
    benchmark.group = f"global-norm{suffix}-{case}"
    info(benchmark, g, size, "sumsq")
    run(benchmark, torch.nn.utils.get_total_norm, g, norm_type=2.0, foreach=True)


# ---- global-norm clipping (norm pass + scaling pass) ---------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_clip_optcore(benchmark, case, dtype):
    g = make_grads(CASES[case], dtype=dtype)
    suffix, size = DTYPES[dtype]
    benchmark.group = f"clip-global-norm{suffix}-{case}"
    info(benchmark, g, 3 * size, "sumsq")
    run(benchmark, clip.clip_by_global_norm_, g, 1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_clip_optcore_arena(benchmark, case):
    params = optcore.Parameters({f"p{i}": s for i, s in enumerate(CASES[case])})
    for n, a in zip(params, make_grads(CASES[case])):
        params.grads[n] = a
    benchmark.group = f"clip-global-norm-{case}"
    info(benchmark, [params.grads[n] for n in params], 12, "sumsq")
    run(benchmark, clip.clip_by_global_norm_, params.grads, 1e-3)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_clip_torch_foreach(benchmark, case, dtype):
    ps = []
    for g in torch_grads(make_grads(CASES[case]), dtype):
        p = torch.empty(g.shape, dtype=g.dtype)
        p.grad = g
        ps.append(p)
    suffix, size = DTYPES[dtype]
    benchmark.group = f"clip-global-norm{suffix}-{case}"
    info(benchmark, [p.grad for p in ps], 3 * size, "sumsq")
    run(benchmark, torch.nn.utils.clip_grad_norm_, ps, 1e-3, foreach=True)


# ---- Adam + global-norm clipping -------------------------------------------------------------


@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_clip_optcore(benchmark, case):
    shapes = CASES[case]
    params = optcore.Parameters({f"p{i}": s for i, s in enumerate(shapes)})
    for n, a in zip(params, make_grads(shapes, seed=1)):
        params.grads[n] = a
    opt = optcore.Adam(params, lr=1e-3, clip=GlobalNorm(1.0))
    benchmark.group = f"adam-clip-{case}"
    info(benchmark, [params[n] for n in params], 32, "adam")
    run(benchmark, opt.step)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_clip_torch_fused(benchmark, case):
    shapes = CASES[case]
    ps = []
    for a in make_grads(shapes, seed=1):
        p = torch.zeros(a.shape, requires_grad=True)
        p.grad = torch.from_numpy(a)
        ps.append(p)
    opt = torch.optim.Adam(ps, lr=1e-3, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
        opt.step()

    benchmark.group = f"adam-clip-{case}"
    info(benchmark, [p.grad for p in ps], 40, "adam")
    run(benchmark, step)

