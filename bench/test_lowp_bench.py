"""One Adam step with low-precision state, side by side with torch's fused float32 Adam.

Implementations, on one tensor of 16M and 64M elements at 2 threads:
``torch-fused-fp32`` (the reference), ``torch-fused-bf16`` (bf16 params and grads; torch keeps
bf16 state), ``optcore-float32``, ``optcore-bfloat16`` (bf16 state, stochastic rounding) and
``optcore-int8`` (8-bit block-wise state). ``extra_info`` records the bytes each step moves
(params + grads + state: 28, 20 and 16 + 1/16 B/element for optcore) and the probe pattern of
the same access pattern (``PATTERN``: ``adam``, ``adam_bf16``, ``adam_int8``, ``adam_bf16all``
for torch on bf16 params, grads and state), so that ``of_limit`` is each implementation's
fraction of its own roofline. ``OPTCORE_BENCH_SMOKE=1`` shrinks to 64k elements.
"""
import numpy as np
import pytest

import optcore
from optcore import bench as ob

from conftest import SMOKE, SMOKE_MAX_ELEMENTS

SIZES = {"16M": 1 << 24, "64M": 1 << 26}
IMPLS = ["torch-fused-fp32", "torch-fused-bf16", "optcore-float32", "optcore-bfloat16",
         "optcore-int8"]
BYTES = {"torch-fused-fp32": 28, "torch-fused-bf16": 14, "optcore-float32": 28,
         "optcore-bfloat16": 20, "optcore-int8": 16 + 16 / 256}
PATTERN = {"torch-fused-fp32": "adam", "torch-fused-bf16": "adam_bf16all", "optcore-float32": "adam",
           "optcore-bfloat16": "adam_bf16", "optcore-int8": "adam_int8"}


def _stepper(impl, n):
    if impl in ("optcore-bf16-params", "optcore-master-bf16"):
        return _param_stepper(impl, n)
    if impl.startswith("torch"):
        torch = ob.torch_available()
        if torch is None:
            pytest.skip("torch is not installed")
        dtype = torch.bfloat16 if impl.endswith("bf16") else torch.float32
        p = torch.randn(n, dtype=dtype)
        p.grad = torch.randn(n, dtype=dtype) * 1e-3
        return torch.optim.Adam([p], lr=1e-3, fused=True).step
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    return optcore.Adam([(p, g)], lr=1e-3, state_dtype=impl.split("-")[1]).step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES))
def test_adam_lowp(benchmark, size, impl):
    n = min(SIZES[size], SMOKE_MAX_ELEMENTS) if SMOKE else SIZES[size]
    step = _stepper(impl, n)
    torch = ob.torch_available()
    optcore.set_num_threads(2)
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(2)
    try:
        benchmark.extra_info.update(elements=n, bytes=BYTES[impl] * n, pattern=PATTERN[impl],
                                    threads=2)
        benchmark.pedantic(step, rounds=3 if SMOKE else 10, iterations=1, warmup_rounds=1)
    finally:
        optcore.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(before)


# -- 16-bit parameters and gradients, master weights with a model copy ----------------------
# ``optcore-bf16-params``: bf16 params and grads, bf16 state, stochastic rounding (2 + 2 + 2
# bytes read, 2 + 2 + 2 written: 14 B/element, as torch fused on bf16 params);
# ``optcore-master-bf16``: float32 params and state, bf16 grads, a bf16 model copy written in
# the same sweep (8 + 2 + 16 + 2 = 28 B/element, as the plain float32 step). Appended to the
# list test_adam_lowp is parametrized over (collection reads it after the module ran), so
# they run side by side with the others.
IMPLS.extend(["optcore-bf16-params", "optcore-master-bf16"])
BYTES.update({"optcore-bf16-params": 14, "optcore-master-bf16": 28})


def _param_stepper(impl, n):
    import ml_dtypes

    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    g = (rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)).astype(ml_dtypes.bfloat16)
    if impl == "optcore-bf16-params":
        return optcore.Adam([(p.astype(ml_dtypes.bfloat16), g)], lr=1e-3,
                            state_dtype="bfloat16").step
    copy = np.empty(n, ml_dtypes.bfloat16)
    return optcore.Adam([(p, g)], lr=1e-3, model_copy=[copy]).step
