"""Parameter transforms: ``ema_update_`` and ``max_norm_`` beside NumPy (and torch when
installed) in the same pytest-benchmark group.

- EMA ``a = d a + (1 - d) p``: one flat buffer of 1M and 16M elements. Memory traffic of a
  triad (read a and p, write a: 12 bytes per element). NumPy baseline: three in-place ufunc
  calls with a preallocated scratch buffer (no allocation per round); torch: ``lerp_``.
- max-norm with every unit above the bound (the worst case: norm pass, then a read-modify-write
  pass, 12 bytes per element): dense ``(in, out)`` with ``axis=0`` (column units) and conv
  ``(out, in, 3, 3)`` with ``axis=(1, 2, 3)`` (row units). NumPy baseline: ``einsum`` norms,
  factor, in-place multiply; torch: ``renorm_``. Each round starts from the same weights
  (reset untimed in ``setup``).

Group ``<kernel>-<layout>-<threads>t``. ``OPTCORE_BENCH_SMOKE=1`` shrinks the sizes to at most
64k elements so that ``pytest bench --benchmark-disable`` runs everything once in seconds.
"""
import os

import numpy as np
import pytest

import optcore
from optcore.kernels import ema_update_, max_norm_

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")
THREADS = [1, 2]
IMPLS = ["optcore", "numpy", "torch"]

EMA_SIZES = {"1M": 1 << 20, "16M": 1 << 24}
SMOKE_EMA = 1 << 15
# name: (shape, axis, torch renorm dim)
NORM_LAYOUTS = {
    "dense-1024x1024": ((1024, 1024), 0, 1),
    "dense-4096x4096": ((4096, 4096), 0, 1),
    "conv-512x512x3x3": ((512, 512, 3, 3), (1, 2, 3), 0),
}
SMOKE_NORM = {
    "dense-1024x1024": (128, 256),
    "dense-4096x4096": (256, 256),
    "conv-512x512x3x3": (64, 64, 3, 3),
}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _info(benchmark, elements, nbytes, threads, impl, torch):
    isa = optcore.config()["isa"] if impl != "torch" else torch.backends.cpu.get_cpu_capability()
    benchmark.extra_info.update(elements=elements, bytes=nbytes, pattern="triad", threads=threads,
                                isa=isa, impl=impl)


def _rounds(elements):
    return 10 if elements >= (8 << 20) else 30


@pytest.fixture
def threads():
    torch = _torch()
    before = torch.get_num_threads() if torch is not None else None
    yield
    optcore.set_num_threads(None)
    if torch is not None:
        torch.set_num_threads(before)


def _set_threads(n, impl):
    optcore.set_num_threads(n)
    torch = _torch()
    if impl == "torch":
        torch.set_num_threads(n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("size", list(EMA_SIZES))
def test_ema_update(benchmark, threads, size, nthreads, impl):
    torch = _torch()
    if impl == "torch" and torch is None:
        pytest.skip("torch is not installed")
    n = SMOKE_EMA if SMOKE else EMA_SIZES[size]
    rng = np.random.default_rng(0)
    avg = rng.standard_normal(n).astype(np.float32)
    p = rng.standard_normal(n).astype(np.float32)
    d = 0.999
    _set_threads(nthreads, impl)
    if impl == "optcore":
        fn = lambda: ema_update_(avg, p, d)  # noqa: E731
    elif impl == "numpy":
        scratch = np.empty_like(p)
        dc = np.float32(1.0 - d)

        def fn():
            np.multiply(p, dc, out=scratch)
            np.multiply(avg, np.float32(d), out=avg)
            np.add(avg, scratch, out=avg)
    else:
        ta, tp = torch.from_numpy(avg), torch.from_numpy(p)
        fn = lambda: ta.lerp_(tp, 1.0 - d)  # noqa: E731
    benchmark.group = f"ema_update-{size}-{nthreads}t"
    _info(benchmark, n, 12 * n, nthreads, impl, torch)
    benchmark.pedantic(fn, rounds=_rounds(n), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("layout", list(NORM_LAYOUTS))
def test_max_norm(benchmark, threads, layout, nthreads, impl):
    torch = _torch()
    if impl == "torch" and torch is None:
        pytest.skip("torch is not installed")
    shape, axis, dim = NORM_LAYOUTS[layout]
    if SMOKE:
        shape = SMOKE_NORM[layout]
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(shape).astype(np.float32)
    w = w0.copy()
    c = 1.0  # every unit (norm ~ sqrt(fan)) is above the bound: both passes run in full
    _set_threads(nthreads, impl)
    if impl == "optcore":
        fn = lambda: max_norm_(w, c, axis)  # noqa: E731
    elif impl == "numpy":
        if axis == 0:
            def fn():
                norm = np.sqrt(np.einsum("ij,ij->j", w, w))
                np.multiply(w, np.where(norm > c, c / (norm + 1e-7), 1.0).astype(np.float32), out=w)
        else:
            def fn():
                flat = w.reshape(shape[0], -1)
                norm = np.sqrt(np.einsum("ij,ij->i", flat, flat))
                flat *= np.where(norm > c, c / (norm + 1e-7), 1.0).astype(np.float32)[:, None]
    else:
        tw = torch.from_numpy(w)
        fn = lambda: tw.renorm_(2, dim, c)  # noqa: E731

    def reset():
        np.copyto(w, w0)

    benchmark.group = f"max_norm-{layout}-{nthreads}t"
    _info(benchmark, w.size, 12 * w.size, nthreads, impl, torch)
    benchmark.pedantic(fn, setup=reset, rounds=_rounds(w.size), iterations=1, warmup_rounds=1)
