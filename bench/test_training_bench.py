"""Whole CPU training steps (optcore.torch.training): the four variants side by side.

Run ``pytest bench/test_training_bench.py``; ``OPTCORE_BENCH_SMOKE=1`` uses the tiny models of
``optcore bench --training --quick``. Groups are ``training-<model>-<optimizer>`` with one entry
per variant: (a) torch (fused or foreach optimizer after ``clip_grad_norm_``), (b) optcore's
optimizer with fused clipping, (c) (b) plus optcore's batch norm, (d) (c) with BN+ReLU fused.
Each round is one step (zero_grad, forward, loss, backward, clipping, step) on the next of the
model's batches. ``optcore bench --training`` prints the same comparison as one table, with the
shares of batch norm and of the optimizer and the loss check.

For Adam and AdamW the groups also hold ``test_training_step_deepspeed``: variant (a) with
DeepSpeed's CPU Adam (``DeepSpeedCPUAdam``, ZeRO-Offload's optimizer) in place of torch's fused
optimizer, where DeepSpeed is installed.
"""
import math
import os

import pytest

import optcore

torch = pytest.importorskip("torch")
training = pytest.importorskip("optcore.torch.training")

SMOKE = os.environ.get("OPTCORE_BENCH_SMOKE", "") not in ("", "0")


@pytest.mark.parametrize("variant", range(len(training.VARIANTS)),
                         ids=[v.split()[0].strip("()") for v in training.VARIANTS])
@pytest.mark.parametrize("optimizer", training.OPTIMIZERS)
@pytest.mark.parametrize("model", list(training.MODELS))
def test_training_step(benchmark, model, optimizer, variant):
    net, opt, batches = training.make_variant(variant, model, optimizer, SMOKE)
    _bench_steps(benchmark, model, optimizer, training.VARIANTS[variant], net, opt, batches,
                 torch_clip=variant == 0)


@pytest.mark.parametrize("optimizer", training.DEEPSPEED_OPTIMIZERS)
@pytest.mark.parametrize("model", list(training.MODELS))
def test_training_step_deepspeed(benchmark, model, optimizer):
    pytest.importorskip("deepspeed.ops.adam")
    net, opt, batches = training.make_deepspeed_variant(model, optimizer, SMOKE)
    _bench_steps(benchmark, model, optimizer, training.DEEPSPEED_VARIANT, net, opt, batches,
                 torch_clip=True)


def _bench_steps(benchmark, model, optimizer, variant, net, opt, batches, torch_clip):
    threads = optcore.get_num_threads()
    torch.set_num_threads(threads)
    state = {"step": 0, "loss": 0.0}

    def step():
        x, target = batches[state["step"] % len(batches)]
        state["step"] += 1
        state["loss"] = training.train_step(net, opt, x, target, torch_clip=torch_clip)[0]

    benchmark.group = f"training-{model}-{optimizer}"
    benchmark.extra_info.update({"variant": variant, "threads": threads})
    benchmark.pedantic(step, rounds=2 if SMOKE else 10, iterations=1, warmup_rounds=1)
    assert math.isfinite(state["loss"])
