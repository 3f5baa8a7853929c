"""Measure optcore's kernels against the machine's bandwidth, NumPy and torch.

Two parts, shared by ``optcore bench`` and the pytest-benchmark suite in ``bench/``:

- :func:`measure_probe` times the roofline probe (:mod:`optcore._kernels._probe`: copy,
  STREAM triad, sum of squares, the access patterns of the SGD-momentum and Adam kernels, and
  of Adam with bfloat16 or 8-bit state, bfloat16 parameters and gradients, or a model copy)
  on arrays larger than the caches, at each thread count, best of several repeats. Its GB/s
  are the limits a memory-bound kernel of the same pattern can reach on this machine.
- :func:`run` steps every optimizer on each tensor layout with optcore, with an in-place
  NumPy baseline and with ``torch.optim`` (``fused=True`` where torch has a fused CPU path,
  else ``foreach=True``) when torch is importable, alternating between them and the probe
  sweep of the kernel's access pattern on the same number of elements within each repeat,
  and returns one row per (optimizer, layout, threads). The fraction of the limit is taken
  against that interleaved sweep, which sees the same machine load. (At sizes that fit in the
  caches, each implementation starts from caches the others have partly evicted; beyond the
  caches, from 16M elements, this does not matter.)

Bytes moved count loads and stores of 4-byte elements: 20 per element for SGD with momentum,
AdaGrad and RMSProp (param, grad, one state read; param, state written), 28 for Adam, AdamW,
AdaMax and NAdam (two state buffers). Compare ratios measured in one run, not absolute times
across runs: shared machines are noisy.
"""
import math
import re
import time

import numpy as np

import optcore
from optcore._kernels import _probe
from optcore.params import aligned_zeros

__all__ = ["OPTIMIZERS", "PATTERN", "BYTES_PER_ELEMENT", "Layout", "parse_size", "resnet50_shapes",
           "measure_probe", "make_stepper", "run", "format_table"]

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax", "nadam")

#: Probe pattern whose bandwidth bounds each optimizer's kernel.
PATTERN = {"sgd": "sgd", "adagrad": "sgd", "rmsprop": "sgd", "adam": "adam", "adamw": "adam",
           "adamax": "adam", "nadam": "adam"}

#: Bytes each probe pattern moves per element (loads + stores).
BYTES_PER_ELEMENT = dict(_probe.BYTES_PER_ELEMENT)

PATTERNS = ("copy", "triad", "sumsq", "sgd", "adam", "adam_bf16", "adam_int8", "adam_bf16all",
            "adam_copy")

# Hyper-parameters used everywhere (torch's defaults; SGD with momentum).
HYPER = {
    "sgd": dict(lr=1e-3, momentum=0.9),
    "adagrad": dict(lr=1e-2),
    "rmsprop": dict(lr=1e-2),
    "adam": dict(lr=1e-3),
    "adamw": dict(lr=1e-3, weight_decay=1e-2),
    "adamax": dict(lr=2e-3),
    "nadam": dict(lr=2e-3),
}

_OPTCORE_CLASS = {"sgd": "SGD", "adagrad": "AdaGrad", "rmsprop": "RMSProp", "adam": "Adam",
                  "adamw": "AdamW", "adamax": "AdaMax", "nadam": "NAdam"}
_TORCH_CLASS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
                "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}


# ---- tensor layouts -------------------------------------------------------------------------

class Layout:
    """A named list of tensor shapes to step (e.g. one 16M tensor, 1000 x 1000, ResNet-50)."""

    def __init__(self, name, shapes):
        self.name = name
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.elements = sum(self.sizes)

    @property
    def ntensors(self):
        """Number of tensors in the layout."""
        return len(self.shapes)

    def __repr__(self):
        return f"Layout({self.name!r}, {self.ntensors} tensors, {self.elements} elements)"


def resnet50_shapes():
    """Return the trainable parameter shapes of torchvision's ResNet-50 (161 tensors, 25.6M).

    Convolutions have no bias; every BatchNorm has a weight and a bias; the classifier is
    ``Linear(2048, 1000)``.
    """
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    shapes += [(1000, 2048), (1000,)]
    return shapes


_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_COUNT = r"(\d+)([kKmMgG]?)"


def _count(digits, suffix):
    return int(digits) * _SUFFIX[suffix.lower()]


def parse_size(spec):
    """Parse a layout: ``"16M"`` (one tensor; suffixes k, M, G are powers of 1024), ``"1000x1000"``
    (1000 tensors of 1000 elements), ``"resnet50"``, or ``"flat:<layout>"`` (the same elements
    as one flat buffer). Raises ValueError naming the bad spec."""
    if not isinstance(spec, str):
        raise TypeError(f"size must be a str, got {type(spec).__name__}")
    s = spec.strip()
    if s.startswith("flat:"):
        inner = parse_size(s[5:])
        return Layout(s, [(inner.elements,)])
    if s.lower() == "resnet50":
        return Layout("resnet50", resnet50_shapes())
    m = re.fullmatch(_COUNT, s)
    if m:
        n = _count(*m.groups())
        if n < 1:
            raise ValueError(f"size {spec!r} must have at least one element")
        return Layout(s, [(n,)])
    m = re.fullmatch(_COUNT + "x" + _COUNT, s)
    if m:
        k, n = _count(*m.groups()[:2]), _count(*m.groups()[2:])
        if k < 1 or n < 1:
            raise ValueError(f"size {spec!r} must have at least one tensor of one element")
        return Layout(s, [(n,)] * k)
    raise ValueError(
        f"size {spec!r} not understood; use e.g. 16M, 64k, 1000x1000, resnet50 or flat:1000x1000"
    )


# ---- timing ---------------------------------------------------------------------------------

def _best(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_probe(elements=1 << 24, threads=(1,), repeats=5, patterns=PATTERNS):
    """Measure the probe's bandwidth for each pattern and thread count.

    Parameters
    ----------
    elements : int
        Elements per array (default 16M: 64 MiB per array, beyond the caches).
    threads : sequence of int
        Thread counts to measure at (through :func:`optcore.set_num_threads`, restored to the
        runtime default afterwards).
    repeats : int
        Sweeps per measure; the fastest counts (best of ``repeats``).

    Returns
    -------
    dict
        ``{pattern: {threads: GB/s}}`` with GB = 1e9 bytes.
    """
    n = int(elements)
    if n < 1:
        raise ValueError(f"elements must be >= 1, got {elements}")
    a, b, c, d = (aligned_zeros(n) for _ in range(4))
    for x, v in zip((a, b, c, d), (0.5, 0.25, 0.125, 0.0625)):
        x.fill(v)
    calls = {
        "copy": lambda: _probe.copy(a, b),
        "triad": lambda: _probe.triad(a, b, c, 0.5),
        "sumsq": lambda: _probe.sumsq(b),
        "sgd": lambda: _probe.sgd_sweep(a, b, c, 0.5, 1e-3),
        "adam": lambda: _probe.adam_sweep(a, b, c, d, 0.9, 0.999, 1e-3),
    }
    calls.update(_lowp_probe_calls(n, a, b, c, d, patterns))
    out = {p: {} for p in patterns}
    try:
        for t in threads:
            optcore.set_num_threads(int(t))
            for p in patterns:
                calls[p]()  # warm: pages touched, clones resolved
                out[p][int(t)] = BYTES_PER_ELEMENT[p] * n / _best(calls[p], repeats) / 1e9
    finally:
        optcore.set_num_threads(None)
    return out


def _lowp_probe_calls(n, a, b, c, d, patterns):
    """Sweeps of the low-precision Adam patterns asked for, on 16-bit and 8-bit arrays of n
    elements allocated here (the float32 ones are shared with the other patterns)."""
    calls = {}
    if not any(p.startswith("adam_") for p in patterns):
        return calls
    h1, h2, h3, h4 = (np.full(n, 0x3f00, np.uint16) for _ in range(4))  # bf16 0.5
    q1, q2 = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    nb = -(-n // _probe.Q8_BLOCK)
    s1, s2 = np.ones(nb, np.float32), np.ones(nb, np.float32)
    calls["adam_bf16"] = lambda: _probe.adam_bf16_sweep(a, b, h1, h2, 0.9, 0.999, 1e-3)
    calls["adam_int8"] = lambda: _probe.adam_int8_sweep(a, b, q1, q2, s1, s2, 1e-3)
    calls["adam_bf16all"] = lambda: _probe.adam_bf16all_sweep(h1, h2, h3, h4, 0.9, 0.999, 1e-3)
    calls["adam_copy"] = lambda: _probe.adam_copy_sweep(a, h1, c, d, h2, 0.9, 0.999, 1e-3)
    return calls


# ---- steppers: one optimizer step on one layout, three implementations ----------------------

def _arrays(layout, seed=0):
    """Parameters (filled with 0.5) and fixed random gradients, each tensor 64-byte aligned."""
    rng = np.random.default_rng(seed)
    params, grads = [], []
    for shape, size in zip(layout.shapes, layout.sizes):
        p = aligned_zeros(size).reshape(shape)
        p.fill(0.5)
        g = aligned_zeros(size).reshape(shape)
        g[...] = rng.standard_normal(shape, dtype=np.float32)
        params.append(p)
        grads.append(g)
    return params, grads


class OptcoreStepper:
    """``optcore.<Optimizer>(list of (param, grad) pairs).step()``: one kernel call."""

    impl = "optcore"

    def __init__(self, name, layout):
        self.layout = layout
        self.params, self.grads = _arrays(layout)
        cls = getattr(optcore, _OPTCORE_CLASS[name])
        self.opt = cls(list(zip(self.params, self.grads)), **HYPER[name])
        self.variant = "multi-tensor"

    def step(self):
        self.opt.step()

    def reset(self):
        """Restore the parameters and zero the state in place (no allocation)."""
        for p in self.params:
            p.fill(0.5)
        for g in self.opt._groups:
            for arena in g.state.values():
                arena.flat.fill(0.0)


class NumpyStepper:
    """The same rule with NumPy in-place ufuncs, tensor by tensor, one scratch buffer each."""

    impl = "numpy"
    variant = "in-place ufuncs"

    _STATES = {"sgd": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2, "adamax": 2, "nadam": 2}

    def __init__(self, name, layout):
        self.layout = layout
        self.params, self.grads = _arrays(layout)
        k = self._STATES[name]
        self.states = [[np.zeros_like(p) for _ in range(k)] for p in self.params]
        self.tmp = [np.empty_like(p) for p in self.params]
        self.tmp2 = [np.empty_like(p) for p in self.params] if name == "nadam" else None
        self.name = name
        self.h = dict(HYPER[name])
        self.t = 10  # step-dependent scalars at a fixed step: same work every call
        self._rule = getattr(self, "_" + name)

    def step(self):
        tmp2 = self.tmp2 or [None] * len(self.params)
        for p, g, s, t, t2 in zip(self.params, self.grads, self.states, self.tmp, tmp2):
            self._rule(p, g, s, t, t2)

    def reset(self):
        for p, s in zip(self.params, self.states):
            p.fill(0.5)
            for x in s:
                x.fill(0.0)

    def _sgd(self, p, g, s, t, _):
        (b,) = s
        b *= np.float32(self.h["momentum"])
        b += g
        np.multiply(b, np.float32(self.h["lr"]), out=t)
        p -= t

    def _adagrad(self, p, g, s, t, _):
        (acc,) = s
        np.multiply(g, g, out=t)
        acc += t
        np.sqrt(acc, out=t)
        t += np.float32(1e-10)
        np.divide(g, t, out=t)
        t *= np.float32(self.h["lr"])
        p -= t

    def _rmsprop(self, p, g, s, t, _):
        (sq,) = s
        alpha = 0.99
        sq *= np.float32(alpha)
        np.multiply(g, g, out=t)
        t *= np.float32(1 - alpha)
        sq += t
        np.sqrt(sq, out=t)
        t += np.float32(1e-8)
        np.divide(g, t, out=t)
        t *= np.float32(self.h["lr"])
        p -= t

    def _moments(self, g, m, v, t):
        b1, b2 = 0.9, 0.999
        m *= np.float32(b1)
        np.multiply(g, np.float32(1 - b1), out=t)
        m += t
        v *= np.float32(b2)
        np.multiply(g, g, out=t)
        t *= np.float32(1 - b2)
        v += t

    def _adam(self, p, g, s, t, _):
        m, v = s
        self._moments(g, m, v, t)
        step_size = self.h["lr"] / (1 - 0.9 ** self.t)
        np.sqrt(v, out=t)
        t /= np.float32(math.sqrt(1 - 0.999 ** self.t))
        t += np.float32(1e-8)
        np.divide(m, t, out=t)
        t *= np.float32(step_size)
        p -= t

    def _adamw(self, p, g, s, t, t2):
        p *= np.float32(1 - self.h["lr"] * self.h["weight_decay"])
        self._adam(p, g, s, t, t2)

    def _adamax(self, p, g, s, t, _):
        m, u = s
        m *= np.float32(0.9)
        np.multiply(g, np.float32(0.1), out=t)
        m += t
        np.abs(g, out=t)
        t += np.float32(1e-8)
        u *= np.float32(0.999)
        np.maximum(u, t, out=u)
        np.divide(m, u, out=t)
        t *= np.float32(self.h["lr"] / (1 - 0.9 ** self.t))
        p -= t

    def _nadam(self, p, g, s, t, t2):
        m, v = s
        self._moments(g, m, v, t)
        np.divide(v, np.float32(1 - 0.999 ** self.t), out=t)
        np.sqrt(t, out=t)
        t += np.float32(1e-8)
        np.divide(g, t, out=t2)
        t2 *= np.float32(self.h["lr"] * 0.1)
        p -= t2
        np.divide(m, t, out=t2)
        t2 *= np.float32(self.h["lr"] * 0.9)
        p -= t2


def torch_available():
    """Return the torch module, or None when it cannot be imported."""
    try:
        import torch
    except ImportError:
        return None
    return torch


class TorchStepper:
    """``torch.optim.<Optimizer>`` with ``fused=True`` where torch has a fused CPU path, else
    ``foreach=True``; parameters and gradients share memory with NumPy arrays."""

    impl = "torch"

    def __init__(self, name, layout):
        import inspect

        import torch

        self.layout = layout
        self.torch = torch
        arrays, grads = _arrays(layout)
        self.params = [torch.from_numpy(a).requires_grad_() for a in arrays]
        for p, g in zip(self.params, grads):
            p.grad = torch.from_numpy(g)
        cls = getattr(torch.optim, _TORCH_CLASS[name])
        if "fused" in inspect.signature(cls).parameters:
            self.variant = "fused"
            kw = {"fused": True}
        else:
            self.variant = "foreach"
            kw = {"foreach": True}
        self.opt = cls(self.params, **HYPER[name], **kw)
        self.opt.step()  # creates the state

    def step(self):
        self.opt.step()

    def reset(self):
        with self.torch.no_grad():
            for p in self.params:
                p.fill_(0.5)
                for k, s in self.opt.state[p].items():
                    if k != "step" and isinstance(s, self.torch.Tensor):
                        s.zero_()


def make_stepper(impl, name, layout):
    """Return a stepper (``.step()``, ``.reset()``, ``.variant``) for ``impl`` in
    ``{"optcore", "numpy", "torch"}``, optimizer ``name`` and a :class:`Layout`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls = {"optcore": OptcoreStepper, "numpy": NumpyStepper, "torch": TorchStepper}.get(impl)
    if cls is None:
        raise ValueError(f"unknown implementation {impl!r}; choose optcore, numpy or torch")
    return cls(name, layout)


class _ProbeSweep:
    """Flat arrays of a layout's element count for the probe sweep timed beside the steps."""

    def __init__(self, elements):
        self.arrays = [aligned_zeros(elements) for _ in range(4)]
        for x, v in zip(self.arrays, (0.5, 0.25, 0.125, 0.0625)):
            x.fill(v)

    def stepper(self, pattern):
        a, b, c, d = self.arrays
        if pattern == "adam":
            return _Sweep(lambda: _probe.adam_sweep(a, b, c, d, 0.9, 0.999, 1e-3))
        return _Sweep(lambda: _probe.sgd_sweep(a, b, c, 0.5, 1e-3))


class _Sweep:
    """A probe sweep with the stepper interface (``step``, ``variant``)."""

    variant = "probe"

    def __init__(self, fn):
        self.step = fn


def _set_threads(n, torch):
    optcore.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def run(optimizers=OPTIMIZERS, sizes=("1M", "16M", "resnet50", "1000x1000"), threads=None,
        repeats=5, probe=None, probe_elements=1 << 24, use_torch=True, progress=None):
    """Step each optimizer on each layout with optcore, NumPy and torch; return the rows.

    Parameters
    ----------
    optimizers : sequence of str
        Names from :data:`OPTIMIZERS`.
    sizes : sequence of str or Layout
        Layouts (see :func:`parse_size`).
    threads : sequence of int, optional
        Thread counts (default ``(1, N)`` with N = :func:`optcore.get_num_threads`).
    repeats : int
        Timed steps per implementation after one warm-up step, alternating between the
        implementations; the fastest counts.
    probe : dict, optional
        A :func:`measure_probe` result covering 1, N and ``threads``; measured when None.
    use_torch : bool
        Compare with torch when it is importable.
    progress : callable, optional
        Called with a short message before each measure.

    Returns
    -------
    dict
        ``{"config": optcore.config(), "probe": probe, "torch": version or None,
        "rows": [row, ...]}``; each row has ``kernel, size, elements, tensors, threads,
        pattern, bytes, optcore_s, optcore_gbps, limit_gbps, of_limit, dram_limit_gbps,
        numpy_s, vs_numpy, torch_s, vs_torch, torch_variant, vs_1_thread`` (``vs_*`` = their
        time / optcore's time; ``vs_1_thread`` = optcore's time at 1 thread / at this count,
        when 1 thread was measured first). ``limit_gbps`` is the probe sweep of the kernel's pattern on flat
        arrays of the same element count, timed in the same repeats as the steps (so it sees the
        same machine load); ``dram_limit_gbps`` is :func:`measure_probe`'s
        figure on arrays beyond the caches, measured at the start.
    """
    optimizers = list(optimizers)
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    layouts = [s if isinstance(s, Layout) else parse_size(s) for s in sizes]
    if threads is None:
        n = optcore.get_num_threads()
        threads = (1, n) if n > 1 else (1,)
    threads = [int(t) for t in threads]
    if any(t < 1 for t in threads):
        raise ValueError(f"threads must be >= 1, got {threads}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch = torch_available() if use_torch else None
    say = progress or (lambda msg: None)
    probe_threads = sorted({1, optcore.get_num_threads(), *threads})
    if probe is None or any(t not in probe["adam"] for t in probe_threads):
        say("probe")
        probe = measure_probe(probe_elements, probe_threads, repeats)
    rows = []
    try:
        for layout in layouts:
            sweep = _ProbeSweep(layout.elements)
            for name in optimizers:
                impls = ["optcore", "numpy"] + (["torch"] if torch is not None else [])
                steppers = {i: make_stepper(i, name, layout) for i in impls}
                pattern = PATTERN[name]
                steppers["probe"] = sweep.stepper(pattern)
                one_thread = None
                for t in threads:
                    say(f"{name} {layout.name} {t} thread{'s' if t > 1 else ''}")
                    _set_threads(t, torch)
                    best = {i: math.inf for i in steppers}
                    for s in steppers.values():
                        s.step()
                    for _ in range(int(repeats)):
                        for i, s in steppers.items():
                            t0 = time.perf_counter()
                            s.step()
                            best[i] = min(best[i], time.perf_counter() - t0)
                    nbytes = BYTES_PER_ELEMENT[pattern] * layout.elements
                    gbps = nbytes / best["optcore"] / 1e9
                    limit = nbytes / best["probe"] / 1e9
                    rows.append({
                        "kernel": name, "size": layout.name, "elements": layout.elements,
                        "tensors": layout.ntensors, "threads": t, "pattern": pattern,
                        "bytes": nbytes, "optcore_s": best["optcore"], "optcore_gbps": gbps,
                        "limit_gbps": limit, "of_limit": gbps / limit,
                        "dram_limit_gbps": probe[pattern][t],
                        "numpy_s": best["numpy"], "vs_numpy": best["numpy"] / best["optcore"],
                        "torch_s": best.get("torch"),
                        "vs_torch": best["torch"] / best["optcore"] if "torch" in best else None,
                        "torch_variant": steppers["torch"].variant if "torch" in steppers else None,
                        "vs_1_thread": one_thread / best["optcore"] if one_thread else None,
                    })
                    if t == 1:
                        one_thread = best["optcore"]
                del steppers
            del sweep
    finally:
        optcore.set_num_threads(None)
    return {"config": optcore.config(), "probe": probe,
            "torch": torch.__version__ if torch is not None else None, "rows": rows}


def format_table(result):
    """Render a :func:`run` result as a plain-text table (probe limits first)."""
    cfg = result["config"]
    lines = [f"optcore {cfg['version']} | {cfg['isa']} | OpenMP "
             f"{'yes' if cfg['openmp'] else 'no'} | {cfg['num_procs']} processors | torch "
             f"{result['torch'] or 'not installed'}", "",
             "probe beyond the caches (GB/s, best of repeats, measured first)"]
    probe = result["probe"]
    ts = sorted({t for v in probe.values() for t in v})
    lines.append(f"  {'pattern':<13}{'bytes/el':>9}" + "".join(f"{f'{t} thr':>10}" for t in ts))
    for p, v in probe.items():
        lines.append(f"  {p:<13}{BYTES_PER_ELEMENT[p]:>9g}"
                     + "".join(f"{v[t]:>10.1f}" if t in v else f"{'-':>10}" for t in ts))
    lines.append("")
    head = (f"{'kernel':<9}{'size':<16}{'threads':>7}{'GB/s':>8}{'% limit':>9}"
            f"{'x NumPy':>9}{'x torch':>9}{'x 1 thr':>9}  torch path")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        vt = f"{r['vs_torch']:>9.2f}" if r["vs_torch"] is not None else f"{'-':>9}"
        v1 = f"{r['vs_1_thread']:>9.2f}" if r.get("vs_1_thread") else f"{'-':>9}"
        lines.append(f"{r['kernel']:<9}{r['size']:<16}{r['threads']:>7}{r['optcore_gbps']:>8.1f}"
                     f"{100 * r['of_limit']:>8.0f}%{r['vs_numpy']:>9.2f}{vt}{v1}  "
                     f"{r['torch_variant'] or '-'}")
    lines.append("")
    lines.append("GB/s counts loads + stores (20 B/element for sgd/adagrad/rmsprop, 28 for the Adam "
                 "family); % limit is of the probe's sweep of the same pattern, element count and threads, "
                 "timed in the same repeats (the DRAM probe above is measured once, at the start); "
                 "x NumPy / x torch = their step time / optcore's (higher is better); x 1 thr = "
                 "optcore's 1-thread time / its time at this thread count.")
    return "\n".join(lines)
