"""End-to-end CPU training steps: how much of a whole step optcore saves (``optcore bench
--training``).

One training step is ``zero_grad``, forward, cross-entropy loss, backward, global-norm
clipping at 1.0 and the optimizer step, on the models of :mod:`optcore.torch.models`:

- ``resnet18``: :class:`~optcore.torch.models.ResNet18` on 32x32 images, batch 32, in NCHW and
  in ``channels_last``;
- ``mlp``: :class:`~optcore.torch.models.MLP`, 8 x (Linear 512 + BatchNorm1d + ReLU), batch 256.

Four variants of each step, per optimizer (Adam, AdamW, RMSprop, NAdam):

- ``(a) torch``: ``torch.optim`` (``fused=True`` where torch has a fused CPU kernel: Adam,
  AdamW; else ``foreach=True``) after ``torch.nn.utils.clip_grad_norm_``;
- ``(b) optim``: the :mod:`optcore.torch` optimizer with the clipping fused into its step
  (``clip=optcore.clip.GlobalNorm(1.0)``);
- ``(c) +bn``: (b) on the model converted by :func:`optcore.torch.convert_batchnorm`;
- ``(d) +bn-relu``: (c) with batch norm + ReLU fused wherever the model has the pair.

With ``deepspeed=True`` (``optcore bench --training --deepspeed``), Adam and AdamW also run
``(a) deepspeed``: (a) with DeepSpeed's CPU Adam (``deepspeed.ops.adam.DeepSpeedCPUAdam``,
the optimizer of ZeRO-Offload) in place of torch's fused one, interleaved with the others.

The variants of one (model, format, optimizer) start from the same weights and see the same
batch, and run interleaved step by step, so they share the machine's load; each step is timed
and the median over the steps after the warm-up is reported. The share of the step in the
optimizer is timed inside each step (clipping and ``step()``); the share in batch norm comes
from timing every batch-norm layer of the model alone (forward and backward on inputs of the
shapes and memory formats it sees, in the variant's implementation; with (d) that includes the
fused ReLU). Each variant's losses over all steps must agree with (a)'s to a relative 1e-4,
or, where training amplifies rounding more than that, to twice torch's own drift: the larger
difference of (a) from torch run again at another thread count and from torch's other
implementation of the rule (``foreach`` for the fused Adam and AdamW, the for-loop for RMSprop
and NAdam), measured in the same run. RMSprop's first steps move every weight by about 10 lr
whatever its gradient, and torch alone drifts by ~3e-3 over 20 steps of the MLP between 1 and
2 threads; on the ResNet with AdamW, torch's drift is 1.2e-3 between thread counts and 1.5e-3
between its fused and foreach AdamW, where optcore's variants differ by up to 2.5e-3.
"""
import copy
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import optcore
from optcore import clip as _clip
from optcore.torch import batchnorm as _bn
from optcore.torch import optim as _optim
from optcore.torch.models import MLP, ResNet18

__all__ = ["MODELS", "OPTIMIZERS", "VARIANTS", "DEEPSPEED_VARIANT", "DEEPSPEED_OPTIMIZERS",
           "make_variant", "deepspeed_adam", "make_deepspeed_variant", "train_step", "run",
           "format_table"]

#: Model configurations: name -> (memory format, batch size)
MODELS = {"resnet18": ("nchw", 32), "resnet18-cl": ("channels_last", 32), "mlp": ("rows", 256)}
OPTIMIZERS = ("adam", "adamw", "rmsprop", "nadam")
VARIANTS = ("(a) torch", "(b) optim", "(c) +bn", "(d) +bn-relu")
#: The baseline variant of ``run(deepspeed=True)``: (a) with DeepSpeed's CPU Adam
DEEPSPEED_VARIANT = "(a) deepspeed"
#: The optimizers of :data:`DEEPSPEED_VARIANT` (DeepSpeed's CPU Adam has Adam and AdamW)
DEEPSPEED_OPTIMIZERS = ("adam", "adamw")

# Learning rate 1e-4 for every rule: the Adam family and RMSprop move every weight by about
# lr (10 lr for RMSprop) in their first steps whatever its gradient, so float32 rounding
# differences grow during training; at 1e-3 the MLP's losses drift apart by 1e-2 in 20 steps
# between any two implementations (torch at 1 and at 2 threads included).
_HYPER = {"adam": dict(lr=1e-4), "adamw": dict(lr=1e-4, weight_decay=1e-2),
          "rmsprop": dict(lr=1e-4), "nadam": dict(lr=1e-4)}
_TORCH_NAME = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "nadam": "NAdam"}
_TORCH_FUSED = ("adam", "adamw")  # the rules with a fused CPU kernel in torch
_BATCHES = 20
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, _bn.BatchNormReLU1d, _bn.BatchNormReLU2d)
LOSS_RTOL = 1e-4


def _model_and_batch(name, quick):
    """A freshly seeded model (same weights every call) and its batches: a list of
    (inputs, targets) of random data, one per step of a default run (batches repeated are learnt
    by heart within a few steps, and near zero loss the relative loss check measures noise)."""
    fmt, batch = MODELS[name]
    torch.manual_seed(0)
    if name.startswith("resnet18"):
        model = ResNet18(width=4 if quick else 64)
        shape = (4 if quick else batch, 3, 16 if quick else 32, 16 if quick else 32)
        if fmt == "channels_last":
            model = model.to(memory_format=torch.channels_last)
    else:
        width = 32 if quick else 512
        model = MLP(in_features=width, width=width, depth=8)
        shape = (16 if quick else batch, width)
    batches = []
    for _ in range(_BATCHES):
        x = torch.randn(shape)
        if fmt == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        batches.append((x, torch.randint(0, 10, (shape[0],))))
    return model, batches


def make_variant(variant, model_name, opt_name, quick):
    """Build one variant of a benchmark step from the shared seeded weights.

    Parameters
    ----------
    variant : int
        Index into :data:`VARIANTS` (0 is pure torch).
    model_name : str
        A key of :data:`MODELS`.
    opt_name : str
        One of :data:`OPTIMIZERS`.
    quick : bool
        Tiny model and batches.

    Returns
    -------
    model, optimizer, batches
        ``batches`` is a list of ``(inputs, targets)`` the steps cycle through.
    """
    model, batches = _model_and_batch(model_name, quick)
    if variant >= 2:
        _bn.convert_batchnorm(model, "optcore", fuse_relu=variant == 3)
    hyper = _HYPER[opt_name]
    if variant == 0:
        cls = getattr(torch.optim, _TORCH_NAME[opt_name])
        flag = {"fused": True} if opt_name in _TORCH_FUSED else {"foreach": True}
        opt = cls(model.parameters(), **hyper, **flag)
    else:
        cls = getattr(_optim, _TORCH_NAME[opt_name])
        opt = cls(model.parameters(), **hyper, clip=_clip.GlobalNorm(1.0))
    return model, opt, batches


def deepspeed_adam(params, opt_name, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kw):
    """DeepSpeed's CPU Adam (``deepspeed.ops.adam.DeepSpeedCPUAdam``, the optimizer of
    ZeRO-Offload) over ``params`` for the rule ``opt_name`` of :data:`DEEPSPEED_OPTIMIZERS`
    with torch's hyper-parameter names: Adam, or AdamW's decoupled decay
    (``adamw_mode=True``). ``kw`` goes to the class (e.g. ``fp32_optimizer_states=False`` to
    keep bf16 state for bf16 parameters). It runs on the OpenMP runtime torch uses, so
    ``torch.set_num_threads`` sets its threads.

    Raises
    ------
    ImportError
        DeepSpeed is not installed (``pip install "optcore[deepspeed-baseline]"``; its kernel
        compiles on first use, about a minute).
    ValueError
        ``opt_name`` is not one of :data:`DEEPSPEED_OPTIMIZERS`.
    """
    if opt_name not in DEEPSPEED_OPTIMIZERS:
        raise ValueError(f"DeepSpeed's CPU Adam runs {', '.join(DEEPSPEED_OPTIMIZERS)}; "
                         f"not {opt_name!r}")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            adamw_mode=opt_name == "adamw", **kw)


def make_deepspeed_variant(model_name, opt_name, quick):
    """Variant (a) with :func:`deepspeed_adam` in place of torch's optimizer: the same model,
    batches and hyper-parameters. The parameters and the returned ``(model, optimizer,
    batches)`` are those of :func:`make_variant`, without ``variant``; ``opt_name`` is one of
    :data:`DEEPSPEED_OPTIMIZERS` (ValueError otherwise; ImportError without DeepSpeed)."""
    model, _, batches = make_variant(0, model_name, opt_name, quick)
    return model, deepspeed_adam(model.parameters(), opt_name, **_HYPER[opt_name]), batches


def train_step(model, opt, x, target, torch_clip):
    """One training step: zero_grad, forward, cross-entropy, backward, clipping (by
    ``clip_grad_norm_`` when ``torch_clip``, else inside the optimizer) and the step.

    Returns
    -------
    loss : float
    seconds : float
        Spent in clipping and ``opt.step()``.
    """
    opt.zero_grad()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    t0 = time.perf_counter()
    if torch_clip:
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), time.perf_counter() - t0


def _bn_seconds(model, x, repeats):
    """Seconds per step in the model's batch-norm layers: each layer timed alone (forward and
    backward, median of ``repeats``) on inputs of the shape and memory format it sees."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0], out)))
             for m in model.modules() if isinstance(m, _BN_TYPES)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for m, inp, out in seen:
        layer = copy.deepcopy(m)
        xin = inp.detach().clone().requires_grad_()
        dy = torch.randn_like(out)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            layer(xin).backward(dy)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times[1:])
    return total


def _rel_diff(losses, ref):
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


def _torch_losses(model, opt, batches, steps):
    return [train_step(model, opt, *batches[s % len(batches)], torch_clip=True)[0]
            for s in range(steps)]


def _torch_drift(model_name, opt_name, steps, quick, threads, ref):
    """The losses' drift of pure torch against itself, the noise floor of the loss check
    (float32 sums in another order, grown by training): the larger difference from ``ref``
    of (a) run at another thread count and of (a) with torch's other implementation of the
    rule (``foreach`` instead of ``fused``, or the for-loop instead of ``foreach``)."""
    model, opt, batches = make_variant(0, model_name, opt_name, quick)
    flag = {"foreach": opt_name in _TORCH_FUSED}
    other_impl = _torch_losses(model, type(opt)(model.parameters(), **_HYPER[opt_name], **flag),
                               batches, steps)
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    optcore.set_num_threads(other)
    try:
        other_threads = _torch_losses(*make_variant(0, model_name, opt_name, quick), steps)
    finally:
        torch.set_num_threads(threads)
        optcore.set_num_threads(threads)
    return max(_rel_diff(other_impl, ref), _rel_diff(other_threads, ref))


def _measure(model_name, opt_name, steps, warmup, quick, bn_time, threads, deepspeed):
    """Rows of the four variants of one (model, optimizer), and of (a) with DeepSpeed's CPU
    Adam when ``deepspeed`` and it has the rule, run interleaved step by step."""
    names = list(VARIANTS)
    setups = [make_variant(v, model_name, opt_name, quick) for v in range(len(VARIANTS))]
    bn_time = list(bn_time)
    if deepspeed and opt_name in DEEPSPEED_OPTIMIZERS:
        names.append(DEEPSPEED_VARIANT)
        setups.append(make_deepspeed_variant(model_name, opt_name, quick))
        bn_time.append(bn_time[0])  # torch's batch norm, as (a)
    torch_clip = [v == 0 or name == DEEPSPEED_VARIANT for v, name in enumerate(names)]
    times = [[] for _ in names]
    opt_times = [[] for _ in names]
    losses = [[] for _ in names]
    for s in range(steps):
        for v, (model, opt, batches) in enumerate(setups):
            x, target = batches[s % len(batches)]
            t0 = time.perf_counter()
            loss, t_opt = train_step(model, opt, x, target, torch_clip=torch_clip[v])
            if s >= warmup:
                times[v].append(time.perf_counter() - t0)
                opt_times[v].append(t_opt)
            losses[v].append(loss)
    rows = []
    base = statistics.median(times[0])
    floor = _torch_drift(model_name, opt_name, steps, quick, threads, losses[0])
    for v, name in enumerate(names):
        step_s = statistics.median(times[v])
        diff = _rel_diff(losses[v], losses[0])
        rows.append(dict(
            model=model_name.split("-")[0], format=MODELS[model_name][0], optimizer=opt_name,
            variant=name, step_s=step_s, speedup=base / step_s,
            bn_share=bn_time[v] / step_s, optim_share=statistics.median(opt_times[v]) / step_s,
            loss_rel_diff=diff, torch_drift=floor, losses=losses[v]))
    return rows


def run(models=tuple(MODELS), optimizers=OPTIMIZERS, threads=2, steps=20, warmup=5,
        quick=False, progress=None, deepspeed=False):
    """Time the four variants of a training step for every model and optimizer.

    Parameters
    ----------
    models : sequence of str
        Keys of :data:`MODELS`.
    optimizers : sequence of str
        Of :data:`OPTIMIZERS`.
    threads : int
        For torch (``torch.set_num_threads``) and optcore alike.
    steps : int
        Steps per variant (at least ``warmup + 1``); all of them enter the loss check.
    warmup : int
        First steps left out of the timing.
    quick : bool
        Tiny models and batches: a smoke test of seconds.
    progress : callable, optional
        Called with a line of text before each measurement.
    deepspeed : bool
        Also time :data:`DEEPSPEED_VARIANT` for the optimizers of
        :data:`DEEPSPEED_OPTIMIZERS` (needs DeepSpeed; ImportError without it).

    Returns
    -------
    dict
        ``config`` (the arguments and versions), ``rows`` (one dict per model, optimizer and
        variant: ``step_s``, ``speedup`` over (a), ``bn_share``, ``optim_share``,
        ``loss_rel_diff`` against (a), ``torch_drift`` -- the larger difference of (a) from
        torch at another thread count and from torch's other implementation of the rule --
        and ``losses``) and ``losses_agree`` (every relative difference of
        variants (b)-(d) <= max(1e-4, 2 torch_drift)); with ``deepspeed``, also
        ``deepspeed_losses_agree``, the same check of :data:`DEEPSPEED_VARIANT`'s rows.
    """
    if steps <= warmup:
        raise ValueError(f"steps must exceed warmup ({warmup}), got {steps}")
    config = dict(models=list(models), optimizers=list(optimizers), threads=threads,
                  steps=steps, warmup=warmup, quick=quick, torch=torch.__version__)
    if deepspeed:
        try:
            import deepspeed as ds
        except ImportError as exc:
            raise ImportError("deepspeed=True needs DeepSpeed "
                              f"(pip install \"optcore[deepspeed-baseline]\"): {exc}") from exc
        config["deepspeed"] = ds.__version__
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    optcore.set_num_threads(threads)
    rows = []
    try:
        for model_name in models:
            if progress:
                progress(f"{model_name}: timing the batch-norm layers")
            bn = []
            for v in range(len(VARIANTS)):
                model, _, batches = make_variant(v, model_name, "adam", quick)
                bn.append(_bn_seconds(model, batches[0][0], repeats=3 if quick else 10))
            for opt_name in optimizers:
                if progress:
                    extra = deepspeed and opt_name in DEEPSPEED_OPTIMIZERS
                    progress(f"{model_name} {opt_name}: {steps} steps x "
                             f"{len(VARIANTS) + extra} variants")
                rows += _measure(model_name, opt_name, steps, warmup, quick, bn, threads,
                                 deepspeed)
    finally:
        torch.set_num_threads(before)
        optcore.set_num_threads(None)
    baseline = [r["variant"] == DEEPSPEED_VARIANT for r in rows]
    result = dict(config=config, rows=rows,
                  losses_agree=all(_agrees(r) for r, b in zip(rows, baseline) if not b))
    if deepspeed:
        result["deepspeed_losses_agree"] = all(_agrees(r) for r, b in zip(rows, baseline) if b)
    return result


def _agrees(row):
    """The loss check: within 1e-4 relative of (a), or within twice torch's own drift (another
    thread count, another implementation) when that is larger (training amplifies rounding
    differences)."""
    return row["loss_rel_diff"] <= max(LOSS_RTOL, 2.0 * row["torch_drift"])


def format_table(result):
    """The rows of :func:`run` as a text table, with the loss check below it."""
    head = (f"{'model':<9}{'format':<15}{'optimizer':<10}{'variant':<14}{'step ms':>9}"
            f"{'x (a)':>7}{'BN %':>7}{'optim %':>9}{'loss diff':>11}{'torch drift':>13}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<9}{r['format']:<15}{r['optimizer']:<10}{r['variant']:<14}"
            f"{r['step_s'] * 1e3:>9.2f}{r['speedup']:>7.2f}{r['bn_share'] * 100:>7.1f}"
            f"{r['optim_share'] * 100:>9.1f}{r['loss_rel_diff']:>11.1e}{r['torch_drift']:>13.1e}")
    cfg = result["config"]
    ds = [r["loss_rel_diff"] for r in result["rows"] if r["variant"] == DEEPSPEED_VARIANT]
    worst = max((r["loss_rel_diff"] for r in result["rows"] if r["variant"] != DEEPSPEED_VARIANT),
                default=0.0)
    lines.append("")
    lines.append(
        f"threads {cfg['threads']}, median of steps {cfg['warmup'] + 1}-{cfg['steps']}; "
        f"losses over {cfg['steps']} steps agree with (a) to {LOSS_RTOL:g} relative, or to "
        f"twice torch's own drift (another thread count or implementation): "
        f"{'yes' if result['losses_agree'] else 'NO'} (largest difference {worst:.1e})")
    if ds:
        lines.append(
            f"{DEEPSPEED_VARIANT}, the same check: "
            f"{'yes' if result['deepspeed_losses_agree'] else 'NO'} (largest difference "
            f"{max(ds):.1e}; not in the exit status)")
    return "\n".join(lines)
