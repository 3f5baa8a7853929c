"""The PyTorch layer: one step through ``optcore.torch`` beside optcore's NumPy pairs path and
torch.optim, and ``optcore.torch.clip_grad_norm_`` beside torch's.

Groups (names end in the implementation):

- ``<optimizer>-<layout>-<threads>t``: ``optcore.torch.<Optimizer>(params).step()`` on torch
  tensors (``...-optcore.torch``), ``optcore.<Optimizer>([(param, grad), ...]).step()`` on
  NumPy arrays (``...-pairs``, the path the torch layer must not be more than 10% slower
  than) and ``torch.optim`` (``...-torch``: ``fused=True`` where torch has a fused CPU path,
  else ``foreach=True``), for every optimizer on one 16M tensor and ResNet-50's 161 tensors,
  and for Adam on 1000 tensors of 1000 elements (target: >= 10x torch fused Adam; RMSprop,
  Adamax and NAdam at 16M: >= 4x torch). Adam and AdamW also run DeepSpeed's CPU Adam
  (``...-deepspeed``, ``DeepSpeedCPUAdam``) where DeepSpeed is installed.
- ``clip_grad_norm_-1000x1000-<threads>t``: ``clip_grad_norm_`` over 1000 tensors of 1000
  elements with the same gradients every round (``...-optcore.torch``, target >= 10x
  ``...-torch``), and with new gradient tensors before every round, as after
  ``zero_grad(set_to_none=True)`` and a backward pass (``...-optcore.torch-fresh`` and
  ``...-torch-fresh``; the new tensors are made in the untimed setup).

Every round of a step starts from the same state (``setup`` resets it in place, untimed).
``extra_info`` has ``bytes`` and ``pattern`` for conftest.py's GB/s and % of the probe's
limit. ``OPTCORE_BENCH_SMOKE=1`` shrinks every layout to at most 64k elements.
"""
import math

import pytest

import optcore
from optcore import bench as ob

from conftest import SMOKE, SMOKE_MAX_TENSORS, deepspeed_cpu_adam
from conftest import layout as _layout

torch = pytest.importorskip("torch")
import optcore.torch as ot  # noqa: E402
from optcore.torch.training import DEEPSPEED_OPTIMIZERS  # noqa: E402

THREADS = [1, 2]
IMPLS = ["optcore.torch", "pairs", "torch", "deepspeed"]
LAYOUTS = {"16M": ob.OPTIMIZERS, "resnet50": ob.OPTIMIZERS, "1000x1000": ("adam",)}
_CLASS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
          "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}


def _rounds(elements):
    return 10 if elements >= (4 << 20) else 30


def _stepper(impl, name, layout):
    """optcore's bench steppers; ``optcore.torch`` is torch's stepper (torch tensors sharing
    memory with NumPy, state under torch's keys, reset in place) with optcore.torch's class."""
    if impl == "pairs":
        return ob.make_stepper("optcore", name, layout)
    stepper = ob.make_stepper("torch", name, layout)
    if impl == "optcore.torch":
        stepper.opt = getattr(ot, _CLASS[name])(stepper.params, **ob.HYPER[name])
    elif impl == "deepspeed":
        stepper.opt = deepspeed_cpu_adam(stepper.params, name, ob.HYPER[name])
    else:
        return stepper
    stepper.opt.step()  # creates the state
    stepper.variant = impl
    return stepper


@pytest.fixture(scope="module")
def stepper_cache():
    """The last stepper only: consecutive cases differ in threads."""
    return {}


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    optcore.set_num_threads(None)
    torch.set_num_threads(before)


def _set_threads(threads):
    optcore.set_num_threads(threads)
    torch.set_num_threads(threads)


_STEP_CASES = [(spec, name, impl, t) for spec, names in LAYOUTS.items() for name in names
               for impl in IMPLS for t in THREADS
               if impl != "deepspeed" or name in DEEPSPEED_OPTIMIZERS]


@pytest.mark.parametrize("spec, name, impl, threads", _STEP_CASES,
                         ids=[f"{n}-{s}-{t}t-{i}" for s, n, i, t in _STEP_CASES])
def test_step(benchmark, stepper_cache, threads_restored, spec, name, impl, threads):
    key = (spec, name, impl)
    if key not in stepper_cache:
        stepper_cache.clear()
        stepper_cache[key] = _stepper(impl, name, _layout(spec))
    stepper = stepper_cache[key]
    layout = stepper.layout
    _set_threads(threads)
    pattern = ob.PATTERN[name]
    benchmark.group = f"{name}-{spec}-{threads}t"
    benchmark.extra_info.update(
        impl=impl, variant=stepper.variant, elements=layout.elements, tensors=layout.ntensors,
        bytes=ob.BYTES_PER_ELEMENT[pattern] * layout.elements, pattern=pattern, threads=threads,
        isa=optcore.config()["isa"])
    benchmark.pedantic(stepper.step, setup=stepper.reset, rounds=_rounds(layout.elements),
                       iterations=1, warmup_rounds=1)
    first = stepper.params[0]
    first = first.detach().numpy() if impl != "pairs" else first
    assert math.isfinite(float(first.reshape(-1)[0]))


# ---- clip_grad_norm_ over 1000 small tensors -------------------------------------------------

_CLIP_CASES = [(impl, fresh, t) for impl in ("optcore.torch", "torch") for fresh in (False, True)
               for t in THREADS]


@pytest.mark.parametrize("impl, fresh, threads", _CLIP_CASES,
                         ids=[f"{t}t-{i}{'-fresh' if f else ''}" for i, f, t in _CLIP_CASES])
def test_clip_grad_norm(benchmark, threads_restored, impl, fresh, threads):
    n, size = (SMOKE_MAX_TENSORS, 64) if SMOKE else (1000, 1000)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(size)) for _ in range(n)]
    grads = [torch.randn(size, generator=gen) for _ in range(n)]

    def new_grads():  # what backward does after zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def same_grads():  # restore the values, so that every round clips (torch always scales)
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    new_grads()
    _set_threads(threads)
    if impl == "torch":
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True)  # noqa: E731
    else:
        clip = lambda: ot.clip_grad_norm_(params, 1e-3)  # noqa: E731
    benchmark.group = f"clip_grad_norm_-1000x1000-{threads}t"
    benchmark.extra_info.update(
        impl=impl, variant="fresh grads" if fresh else "same grads", elements=n * size,
        tensors=n, bytes=12 * n * size, pattern="sumsq", threads=threads,
        isa=optcore.config()["isa"])
    if fresh:
        benchmark.pedantic(clip, setup=new_grads, rounds=30, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(clip, setup=same_grads, rounds=60, iterations=1, warmup_rounds=2)
    assert math.isfinite(float(params[0].grad[0]))
