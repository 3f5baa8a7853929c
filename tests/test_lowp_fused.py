"""Adam's one-loop low-precision paths (oc_adam_lp_sweep in oc_optim.h): bfloat16 parameters
(rounded stochastically or to nearest) with bfloat16 or float32 gradients and state, and
float32 master weights with 16-bit gradients and a 16-bit model copy, converted inside the
rule's loop. They must give the bits of the tile path they replace:

- against a float32 NumPy implementation of the documented step (oc_optim.h: the kernel's
  float32 operations in the same order) with the documented rounding (oc_lowp.h: the
  counter-based hash, stochastic rounding from its bits, round to nearest even), written here
  independently of the C code;
- against digests of the outputs of the tile path (recorded with the build of main at commit
  b133a26, before the one-loop paths existed) over shapes that are not multiples of the tile
  (512) or chunk (16384), NaN and inf entries, decoupled decay, ``maximize`` with global-norm
  clipping (a scale other than 1), and the settings that keep the tile path (coupled weight
  decay, AMSGrad), with 1 and 2 threads.
"""
import hashlib

import ml_dtypes
import numpy as np
import pytest

import optcore
from optcore.clip import GlobalNorm

BF16, F16, F32 = ml_dtypes.bfloat16, np.float16, np.float32
SHAPES = [(40007,), (513,), (3, 7), (16384,)]
STEPS = 3

# name: (param dtype, grad dtype, state_dtype, model copy dtype, optimizer keywords)
CASES = {
    "bf16all-sr": (BF16, BF16, "bfloat16", None, {}),
    "bf16all-nearest": (BF16, BF16, "bfloat16", None, dict(rounding="nearest")),
    "bf16-f32grad-sr": (BF16, F32, "bfloat16", None, {}),
    "bf16-f32state-sr": (BF16, BF16, "float32", None, {}),
    "master-bf16": (F32, BF16, "float32", BF16, {}),
    "master-bf16-bf16state": (F32, BF16, "bfloat16", BF16, {}),
    "master-f16": (F32, F16, "float32", F16, {}),
    "master-f32grad": (F32, F32, "float32", BF16, {}),
    # checked against the NumPy reference only (added after the digests were recorded)
    "bf16-f32grad-f32state-sr": (BF16, F32, "float32", None, {}),
    "master-f16grad-bf16copy": (F32, F16, "float32", BF16, {}),
}
# name: (class, hyper-parameters, optimizer keywords, whether grads get NaN / inf entries)
VARIANTS = {
    "adam": (optcore.Adam, dict(lr=0.01), {}, True),
    "adamw": (optcore.AdamW, dict(lr=0.01, weight_decay=0.1), {}, True),
    "maximize": (optcore.Adam, dict(lr=0.01, maximize=True), {}, True),
    "maximize-clip": (optcore.Adam, dict(lr=0.01, maximize=True), dict(clip=GlobalNorm(0.5)),
                      False),
    "l2": (optcore.Adam, dict(lr=0.01, weight_decay=0.01), {}, True),
    "amsgrad": (optcore.Adam, dict(lr=0.01, amsgrad=True), {}, True),
}


def grads(shape, step, dtype, nonfinite):
    rng = np.random.default_rng(100 + step)
    g = rng.standard_normal(shape).astype(F32).reshape(-1)
    if nonfinite and g.size > 600:
        g[[5, 517, 600]] = [np.nan, np.inf, -np.inf]
    return g.reshape(shape).astype(dtype)


def run_case(case, variant, threads):
    """Three steps of ``variant`` in mode ``case``; returns (params, copies, states, per-step
    inputs) with the inputs each step saw (params, grads, states), for the reference."""
    pdt, gdt, state_dtype, cdt, extra = CASES[case]
    cls, hyper, kw, nonfinite = VARIANTS[variant]
    rng = np.random.default_rng(7)
    ps = [rng.standard_normal(s).astype(F32).astype(pdt) for s in SHAPES]
    ps[0].reshape(-1)[[3, 700, 701]] = [np.nan, np.inf, -np.inf]
    gs = [np.zeros(s, gdt) for s in SHAPES]
    copies = None if cdt is None else [np.zeros(s, cdt) for s in SHAPES]
    optcore.set_num_threads(threads)
    try:
        opt = cls(list(zip(ps, gs)), **hyper, **kw, **extra, state_dtype=state_dtype,
                  model_copy=copies, seed=12345)
        seen = []
        for t in range(STEPS):
            for g in gs:
                g[...] = grads(g.shape, t, gdt, nonfinite)
            seen.append(([p.copy() for p in ps], [g.copy() for g in gs],
                         [{k: v.copy() for k, v in opt.state_of(i).items()}
                          for i in range(len(ps))]))
            opt.step()
    finally:
        optcore.set_num_threads(None)
    states = [opt.state_of(i) for i in range(len(ps))]
    return ps, copies, states, seen


def digest(ps, copies, states):
    h = hashlib.sha256()
    for i, p in enumerate(ps):
        h.update(p.tobytes())
        if copies is not None:
            h.update(copies[i].tobytes())
        for k in sorted(states[i]):
            h.update(k.encode() + states[i][k].tobytes())
    return h.hexdigest()[:20]


# ---- the documented step and rounding in NumPy ----------------------------------------------

def mix32(x):
    """oc_lowp.h's integer mixer on uint32 arrays (wrapping arithmetic)."""
    x = np.asarray(x, np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0xD35A2D97)
    x ^= x >> np.uint32(15)
    return x


def stream(seed, step, tensor, slot, n):
    """The random words of elements 0..n-1 of one tensor's slot: mix32(base + k)."""
    key = mix32(np.uint32(seed) ^ mix32(np.uint32((step + 0x9E3779B9) & 0xFFFFFFFF)))
    base = mix32(key ^ mix32(np.uint32((tensor * 16 + slot + 0x85EBCA6B) & 0xFFFFFFFF)))
    return mix32(base + np.arange(n, dtype=np.uint32))


def to_bf16(x, r=None):
    """Stochastic rounding with the low 16 bits of r, or to nearest even; NaN stays quiet."""
    u = x.view(np.uint32)
    add = (r & np.uint32(0xFFFF)) if r is not None else np.uint32(0x7FFF) + ((u >> 16) & 1)
    w = np.where(np.isnan(x), u | np.uint32(0x400000), u + add)
    return (w >> np.uint32(16)).astype(np.uint16).view(BF16)


def to_f16(x):
    with np.errstate(over="ignore"):
        h = x.astype(F16).view(np.uint16)
    sign = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(x), np.uint16(0x7E00) | sign, h).view(F16)


def reference_step(case, variant, step, p, g, st, tensor, seed=12345):
    """One step of one tensor: the kernel's float32 operations (oc_optim.h: g * scale, decay,
    then oc_adam_tile's formula) and the rounding of each output (oc_lowp.h)."""
    pdt, gdt, state_dtype, cdt, extra = CASES[case]
    _, hyper, _, _ = VARIANTS[variant]
    lr, (b1, b2), eps = hyper["lr"], (0.9, 0.999), 1e-8
    wd = hyper.get("weight_decay", 0.0) if variant == "adamw" else 0.0
    f = F32
    x = p.astype(f).reshape(-1)
    gr = g.astype(f).reshape(-1)
    if hyper.get("maximize"):
        gr = gr * f(-1.0)
    if wd:
        x = x * f(1.0 - lr * wd)
    m = f(b1) * st["exp_avg"].reshape(-1) + f(1.0 - b1) * gr
    v = f(b2) * st["exp_avg_sq"].reshape(-1) + f(1.0 - b2) * (gr * gr)
    ss, bc2s = f(lr / (1.0 - b1**step)), f(np.sqrt(1.0 - b2**step))
    with np.errstate(invalid="ignore"):
        x = x - ss * (m / (np.sqrt(v) / bc2s + f(eps)))
    n = x.size
    out = {}
    if state_dtype == "bfloat16":
        r = stream(seed, step, tensor, 3, n)
        m, v = to_bf16(m, r).astype(f), to_bf16(v, r >> np.uint32(16)).astype(f)
    out["state"] = {"exp_avg": m, "exp_avg_sq": v}
    if pdt == F32:
        out["param"] = x
        out["copy"] = to_bf16(x) if cdt == BF16 else to_f16(x)
    elif extra.get("rounding") == "nearest":
        out["param"] = to_bf16(x)
    else:
        out["param"] = to_bf16(x, stream(seed, step, tensor, 0, n))
    return out


def same(got, want, what):
    """Bitwise equal, NaN against NaN (a NaN's payload may come from either operand)."""
    got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    assert got.dtype == want.dtype, what
    gn, wn = np.isnan(got.astype(F32)), np.isnan(want.astype(F32))
    np.testing.assert_array_equal(gn, wn, err_msg=what)
    bits = np.uint16 if got.itemsize == 2 else np.uint32
    np.testing.assert_array_equal(got[~gn].view(bits), want[~wn].view(bits), err_msg=what)


@pytest.mark.parametrize("variant", ["adam", "adamw", "maximize"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_is_the_documented_float32_step_and_rounding(case, variant):
    """Each of the three steps, from the inputs it saw, against the NumPy reference: params,
    model copy and state bitwise (NaN positions equal)."""
    ps, copies, states, seen = run_case(case, variant, 2)
    seen.append((ps, None, states))
    for t in range(STEPS):
        p_in, g_in, st_in = seen[t]
        p_out, _, st_out = seen[t + 1]
        for i in range(len(SHAPES)):
            want = reference_step(case, variant, t + 1, p_in[i], g_in[i], st_in[i], i)
            same(p_out[i], want["param"], f"param {i} step {t}")
            for k in ("exp_avg", "exp_avg_sq"):
                same(st_out[i][k], want["state"][k], f"{k} {i} step {t}")
            if t == STEPS - 1 and copies is not None:
                same(copies[i], want["copy"], f"copy {i}")


# Recorded from the tile path (main at b133a26), 1 and 2 threads alike.
GOLDEN = {
    ('bf16all-sr', 'adam'): '007f3c3de15522a33018',
    ('bf16all-sr', 'adamw'): '55e1332aa62c37b0130d',
    ('bf16all-sr', 'maximize'): 'b989e045d9b8763c969e',
    ('bf16all-sr', 'maximize-clip'): '332444fd99e8c8439b88',
    ('bf16all-sr', 'l2'): '5c098d814ebbc9cf3875',
    ('bf16all-sr', 'amsgrad'): 'bfbc7af3f7df0f2d472c',
    ('bf16all-nearest', 'adam'): '7616a4c403e09074515a',
    ('bf16all-nearest', 'adamw'): 'a7597dd55dcae3aaa21a',
    ('bf16all-nearest', 'maximize'): '64d62e46fbeadb76c1a3',
    ('bf16all-nearest', 'maximize-clip'): 'a46ed2e41458aafb2623',
    ('bf16all-nearest', 'l2'): '6577f14b0aea93add23c',
    ('bf16all-nearest', 'amsgrad'): '89b11cd0ba7dec2326c8',
    ('bf16-f32grad-sr', 'adam'): '61b1700164c52f6f9137',
    ('bf16-f32grad-sr', 'adamw'): '74d275554d75586c2844',
    ('bf16-f32grad-sr', 'maximize'): '86956c42732db2a285b3',
    ('bf16-f32grad-sr', 'maximize-clip'): 'b6b8840c7ccdd373758c',
    ('bf16-f32grad-sr', 'l2'): '99383741cb550da8140e',
    ('bf16-f32grad-sr', 'amsgrad'): 'b2e9cbc304f948b77894',
    ('bf16-f32state-sr', 'adam'): '1fdc468ecac977fe6265',
    ('bf16-f32state-sr', 'adamw'): '3b518d0a86264b910f33',
    ('bf16-f32state-sr', 'maximize'): '1dab5f828a9b97e6a189',
    ('bf16-f32state-sr', 'maximize-clip'): 'd50d3b5f21b45fe1c2f6',
    ('bf16-f32state-sr', 'l2'): 'e7d201056a8b24313a78',
    ('bf16-f32state-sr', 'amsgrad'): 'df3d12578104f9f37672',
    ('master-bf16', 'adam'): '3cd635c5a5bb5881bb4a',
    ('master-bf16', 'adamw'): '0065dddf2425d5df7329',
    ('master-bf16', 'maximize'): 'e865a00ed424652ed279',
    ('master-bf16', 'maximize-clip'): '7e19fbbd4764ac0ea8eb',
    ('master-bf16', 'l2'): '442adacd21d63bc9db98',
    ('master-bf16', 'amsgrad'): '2acddd5898820fb1865f',
    ('master-bf16-bf16state', 'adam'): 'f39c69a436d71e8451ee',
    ('master-bf16-bf16state', 'adamw'): '45641b4656190d143da0',
    ('master-bf16-bf16state', 'maximize'): '47aa856ef72122fc13eb',
    ('master-bf16-bf16state', 'maximize-clip'): '628c5cf4fc11d9495a52',
    ('master-bf16-bf16state', 'l2'): '04e9958c466287eb4f68',
    ('master-bf16-bf16state', 'amsgrad'): 'e0b2cc87cadc1006b53c',
    ('master-f16', 'adam'): '8be3b83dfebce29e3469',
    ('master-f16', 'adamw'): 'e056420fc8bc940d4d2e',
    ('master-f16', 'maximize'): '3872bde7e2835095492d',
    ('master-f16', 'maximize-clip'): 'd17a7576d8ff6b0cc739',
    ('master-f16', 'l2'): 'c2fd98ab1cb3a4d36be3',
    ('master-f16', 'amsgrad'): 'f03150c3979f483f05bd',
    ('master-f32grad', 'adam'): 'b5a0828ed67771834f9e',
    ('master-f32grad', 'adamw'): '09acc8f9baef4a167c7f',
    ('master-f32grad', 'maximize'): 'd2bbb399012ba3dad30d',
    ('master-f32grad', 'maximize-clip'): '508964cef28b02fec2b7',
    ('master-f32grad', 'l2'): '0075bcf2daad38204ecf',
    ('master-f32grad', 'amsgrad'): '2be0f4cf88597f838325',
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case,variant", list(GOLDEN))
def test_bits_of_the_tile_path(case, variant, threads):
    ps, copies, states, _ = run_case(case, variant, threads)
    assert digest(ps, copies, states) == GOLDEN[case, variant]


def _bf16_bits(rng, n):
    """n bfloat16 values as uint16: mostly normal values, one in ten a random bit pattern
    (NaN payloads, signalling NaNs, inf, subnormals, huge and tiny values)."""
    x = rng.standard_normal(n).astype(F32).astype(BF16).view(np.uint16)
    wild = rng.random(n) < 0.1
    x[wild] = rng.integers(0, 1 << 16, int(wild.sum()), dtype=np.uint16)
    x[:4] = [0x7F81, 0xFFC1, 0x7FFF, 0xFF80]  # sNaN, -qNaN with payload, all-ones NaN, -inf
    return x


def _pairs_run(pairs, rounding, cls, hyper, threads):
    """Two steps of bfloat16 Adam on one odd-length tensor at an address 2 mod 4 (a view one
    element into its buffer), from random bits in p, g, m and v; returns every output bit."""
    rng = np.random.default_rng(11)
    n = 40007
    bufs = [np.empty(n + 1, np.uint16) for _ in range(2)]
    p, g = (b[1:].view(BF16) for b in bufs)
    p.view(np.uint16)[...] = _bf16_bits(rng, n)
    g.view(np.uint16)[...] = _bf16_bits(rng, n)
    opt = cls([(p, g)], **hyper, state_dtype="bfloat16", rounding=rounding, seed=3)
    sd = opt.state_dict()
    for k in ("group0.state.exp_avg.uint16.1", "group0.state.exp_avg_sq.uint16.1"):
        sd[k] = _bf16_bits(rng, n)
    opt.load_state_dict(sd)
    was = optcore._kernels._optim.bf16_pairs(pairs)
    optcore.set_num_threads(threads)
    try:
        for _ in range(2):
            opt.step()
            g.view(np.uint16)[...] = _bf16_bits(rng, n)
    finally:
        optcore.set_num_threads(None)
        optcore._kernels._optim.bf16_pairs(was)
    sd = opt.state_dict()
    return [p.view(np.uint16).copy(), sd["group0.state.exp_avg.uint16.1"],
            sd["group0.state.exp_avg_sq.uint16.1"]]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["adam", "adamw-maximize"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bf16_pairs_are_bitwise_the_one_element_loop(rounding, variant, threads):
    """Two elements per 32-bit word and no NaN selects (oc_adam_bf16_pairs) must give every
    bit of the one-element loop, NaN payloads included, on random bit patterns in all four
    inputs, an odd length and an address that is not 4-byte aligned."""
    cls, hyper = {"adam": (optcore.Adam, dict(lr=0.01)),
                  "adamw-maximize": (optcore.AdamW, dict(lr=0.01, weight_decay=0.1,
                                                         maximize=True))}[variant]
    assert optcore._kernels._optim.bf16_pairs()
    got = _pairs_run(True, rounding, cls, hyper, threads)
    want = _pairs_run(False, rounding, cls, hyper, threads)
    assert np.isnan(got[0].view(BF16).astype(F32)).sum() > 1000
    for a, b, what in zip(got, want, ("param", "exp_avg", "exp_avg_sq")):
        np.testing.assert_array_equal(a, b, err_msg=what)
