"""Shared machinery of the pytest-benchmark suite.

- ``OPTCORE_BENCH_SMOKE=1`` shrinks every size to at most 64k elements, so that
  ``pytest bench --benchmark-disable`` runs every benchmark once, in seconds (the CI smoke run).
- The session fixture ``probe_limits`` measures the roofline probe (``optcore.bench``) once.
- ``deepspeed_cpu_adam`` builds DeepSpeed's CPU Adam, the baseline of the Adam benchmarks
  beside torch's (skipped when DeepSpeed is not installed).
- For every benchmark whose ``extra_info`` has ``bytes`` and ``pattern`` (one of ``adam``,
  ``sgd``, ``sumsq``, ``triad``, ``copy``; ``threads`` defaults to 1), the autouse fixture below
  adds, after the run: ``gbps`` (bytes / fastest round), ``gbps_median``, ``limit_gbps`` (the
  probe's bandwidth for that pattern at that thread count, measured in the same session) and
  ``of_limit`` (gbps / limit_gbps). They are saved with ``--benchmark-autosave`` /
  ``--benchmark-json`` and summarised at the end of the run.

Bench files set ``benchmark.extra_info.update(elements=..., bytes=..., pattern=..., threads=...,
isa=...)`` and, where a round mutates state, time with ``benchmark.pedantic(fn, setup=reset,
rounds=..., iterations=1, warmup_rounds=1)``.
"""
import os

import pytest

import optcore
from optcore import bench as ob

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")
SMOKE_MAX_ELEMENTS = 1 << 16
SMOKE_MAX_TENSORS = 64


def layout(spec):
    """The :class:`optcore.bench.Layout` of ``spec``; in smoke mode, shrunk to at most
    SMOKE_MAX_ELEMENTS elements and SMOKE_MAX_TENSORS tensors with the same kind of structure
    (one tensor or many)."""
    lay = ob.parse_size(spec)
    if not SMOKE:
        return lay
    if lay.ntensors == 1:
        return ob.Layout(spec, [(min(lay.elements, SMOKE_MAX_ELEMENTS // 2),)])
    sizes = lay.sizes[:SMOKE_MAX_TENSORS]
    per = max(1, SMOKE_MAX_ELEMENTS // (2 * len(sizes)))
    return ob.Layout(spec, [(min(s, per),) for s in sizes])


def deepspeed_cpu_adam(params, name, hyper, **kw):
    """:func:`optcore.torch.training.deepspeed_adam` (DeepSpeed's CPU Adam) over ``params`` with
    the hyper-parameters ``hyper`` of optimizer ``name``; ``kw`` goes to DeepSpeed's class.
    Skips the benchmark when DeepSpeed is not installed (``pip install
    ".[deepspeed-baseline]"``)."""
    pytest.importorskip("deepspeed.ops.adam")
    from optcore.torch.training import deepspeed_adam

    return deepspeed_adam(params, name, **hyper, **kw)


class ProbeLimits:
    """The probe's GB/s per pattern and thread count, measured once per thread count."""

    def __init__(self, elements, repeats):
        self.elements = elements
        self.repeats = repeats
        self.gbps = {p: {} for p in ob.PATTERNS}

    def measure(self, threads):
        missing = [t for t in threads if t not in self.gbps["adam"]]
        if missing:
            for p, v in ob.measure_probe(self.elements, missing, self.repeats).items():
                self.gbps[p].update(v)

    def limit(self, pattern, threads):
        if pattern not in self.gbps:
            raise ValueError(f"extra_info pattern {pattern!r} is not one of {ob.PATTERNS}")
        self.measure([threads])
        return self.gbps[pattern][threads]


@pytest.fixture(scope="session")
def probe_limits():
    probe = ProbeLimits(SMOKE_MAX_ELEMENTS if SMOKE else 1 << 24, 2 if SMOKE else 5)
    n = optcore.get_num_threads()
    probe.measure(sorted({1, 2, n}))
    return probe


_RESULTS = []


def _disabled(config):
    return bool(config.getoption("benchmark_disable", False)) or not config.pluginmanager.hasplugin(
        "benchmark")


@pytest.fixture(autouse=True)
def _bandwidth_extra_info(request):
    """Record GB/s and the fraction of the probe's limit for benchmarks that declare bytes."""
    if "benchmark" not in request.fixturenames or _disabled(request.config):
        yield
        return
    probe = request.getfixturevalue("probe_limits")
    yield
    bm = request.node.funcargs.get("benchmark")
    info = getattr(bm, "extra_info", None)
    stats = getattr(getattr(bm, "stats", None), "stats", None)
    if not info or stats is None or "bytes" not in info or "pattern" not in info:
        return
    threads = int(info.get("threads", 1))
    limit = probe.limit(info["pattern"], threads)
    gbps = info["bytes"] / stats.min / 1e9
    info.update(gbps=gbps, gbps_median=info["bytes"] / stats.median / 1e9, limit_gbps=limit,
                of_limit=gbps / limit)
    _RESULTS.append((bm.group or "", bm.name, gbps, limit))


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("bandwidth (fastest round) vs the probe's limit for the same pattern and threads")
    width = max(len(name) for _, name, _, _ in _RESULTS)
    for group, name, gbps, limit in sorted(_RESULTS):
        tr.write_line(f"{name:<{width}}  {gbps:8.1f} GB/s  {100 * gbps / limit:5.0f}% of "
                      f"{limit:.1f}")
