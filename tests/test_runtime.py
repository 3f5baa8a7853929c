"""Runtime: thread count, OMP_NUM_THREADS, threadpoolctl, determinism across thread counts,
concurrent calls, flush-to-zero, and the configuration report."""
import io
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

import optcore
from optcore._kernels import _norms, _runtime
from optcore._kernels._runtime import TensorList

from test_kernels import CONFIGS, CONFIG_IDS, kernel_call, make_state


OPENMP = optcore.config()["openmp"]


def effective(n):
    """What get_num_threads reports after set_num_threads(n): 1 in a build without OpenMP."""
    return n if OPENMP else 1


def test_set_get_num_threads():
    optcore.set_num_threads(1)
    assert optcore.get_num_threads() == 1
    optcore.set_num_threads(2)
    assert optcore.get_num_threads() == effective(2)
    optcore.set_num_threads(np.int64(3))
    assert optcore.get_num_threads() == effective(3)
    optcore.set_num_threads(None)
    assert optcore.get_num_threads() >= 1


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                     ("2", TypeError), (True, TypeError)])
def test_set_num_threads_errors(bad, exc):
    optcore.set_num_threads(2)
    with pytest.raises(exc, match=r"\bn\b"):
        optcore.set_num_threads(bad)
    assert optcore.get_num_threads() == effective(2)  # unchanged


@pytest.mark.parametrize("n", ["1", "2"])
def test_omp_num_threads_honoured(n):
    if not optcore.config()["openmp"]:
        pytest.skip("built without OpenMP")
    env = dict(os.environ, OMP_NUM_THREADS=n)
    out = subprocess.run([sys.executable, "-c", "import optcore; print(optcore.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == n


def test_threadpoolctl_sees_and_limits_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not optcore.config()["openmp"]:
        pytest.skip("built without OpenMP")
    optcore.set_num_threads(None)
    info = threadpoolctl.threadpool_info()
    assert any(i["user_api"] == "openmp" for i in info), info
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert optcore.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):
        assert optcore.get_num_threads() == 2


def _run(rule, h, shapes, nthreads, seed=0, steps=3):
    """Run ``steps`` steps from a seeded start with ``nthreads``; return all buffers."""
    optcore.set_num_threads(nthreads)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    state = make_state(rule, h, shapes)
    mu = 1.0
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        mu = kernel_call(rule, params, grads, state, step=t, h=h, mu_product=mu)
    return params, state


@pytest.mark.parametrize("rule,h", CONFIGS, ids=CONFIG_IDS)
def test_bitwise_identical_with_1_and_2_threads(rule, h):
    rng = np.random.default_rng(1)
    many = [(int(n),) for n in rng.integers(1, 2000, size=300)]  # a 300-tensor list
    for shapes in ([(200_003,)], many):
        p1, s1 = _run(rule, h, shapes, 1)
        p2, s2 = _run(rule, h, shapes, 2)
        for a, b in zip(p1, p2):
            np.testing.assert_array_equal(a, b)
        for n in s1:
            for a, b in zip(s1[n], s2[n]):
                np.testing.assert_array_equal(a, b)


def test_zero_grad_of_pairs_parallel():
    """The parallel fill of optimizer.zero_grad over many arrays."""
    pairs = [(np.ones(n, np.float32), np.ones(n, np.float32)) for n in (40000, 1, 16385)]
    optcore.set_num_threads(2)
    optcore.SGD(pairs, lr=0.1).zero_grad()
    assert all((g == 0).all() and (p == 1).all() for p, g in pairs)


def test_concurrent_calls_from_python_threads():
    """Several Python threads calling kernels at once: correct (= serial) results, and every
    claimed OpenMP thread is given back afterwards."""
    optcore.set_num_threads(2)
    n, steps, workers = 100_000, 15, 4
    rngs = [np.random.default_rng(100 + w) for w in range(workers)]
    inits = [r.standard_normal(n).astype(np.float32) for r in rngs]
    grads = [[r.standard_normal(n).astype(np.float32) for _ in range(steps)] for r in rngs]

    def work(w, out):
        p, m, v = inits[w].copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        for t in range(steps):
            optcore.kernels.adam_(p, grads[w][t], m, v, step=t + 1, lr=0.01)
        out[w] = (p, m, v)

    results = {}
    threads = [threading.Thread(target=work, args=(w, results)) for w in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert _runtime._claimed_threads() == 0
    serial = {}
    for w in range(workers):
        work(w, serial)
    for w in range(workers):
        for a, b in zip(results[w], serial[w]):
            np.testing.assert_array_equal(a, b)


def test_thread_claims_released_after_contention():
    """Regression: a call that found every thread claimed by another one ran serially but
    kept one thread claimed for ever, so after some concurrency all later calls ran on one
    thread. The claim counter must return to 0 however the calls interleave."""
    optcore.set_num_threads(2)
    p = [np.zeros(40000, np.float32) for _ in range(4)]
    g = np.ones(40000, np.float32)
    stop = threading.Event()

    def spin(i):
        while not stop.is_set():
            optcore.kernels.sgd_(p[i], g, step=1, lr=1e-3)

    threads = [threading.Thread(target=spin, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for _ in range(200):
        optcore.kernels.sgd_(p[0], g, step=1, lr=0.0)
    stop.set()
    for th in threads:
        th.join()
    assert _runtime._claimed_threads() == 0


DENORMAL = np.float32(1e-39)


@pytest.mark.parametrize("n", [1000, 70000])  # serial and parallel paths
@pytest.mark.parametrize("nthreads", [1, 2])
def test_flush_denormal(n, nthreads):
    optcore.set_num_threads(nthreads)
    assert np.float32(0) < DENORMAL < np.finfo(np.float32).tiny  # a true denormal

    def step():
        p, g = np.ones(n, np.float32), np.zeros(n, np.float32)
        m, v = np.zeros(n, np.float32), np.full(n, DENORMAL, np.float32)
        optcore.kernels.adam_(p, g, m, v, step=1, lr=1e-3)
        return v

    if not optcore.set_flush_denormal(True):
        pytest.skip("no flush-to-zero control on this CPU")
    assert optcore.get_flush_denormal() is True
    assert (step() == 0).all()
    # the Python thread's own floating-point mode is untouched
    assert np.float32(1e-38) / np.float32(10) > 0
    assert optcore.set_flush_denormal(False) is True
    assert optcore.get_flush_denormal() is False
    v = step()
    np.testing.assert_array_equal(v, np.float32(0.999) * DENORMAL)
    assert (v > 0).all()


def test_set_flush_denormal_errors():
    with pytest.raises(TypeError, match="enabled"):
        optcore.set_flush_denormal(1)
    assert optcore.get_flush_denormal() is False


def test_show_config():
    buf = io.StringIO()
    optcore.show_config(file=buf)
    text = buf.getvalue()
    cfg = optcore.config()
    assert f"optcore {optcore.__version__}" in text
    assert "openmp" in text and "threads" in text and "instruction set" in text
    assert cfg["isa"] in text
    assert cfg["isa"] in ("avx512f", "avx2", "x86-64", "aarch64", "generic")
    assert isinstance(cfg["isa_dispatch"], bool)
    assert ("(picked for this CPU)" in text) == cfg["isa_dispatch"]
    assert ("(the one path built)" in text) == (not cfg["isa_dispatch"])
    assert cfg["num_threads"] == optcore.get_num_threads()
    assert cfg["chunk"] == 16384


def test_dispatched_isa_is_the_best_this_cpu_has():
    """The loader's pick (the target clone in use) against the CPU's own flags: x86-64-v4
    needs AVX-512 F, BW, DQ, VL and CD."""
    cfg = optcore.config()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cfg["isa_dispatch"] or not cpuinfo.exists():
        pytest.skip("a build of one instruction set, or no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    v4 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    expected = "avx512f" if v4 <= flags else "avx2" if "avx2" in flags else "x86-64"
    assert cfg["isa"] == expected


def test_cli_info():
    commands = [[sys.executable, "-m", "optcore.cli", "info"]]
    script = os.path.join(os.path.dirname(sys.executable), "optcore")
    if os.path.exists(script):  # the console script of the installed package
        commands.append([script, "info"])
    for cmd in commands:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert f"optcore {optcore.__version__}" in out
        for word in ("openmp", "threads", "instruction set", optcore.config()["isa"]):
            assert word in out


@pytest.mark.parametrize("cls", ["SGD", "AdaGrad", "RMSProp", "Adam", "AdamW", "AdaMax", "NAdam"])
def test_optimizer_classes_bitwise_identical_with_1_and_2_threads(cls):
    """The class path (one kernel call per group over a Parameters arena)."""
    out = []
    for nthreads in (1, 2):
        optcore.set_num_threads(nthreads)
        rng = np.random.default_rng(4)
        params = optcore.Parameters({"w": (400, 500), "b": (500,), "v": (3, 17)})
        params.flat[...] = rng.standard_normal(params.flat.size)
        opt = getattr(optcore, cls)(params, groups=[{"params": ["b"], "weight_decay": 0.0}],
                                    lr=0.01, weight_decay=0.1)
        for _ in range(3):
            params.grads.flat[...] = rng.standard_normal(params.flat.size)
            opt.step()
        out.append((params.flat.tobytes(),
                    [np.asarray(v).tobytes() for v in opt.state_dict().values()]))
    assert out[0] == out[1]


def test_tensor_list_from_addresses_matches_buffer_protocol_table():
    arrays = [np.arange(n, dtype=np.float32) for n in (3, 70000, 0, 5)]
    addrs = np.array([a.ctypes.data for a in arrays], dtype=np.uint64)
    by_addr = TensorList.from_addresses([a.size for a in arrays], [addrs], arrays)
    by_buffer = TensorList([arrays])
    assert by_addr.total == by_buffer.total and by_addr.nchunks == by_buffer.nchunks
    np.testing.assert_array_equal(_norms.sumsq(by_addr, 0)[0], _norms.sumsq(by_buffer, 0)[0])
    with pytest.raises(ValueError, match="needs 4 addresses"):
        by_addr.set_slot_addresses(1, addrs[:2], arrays)
