"""The results of every kernel family on fixed inputs, to compare two builds bit for bit.

docs/performance.rst promises that the instruction-set paths of the kernels (x86-64-v4, AVX2
and x86-64, and OpenMP or not) compute the same bits: no FMA contraction, no reassociation,
fixed chunks and reduction order. A machine's loader only ever runs its best path, so CI builds
the others alone (``-Disa=avx2`` without OpenMP, ``-Disa=x86-64`` under the sanitizers) and
compares each with the dispatch build:

    python tests/isa_fingerprint.py write FILE    # the dispatch build
    python tests/isa_fingerprint.py check FILE    # a build of one path: exit 1 on a difference

Covered: the six update kernels in every configuration of tests/test_kernels.py (four steps,
a 70001-element tensor spanning five chunks and a 33-element one); every optimizer class of
tests/test_lowp.py with bfloat16 and 8-bit state and with each 16-bit parameter mode of
tests/test_lowp_params.py (three steps); norms and clipping of float32 and 16-bit gradients;
the EMA, accumulation and max-norm kernels; batch norm forward and backward in every layout,
with and without the fused ReLU.
"""
import hashlib
import json
import sys

import ml_dtypes
import numpy as np

import optcore
from optcore import kernels

import test_lowp as lowp
import test_lowp_params as lowp_params
from test_kernels import CONFIGS, kernel_call, make_state

SHAPES = [(70001,), (33,)]


def _update_kernels(out):
    for c, (rule, h) in enumerate(CONFIGS):
        rng = np.random.default_rng(c)
        params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        grads = [np.empty(s, np.float32) for s in SHAPES]
        states = make_state(rule, h, SHAPES)
        mu = 1.0
        for step in range(1, 5):
            for g in grads:
                g[...] = rng.standard_normal(g.shape).astype(np.float32)
            mu = kernel_call(rule, params, grads, states, step=step, h=h, mu_product=mu)
        for i, p in enumerate(params):
            out[f"kernel{c}.{rule}.param{i}"] = p
            for k, v in states.items():
                out[f"kernel{c}.{rule}.{k}{i}"] = v[i]


def _results_of(out, name, opt, ps, extra=()):
    for i, p in enumerate(ps):
        out[f"{name}.param{i}"] = p
        for k, v in opt.state_of(i).items():
            out[f"{name}.{k}{i}"] = np.asarray(v)
    for label, arrays in extra:
        for i, a in enumerate(arrays):
            out[f"{name}.{label}{i}"] = a


def _optimizers(out):
    for c, (cls, hyper) in enumerate(lowp.ALL):
        for state_dtype in ("bfloat16", "int8"):
            opt, ps, gs = lowp.make(cls, hyper, state_dtype, n=SHAPES[0][0], small=SHAPES[1][0],
                                    seed=100 + c, min_8bit_size=32)
            lowp.run(opt, ps, gs, 3)
            _results_of(out, f"opt{c}.{cls.__name__}.{state_dtype}", opt, ps)
        for mode in lowp_params.MODES:
            opt, ps, gs, copies = lowp_params.make(mode, cls, hyper, shapes=SHAPES, seed=200 + c)
            for t in range(3):
                lowp_params.set_grads(ps, gs, t)
                opt.step()
            comp = opt._groups[0].comp
            _results_of(out, f"opt{c}.{cls.__name__}.{mode}", opt, ps,
                        [("copy", copies or []),
                         ("compensation", comp.arrays if comp is not None else [])])


def _norms_and_clipping(out):
    rng = np.random.default_rng(300)
    base = [(rng.standard_normal(s) * 3).astype(np.float32) for s in SHAPES]
    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        grads = [b.astype(dtype) for b in base]
        tag = np.dtype(dtype).name
        for norm_type in (2, float("inf")):
            out[f"norm.{tag}.global.{norm_type}"] = np.float64(kernels.global_norm(grads, norm_type))
            out[f"norm.{tag}.tensors.{norm_type}"] = np.asarray(kernels.tensor_norms(grads, norm_type))
    for name, clip in (("global", lambda g: kernels.clip_by_global_norm_(g, 10.0)),
                       ("pertensor", lambda g: kernels.clip_by_norm_(g, 5.0)),
                       ("value", lambda g: kernels.clip_by_value_(g, 1.5))):
        grads = [b.copy() for b in base]
        res = clip(grads)
        if res is not None:
            out[f"clip.{name}.result"] = np.asarray(res, np.float64)
        for i, g in enumerate(grads):
            out[f"clip.{name}.grad{i}"] = g
    params = [b * 0.5 + 1.0 for b in base]
    grads = [b.copy() for b in base]
    kernels.adaptive_clip_(params, grads, clipping=0.01)
    for i, g in enumerate(grads):
        out[f"clip.adaptive.grad{i}"] = g
    avg = [b * 0.25 for b in base]
    kernels.ema_update_(avg, params, 0.999)
    acc = [np.zeros_like(b) for b in base]
    kernels.accumulate_(acc, base, first=True)
    kernels.accumulate_(acc, params)
    for i in range(len(base)):
        out[f"ema.avg{i}"] = avg[i]
        out[f"accumulate.acc{i}"] = acc[i]
    weight = (rng.standard_normal((300, 70)) * 2).astype(np.float32)
    kernels.max_norm_(weight, 3.0)
    out["max_norm.weight"] = weight


def _batchnorm(out):
    shapes = {"NC": (64, 48), "NCHW": (8, 12, 9, 7), "NHWC": (8, 9, 7, 12)}
    for layout, shape in shapes.items():
        rng = np.random.default_rng(400)
        c = shape[1] if layout != "NHWC" else shape[-1]
        x = (rng.standard_normal(shape) * 2 + 100).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        gamma = rng.standard_normal(c).astype(np.float32)
        beta = rng.standard_normal(c).astype(np.float32)
        for act in (None, "relu"):
            tag = f"bn.{layout}.{act}"
            rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
            y, mean, invstd = kernels.batchnorm_forward(x, gamma, beta, layout=layout,
                                                        running_mean=rm, running_var=rv,
                                                        activation=act)
            dx, dgamma, dbeta = kernels.batchnorm_backward(dy, x, gamma, mean, invstd,
                                                           layout=layout, activation=act,
                                                           y=y if act else None)
            for k, v in dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv,
                             dx=dx, dgamma=dgamma, dbeta=dbeta).items():
                out[f"{tag}.{k}"] = np.asarray(v)


def fingerprint():
    """Every result above, by name."""
    out = {}
    _update_kernels(out)
    _optimizers(out)
    _norms_and_clipping(out)
    _batchnorm(out)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def digests(fp):
    """Each result as ``dtype shape sha256-of-its-bytes``."""
    return {k: f"{v.dtype.name} {v.shape} {hashlib.sha256(v.tobytes()).hexdigest()}"
            for k, v in fp.items()}


def differences(expected, actual):
    """Names whose digests differ (dtype, shape or any bit), or that only one side has."""
    return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__.strip().splitlines()[0], "\nusage: isa_fingerprint.py write|check FILE",
              file=sys.stderr)
        return 2
    cfg = optcore.config()
    build = f"isa {cfg['isa']} ({'dispatch' if cfg['isa_dispatch'] else 'one path'}), " \
            f"openmp {'yes' if cfg['openmp'] else 'no'}"
    fp = digests(fingerprint())
    if argv[0] == "write":
        with open(argv[1], "w") as f:
            json.dump(fp, f, indent=0, sort_keys=True)
        print(f"isa_fingerprint: wrote {len(fp)} results of the {build} build to {argv[1]}")
        return 0
    with open(argv[1]) as f:
        bad = differences(json.load(f), fp)
    if bad:
        print(f"isa_fingerprint: the {build} build differs in {len(bad)} of {len(fp)} "
              f"results: {', '.join(bad[:20])}", file=sys.stderr)
        return 1
    print(f"isa_fingerprint: the {build} build matches all {len(fp)} results bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
