"""One optimizer step: optcore vs an in-place NumPy baseline vs torch.optim, in one group each.

Every optimizer (SGD with momentum, AdaGrad, RMSProp, Adam, AdamW, AdaMax, NAdam) on: one
tensor of 1M, 16M and 64M elements, ResNet-50's 161 parameter tensors (25.6M elements),
1000 tensors of 1000 elements, and the same 1M elements as one flat buffer; at 1 and 2 threads.
torch uses ``fused=True`` where it has a fused CPU path (SGD, Adagrad, Adam, AdamW), else
``foreach=True``; its benchmarks are skipped when torch is not installed.

Group ``<optimizer>-<layout>-<threads>t``; names end in the implementation. Each round starts
from the same state (``setup`` resets parameters and state in place, untimed).
``OPTCORE_BENCH_SMOKE=1`` shrinks every layout to at most 64k elements.
"""
import math

import pytest

import optcore
from optcore import bench as ob

from conftest import layout as _layout

LAYOUTS = ["1M", "16M", "64M", "resnet50", "1000x1000", "flat:1000x1000"]
THREADS = [1, 2]
IMPLS = ["optcore", "numpy", "torch"]


def _rounds(elements):
    return 5 if elements >= (32 << 20) else 10 if elements >= (4 << 20) else 30


_CASES = [(spec, name, impl, t) for spec in LAYOUTS for name in ob.OPTIMIZERS for impl in IMPLS
          for t in THREADS]


@pytest.fixture(scope="module")
def stepper_cache():
    """Keep the last stepper: consecutive cases differ only in threads, so buffers are built
    once per (layout, optimizer, implementation) and at most one set is alive."""
    return {}


@pytest.fixture
def threads_restored():
    torch = ob.torch_available()
    before = torch.get_num_threads() if torch is not None else None
    yield torch
    optcore.set_num_threads(None)
    if torch is not None:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spec, name, impl, threads", _CASES,
                         ids=[f"{n}-{s}-{t}t-{i}" for s, n, i, t in _CASES])
def test_step(benchmark, stepper_cache, threads_restored, spec, name, impl, threads):
    torch = threads_restored
    if impl == "torch" and torch is None:
        pytest.skip("torch is not installed")
    key = (spec, name, impl)
    if key not in stepper_cache:
        stepper_cache.clear()
        stepper_cache[key] = ob.make_stepper(impl, name, _layout(spec))
    stepper = stepper_cache[key]
    layout = stepper.layout
    optcore.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    pattern = ob.PATTERN[name]
    benchmark.group = f"{name}-{spec}-{threads}t"
    benchmark.extra_info.update(
        impl=impl, variant=stepper.variant, elements=layout.elements, tensors=layout.ntensors,
        bytes=ob.BYTES_PER_ELEMENT[pattern] * layout.elements, pattern=pattern, threads=threads,
        isa=(optcore.config()["isa"] if impl != "torch"
             else torch.backends.cpu.get_cpu_capability()),
    )
    benchmark.pedantic(stepper.step, setup=stepper.reset, rounds=_rounds(layout.elements),
                       iterations=1, warmup_rounds=1)
    first = stepper.params[0]
    first = first.detach().numpy() if impl == "torch" else first
    assert math.isfinite(float(first.reshape(-1)[0]))
