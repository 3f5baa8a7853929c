"""What an optimizer step does to the gradient before the update: the norm pass, the
non-finite check and the clipping decision.

Shared by the NumPy optimizers (``optcore.optim``) and the torch drop-ins
(``optcore.torch.optim``), so both clip, skip and report alike. A *part* is anything with a
kernel ``table`` (a :class:`~optcore._kernels._runtime.TensorList`, slot 1 the gradient) and a
``units`` table (or None) over the rows of the same tensors for adaptive clipping.
"""
import math
from typing import NamedTuple

import numpy as np

from optcore import _checks as ck
from optcore import clip as _clip
from optcore._kernels import _norms

NONFINITE = ("propagate", "skip", "raise")

# Policies that need the norm pass.
_BY_NORM = (_clip.GlobalNorm, _clip.PerTensorNorm, _clip.Adaptive)


def options(clip, nonfinite, accumulate=1):
    """Check ``clip``, ``nonfinite`` and ``accumulate`` together, at construction."""
    if isinstance(clip, (list, tuple)):
        raise ValueError(
            f"clip takes one policy, got {len(clip)}: combining clipping policies is ambiguous "
            "(which one first?); clip by one, or clip explicitly with optcore.clip"
        )
    if clip is not None and not isinstance(clip, _clip.ClipPolicy):
        raise TypeError(
            "clip must be None or an optcore.clip policy (GlobalNorm, PerTensorNorm, Value, "
            f"Adaptive), got {type(clip).__name__}"
        )
    if not isinstance(nonfinite, str):
        raise TypeError(f"nonfinite must be a str, got {type(nonfinite).__name__}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    accumulate = ck.positive_int("accumulate", accumulate)
    return clip, nonfinite, accumulate


def needs_norm_pass(clip, nonfinite):
    """Whether a step with this policy reads the gradient once before the update."""
    return nonfinite != "propagate" or isinstance(clip, _BY_NORM)


def sums(table, units, unit_tensor, acc_slot):
    """Norm pass over the gradient (+ accumulator) of one part: per-tensor sums of squares and
    max-abs, and per-unit sums of squares when the part has a unit table (``unit_tensor[u]``
    is the tensor of unit ``u``)."""
    if units is None:
        tsq, tmax = _norms.sumsq(table, 1, acc_slot)
        return tsq, tmax, None
    usq, umax = _norms.sumsq(units, 1, acc_slot)
    n = table.ntensors
    tsq = np.bincount(unit_tensor, weights=usq, minlength=n).astype(np.float64)
    tmax = np.zeros(n)
    np.maximum.at(tmax, unit_tensor, umax)
    return tsq, tmax, usq


class Decision(NamedTuple):
    """How the update reads the gradient: ``clamp(grad * scale * tensor_scale[part])``."""

    grad_norm: object
    clip_factor: float
    scale: float
    tensor_scale: list
    clamp: float


def decide(parts, clip, nonfinite, mult, *, acc_slot=-1, norm_pass=False, skip=False,
           name_of=None):
    """Run the norm pass when needed and decide the clipping of one step.

    ``mult`` turns the gradient buffers into the gradient (loss unscaling, accumulation mean);
    ``norm_pass`` forces the pass (a scaler looks for overflows), ``skip`` skips the step on a
    non-finite gradient whatever ``nonfinite`` says. ``name_of(i)`` names tensor ``i``
    counted over all parts, for ``nonfinite="raise"``. Returns None when the step must be
    skipped, else a :class:`Decision`. Every part's ``sums(acc_slot)`` gives its norm pass.
    """
    n = len(parts)
    grad_norm, clip_factor = None, 1.0
    scale, tensor_scale, clamp = mult, [None] * n, math.inf
    if norm_pass or needs_norm_pass(clip, nonfinite):
        partial = [p.sums(acc_slot) for p in parts]
        tsq = np.concatenate([s[0] for s in partial]) if n else np.zeros(0)
        tmax = np.concatenate([s[1] for s in partial]) if n else np.zeros(0)
        if not math.isfinite(float(np.sum(tsq))):
            if skip or nonfinite == "skip":
                return None
            if nonfinite == "raise":
                raise FloatingPointError(
                    f"gradient of {name_of(_clip.first_nonfinite(tsq))} has a non-finite value "
                    "(NaN or inf); nothing was changed"
                )
        grad_norm = _clip.combine(tsq, tmax, getattr(clip, "norm_type", 2.0)) * mult
        if isinstance(clip, _clip.GlobalNorm):
            clip_factor = _clip.factor(grad_norm, clip.max_norm)
            scale = mult * clip_factor
        elif isinstance(clip, _clip.PerTensorNorm):
            tensor_scale, clip_factor = _per_tensor_factors(partial, mult, clip)
        elif isinstance(clip, _clip.Adaptive):
            tensor_scale, clip_factor = _unit_factors(parts, partial, mult, clip)
    if isinstance(clip, _clip.Value):
        clamp = clip.limit
    return Decision(grad_norm, clip_factor, scale, tensor_scale, clamp)


def _per_tensor_factors(partial, mult, clip):
    out, smallest = [], 1.0
    for tsq, tmax, _ in partial:
        norms = (np.sqrt(tsq) if clip.norm_type == 2.0 else tmax) * mult
        f = clip.max_norm / (norms + _clip.EPS)
        f = np.where(f >= 1.0, 1.0, f)
        if f.size:
            smallest = min(smallest, float(np.min(f)))
        out.append(np.ascontiguousarray(f, dtype=np.float32))
    return out, smallest


def _unit_factors(parts, partial, mult, clip):
    """AGC factors of every unit, from the unit-wise norms of the weights (one read) and of
    the (unscaled, averaged) gradient from the norm pass."""
    out, smallest = [], 1.0
    for p, (_, _, usq) in zip(parts, partial):
        psq, _ = _norms.sumsq(p.units, 0)
        f = _clip._agc_factors(np.sqrt(psq), np.sqrt(usq) * mult, clip.clipping, clip.eps)
        if f.size:
            smallest = min(smallest, float(np.min(f)))
        out.append(f)
    return out, smallest
