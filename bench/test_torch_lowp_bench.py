"""One Adam step through ``optcore.torch`` with low-precision state or parameters, side by side
with torch's fused Adam (float32, and on bfloat16 parameters).

Implementations, on one tensor of 16M elements at 2 threads (group ``torch-adam-lowp-16M``):
``torch-fused-fp32`` (the reference), ``torch-fused-bf16`` (bf16 params and grads; torch keeps
bf16 state), ``optcore.torch-fp32``, ``optcore.torch-bf16-state`` (``state_dtype="bfloat16"``),
``optcore.torch-Adam8bit`` (8-bit block-wise state), ``optcore.torch-bf16-params`` (bf16
params and grads, bf16 state, stochastic rounding) and ``optcore.torch-bf16-kahan`` (the same
with ``compensation=True``), ``optcore.torch-master-copy`` (float32 masters and state, bf16
gradients read from a bf16 model copy that the sweep rewrites, ``model_copy=``). ``extra_info``
records the bytes each step moves (params, grads, state, Kahan buffer, copy) and the probe
pattern of the same access pattern (``IMPLS``, as ``bench/test_lowp_bench.py``; the Kahan
variant moves 18 B/element against ``adam_bf16all``'s 14, so its ``of_limit`` is indicative).
``OPTCORE_BENCH_SMOKE=1`` shrinks to 64k elements.
"""
import pytest

import optcore

from conftest import SMOKE, SMOKE_MAX_ELEMENTS

torch = pytest.importorskip("torch")
import optcore.torch as ot  # noqa: E402

N = 1 << 24
# bytes per element (parameter read + write, gradient read, each state buffer read + write,
# the 8-bit scales, a copy written) and the probe pattern of that access pattern
IMPLS = {"torch-fused-fp32": (28, "adam"), "torch-fused-bf16": (14, "adam_bf16all"),
         "optcore.torch-fp32": (28, "adam"), "optcore.torch-bf16-state": (20, "adam_bf16"),
         "optcore.torch-Adam8bit": (16 + 16 / 256, "adam_int8"),
         "optcore.torch-bf16-params": (14, "adam_bf16all"),
         "optcore.torch-bf16-kahan": (18, "adam_bf16all"),
         "optcore.torch-master-copy": (28, "adam_copy")}
_MAKE = {
    "torch-fused-fp32": (torch.float32, lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "torch-fused-bf16": (torch.bfloat16, lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "optcore.torch-fp32": (torch.float32, lambda ps: ot.Adam(ps, lr=1e-3)),
    "optcore.torch-bf16-state": (torch.float32,
                                 lambda ps: ot.Adam(ps, lr=1e-3, state_dtype="bfloat16")),
    "optcore.torch-Adam8bit": (torch.float32, lambda ps: ot.Adam8bit(ps, lr=1e-3)),
    "optcore.torch-bf16-params": (torch.bfloat16, lambda ps: ot.Adam(ps, lr=1e-3)),
    "optcore.torch-bf16-kahan": (torch.bfloat16,
                                 lambda ps: ot.Adam(ps, lr=1e-3, compensation=True)),
    "optcore.torch-master-copy": (torch.bfloat16, lambda ps: ot.Adam(
        [p.detach().float() for p in ps], lr=1e-3, model_copy=ps)),
}


@pytest.mark.parametrize("impl", list(_MAKE))
def test_torch_adam_lowp(benchmark, impl):
    n = min(N, SMOKE_MAX_ELEMENTS) if SMOKE else N
    dtype, make = _MAKE[impl]
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen).to(dtype).requires_grad_()
    p.grad = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
    opt = make([p])
    before = torch.get_num_threads()
    optcore.set_num_threads(2)
    torch.set_num_threads(2)
    try:
        opt.step()  # creates the state
        benchmark.group = "torch-adam-lowp-16M"
        nbytes, pattern = IMPLS[impl]
        benchmark.extra_info.update(impl=impl, elements=n, bytes=nbytes * n, pattern=pattern,
                                    threads=2)
        benchmark.pedantic(opt.step, rounds=3 if SMOKE else 10, iterations=1, warmup_rounds=1)
    finally:
        optcore.set_num_threads(None)
        torch.set_num_threads(before)
    assert bool(torch.isfinite(p[:8].float()).all())
