"""Batch-norm modules through autograd: optcore.torch beside torch, and fused BN+ReLU beside
torch's BN followed by ReLU.

Run ``pytest bench/test_torch_batchnorm_bench.py``; ``OPTCORE_BENCH_SMOKE=1`` shrinks the shapes
so every benchmark runs once. Each entry is one forward and backward of the module(s) on an
input that requires grad (the gradient of ``x`` is set to None before each round). Groups are
``torch-<bn|bn-relu>-<layout>-<shape>`` with one entry per implementation:

- ``bn``: ``torch.nn.BatchNorm1d/2d`` vs ``optcore.torch.BatchNorm1d/2d``;
- ``bn-relu``: torch's BN then ``ReLU``, optcore's BN then ``ReLU``, and
  ``optcore.torch.BatchNormReLU1d/2d`` (one sweep less each way).

``extra_info["bytes"]`` counts the minimal traffic of BN forward + backward (32 bytes per
element, the "triad" pattern, as in ``test_batchnorm_bench.py``).
"""
import os

import numpy as np
import pytest

import optcore

torch = pytest.importorskip("torch")
ot = pytest.importorskip("optcore.torch")
nn = torch.nn

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")
if SMOKE:
    CASES = [("NC", (64, 32)), ("NCHW", (2, 8, 6, 6)), ("channels_last", (2, 8, 6, 6))]
else:
    CASES = [("NC", (256, 512)), ("NC", (4096, 1024)), ("NCHW", (32, 64, 56, 56)),
             ("channels_last", (32, 64, 56, 56)), ("NCHW", (32, 64, 32, 32)),
             ("channels_last", (32, 64, 32, 32))]

MODULES = {
    "bn": {"torch": lambda c, d: d(c), "optcore": lambda c, d: _ours(d)(c)},
    "bn-relu": {"torch": lambda c, d: nn.Sequential(d(c), nn.ReLU()),
                "optcore": lambda c, d: nn.Sequential(_ours(d)(c), nn.ReLU()),
                "optcore-fused": lambda c, d: _fused(d)(c)},
}


def _ours(torch_cls):
    return ot.BatchNorm1d if torch_cls is nn.BatchNorm1d else ot.BatchNorm2d


def _fused(torch_cls):
    return ot.BatchNormReLU1d if torch_cls is nn.BatchNorm1d else ot.BatchNormReLU2d


def _ids(case):
    layout, shape = case
    return f"{layout}-{'x'.join(map(str, shape))}"


PARAMS = [(kind, impl) for kind, impls in MODULES.items() for impl in impls]


@pytest.mark.parametrize("kind,impl", PARAMS, ids=[f"{k}-{i}" for k, i in PARAMS])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torch_batchnorm_module(benchmark, case, kind, impl):
    layout, shape = case
    threads = optcore.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        dy = dy.to(memory_format=torch.channels_last)
    x.requires_grad_()
    module = MODULES[kind][impl](shape[1], nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)

    def step():
        x.grad = None
        module(x).backward(dy)

    elements = int(np.prod(shape))
    benchmark.group = f"torch-{kind}-{_ids(case)}"
    benchmark.extra_info.update({"elements": elements, "bytes": 32 * elements,
                                 "pattern": "triad", "threads": threads,
                                 "isa": optcore.config()["isa"]})
    benchmark(step)
