import numpy as np

import optcore


def test_adam_matches_float64_formula(rng):
    n = 50_000
    p = rng.standard_normal(n).astype(np.float32)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    p64, m64, v64 = p.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 21):
        g = rng.standard_normal(n).astype(np.float32)
        optcore.kernels.adam_(p, g, m, v, step=t, lr=1e-2)
        m64 = 0.9 * m64 + 0.1 * g
        v64 = 0.999 * v64 + 0.001 * g.astype(np.float64) ** 2
        p64 -= 1e-2 / (1 - 0.9**t) * m64 / (np.sqrt(v64) / np.sqrt(1 - 0.999**t) + 1e-8)
    # 20 steps, each exact to a few float32 ulps of |p| ~ 1: 1e-5 absolute bounds the drift.
    np.testing.assert_allclose(p, p64, rtol=0, atol=1e-5)
