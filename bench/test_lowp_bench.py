"""One Adam step with low-precision state, parameters or gradients, side by side with torch's
fused float32 Adam and the CPU 8-bit / low-precision optimizers users have today.

Implementations, on one tensor of 16M and 64M elements at 2 threads (``IMPLS``: bytes moved
per element and the probe pattern of the same access pattern, so that ``of_limit`` is each
implementation's fraction of its own roofline):

- ``torch-fused-fp32`` (the reference) and ``torch-fused-bf16`` (bf16 params and grads; torch
  keeps bf16 state);
- ``optcore-float32``, ``optcore-bfloat16`` (bf16 state, stochastic rounding), ``optcore-int8``
  (8-bit block-wise state);
- ``optcore-bf16-params``: bf16 params, grads and state, stochastic rounding (14 B/element,
  as torch fused on bf16);
- ``optcore-master-bf16``: float32 params and state, bf16 grads and a bf16 model copy written
  in the same sweep (8 + 2 + 16 + 2 = 28 B/element, as the plain float32 step);
- where installed (``pip install optcore[lowbit-baselines]``): ``bnb-adam8bit``
  (bitsandbytes' Adam8bit), ``torchao-adamw8bit`` (torchao's AdamW8bit: its first step compiles
  for tens of seconds, so it is left out of smoke runs) and ``optimi-bf16-kahan`` (torch-optimi's
  Adam on bf16 params with Kahan summation, 18 B/element; its probe pattern ``adam_bf16all``
  moves 14, so its ``of_limit`` is only indicative);
- where DeepSpeed is installed (``pip install optcore[deepspeed-baseline]``): its CPU Adam
  (``DeepSpeedCPUAdam``, ZeRO-Offload's optimizer) on float32 (``ds-cpu-adam-fp32``) and on
  bf16 params and grads with bf16 state (``ds-cpu-adam-bf16``, ``fp32_optimizer_states=False``,
  rounded to nearest: 14 B/element, as ``optcore-bf16-params``).

Group ``adam-int8-phases-64K-1t`` (``test_adam_int8_phases``): the 8-bit step on data in
cache at one thread, beside its phases (decoding both moments, requantizing them) and the
float32 step, to show where its time goes.

``OPTCORE_BENCH_SMOKE=1`` shrinks to 64k elements.
"""
import importlib

import numpy as np
import pytest

import optcore
from optcore import bench as ob

from conftest import SMOKE, SMOKE_MAX_ELEMENTS, deepspeed_cpu_adam

SIZES = {"16M": 1 << 24, "64M": 1 << 26}
IMPLS = {
    "torch-fused-fp32": (28, "adam"),
    "torch-fused-bf16": (14, "adam_bf16all"),
    "optcore-float32": (28, "adam"),
    "optcore-bfloat16": (20, "adam_bf16"),
    "optcore-int8": (16 + 16 / 256, "adam_int8"),
    "optcore-bf16-params": (14, "adam_bf16all"),
    "optcore-master-bf16": (28, "adam_copy"),
    "bnb-adam8bit": (16 + 16 / 256, "adam_int8"),
    "torchao-adamw8bit": (16 + 16 / 256, "adam_int8"),
    "optimi-bf16-kahan": (18, "adam_bf16all"),
    "ds-cpu-adam-fp32": (28, "adam"),
    "ds-cpu-adam-bf16": (14, "adam_bf16all"),
}


def _need(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed")


def _torch_stepper(impl, n):
    torch = ob.torch_available()
    if torch is None:
        pytest.skip("torch is not installed")
    bf16 = ("torch-fused-bf16", "optimi-bf16-kahan", "ds-cpu-adam-bf16")
    dtype = torch.bfloat16 if impl in bf16 else torch.float32
    p = torch.nn.Parameter(torch.randn(n, dtype=dtype))
    p.grad = (torch.randn(n) * 1e-3).to(dtype)
    if impl.startswith("torch-fused"):
        return torch.optim.Adam([p], lr=1e-3, fused=True).step
    if impl.startswith("ds-cpu-adam"):
        return deepspeed_cpu_adam([p], "adam", {"lr": 1e-3},
                                  fp32_optimizer_states=dtype == torch.float32).step
    if impl == "bnb-adam8bit":
        return _need("bitsandbytes").optim.Adam8bit([p], lr=1e-3).step
    if impl == "torchao-adamw8bit":
        if SMOKE:
            pytest.skip("torchao compiles its step for tens of seconds: not in smoke runs")
        return _need("torchao.optim").AdamW8bit([p], lr=1e-3, weight_decay=0.0).step
    return _need("optimi").Adam([p], lr=1e-3, kahan_sum=True).step


def _stepper(impl, n):
    if not impl.startswith("optcore"):
        return _torch_stepper(impl, n)
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    if impl in ("optcore-float32", "optcore-bfloat16", "optcore-int8"):
        return optcore.Adam([(p, g)], lr=1e-3, state_dtype=impl.split("-")[1]).step
    import ml_dtypes

    g = g.astype(ml_dtypes.bfloat16)
    if impl == "optcore-bf16-params":
        return optcore.Adam([(p.astype(ml_dtypes.bfloat16), g)], lr=1e-3,
                            state_dtype="bfloat16").step
    copy = np.empty(n, ml_dtypes.bfloat16)
    return optcore.Adam([(p, g)], lr=1e-3, model_copy=[copy]).step


@pytest.mark.parametrize("impl", list(IMPLS))
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
        nbytes, pattern = IMPLS[impl]
        benchmark.extra_info.update(elements=n, bytes=nbytes * n, pattern=pattern, threads=2)
        benchmark.pedantic(step, rounds=3 if SMOKE else 10, iterations=1, warmup_rounds=1)
    finally:
        optcore.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(before)


# ---- the 8-bit step in cache, against its phases ---------------------------------------------

PHASES_N = 1 << 16  # one thread; the 8-bit step's buffers (640 KB) and float32's (1 MB) fit L2
PHASES = ["decode-m-v", "requantize-m-v", "optcore-float32", "optcore-int8"]


def _phase(phase, n):
    from optcore import _lowp
    from optcore._kernels import _optim

    if phase in ("optcore-float32", "optcore-int8"):
        return _stepper(phase, n)
    rng = np.random.default_rng(0)
    m = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    v = m * m
    mq, vq = np.empty(n, np.uint8), np.empty(n, np.uint8)
    am, av = np.empty(_lowp.blocks(n), np.float32), np.empty(_lowp.blocks(n), np.float32)

    def requantize():
        _optim.q8_quantize(m, mq, am, True)
        _optim.q8_quantize(v, vq, av, False)

    def decode():
        _optim.q8_dequantize(mq, am, m, True)
        _optim.q8_dequantize(vq, av, v, False)

    requantize()
    return decode if phase == "decode-m-v" else requantize


@pytest.mark.parametrize("phase", PHASES)
def test_adam_int8_phases(benchmark, phase):
    """Why the 8-bit step is compute-bound: on data in cache at one thread, the step against
    its phases, decoding both moments (``q8_dequantize``, the step's decoder), requantizing
    them (``q8_quantize``: absmax and codes, the step's encoder), and the float32 step (the
    update and its divisions). The two steps include optcore's per-step Python (~10 us)."""
    step = _phase(phase, PHASES_N)
    optcore.set_num_threads(1)
    try:
        benchmark.group = "adam-int8-phases-64K-1t"
        benchmark.extra_info.update(elements=PHASES_N, threads=1)
        benchmark.pedantic(step, rounds=3 if SMOKE else 30, iterations=10, warmup_rounds=1)
    finally:
        optcore.set_num_threads(None)
