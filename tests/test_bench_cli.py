"""``optcore bench`` and optcore.bench: the table, the JSON, layouts and bad arguments."""
import json
import re

import pytest

import optcore
from optcore import bench
from optcore.cli import main

TINY = ["--quick", "--sizes", "4k,3x1000", "--probe-elements", "65536", "--repeats", "1",
        "--no-progress"]


def test_bench_quick_table_and_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--threads", "1,2", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    for name in bench.OPTIMIZERS:
        assert out.count(f"\n{name} ") == 4  # 2 layouts x 2 thread counts
    for col in ("kernel", "size", "threads", "GB/s", "% limit", "x NumPy", "x torch", "x 1 thr"):
        assert col in out
    for pattern in bench.PATTERNS:
        assert f"\n  {pattern} " in out
    data = json.loads(out_file.read_text())
    assert set(data) == {"config", "probe", "torch", "rows"}
    assert set(data["probe"]) == set(bench.PATTERNS)
    rows = data["rows"]
    assert len(rows) == 2 * 2 * len(bench.OPTIMIZERS)
    for r in rows:
        assert r["elements"] == (4096 if r["size"] == "4k" else 3000)
        assert r["tensors"] == (1 if r["size"] == "4k" else 3)
        assert r["threads"] in (1, 2)
        assert r["bytes"] == bench.BYTES_PER_ELEMENT[r["pattern"]] * r["elements"]
        assert r["optcore_gbps"] > 0 and r["vs_numpy"] > 0 and r["of_limit"] > 0
        assert r["optcore_gbps"] == pytest.approx(r["bytes"] / r["optcore_s"] / 1e9)
        assert (r["vs_1_thread"] is None) == (r["threads"] == 1)
        if data["torch"] is not None:
            assert r["vs_torch"] > 0
            fused = r["kernel"] in ("sgd", "adagrad", "adam", "adamw")
            assert r["torch_variant"] == ("fused" if fused else "foreach")


def test_bench_without_torch(capsys):
    assert main(["bench", *TINY, "--optimizers", "adam", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "torch not installed" in out
    assert out.count("\nadam ") == 2
    n = optcore.get_num_threads()
    assert "1 thr" in out and f"{n} thr" in out  # the probe always runs at 1 and N threads


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "threads"),
    (["--threads", "two"], "threads"),
    (["--sizes", "lots"], "size 'lots' not understood"),
    (["--sizes", "0"], "at least one element"),
    (["--sizes", ","], "sizes"),
    (["--optimizers", "adam,lion"], "unknown optimizer 'lion'"),
    (["--repeats", "-1"], "positive integer"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--json", "/nonexistent-dir/x.json"], "nonexistent-dir"),
])
def test_bench_bad_arguments(args, message, capsys):
    code = main(["bench", "--quick", "--sizes", "1k", "--probe-elements", "1024", *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("  measuring")]
    assert len(err) == 1, err
    # argparse errors name the subcommand ("optcore bench: error: ..."), later ones "optcore:"
    assert re.match(r"optcore( bench)?: error: ", err[0]), err[0]
    assert message in err[0]
    assert "Traceback" not in err[0]


def test_parse_size():
    assert bench.parse_size("16M").elements == 16 << 20
    assert bench.parse_size("64k").shapes == [(65536,)]
    lay = bench.parse_size("1000x1000")
    assert lay.ntensors == 1000 and lay.elements == 10**6
    flat = bench.parse_size("flat:1000x1000")
    assert flat.ntensors == 1 and flat.elements == 10**6
    with pytest.raises(TypeError, match="size"):
        bench.parse_size(16)


def test_resnet50_layout_matches_the_architecture():
    lay = bench.parse_size("resnet50")
    assert lay.ntensors == 161
    assert lay.elements == 25_557_032  # torchvision.models.resnet50().parameters()


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        bench.run(optimizers=["lion"], sizes=["1k"])
    with pytest.raises(ValueError, match="threads"):
        bench.run(optimizers=["adam"], sizes=["1k"], threads=[0])
    with pytest.raises(ValueError, match="repeats"):
        bench.run(optimizers=["adam"], sizes=["1k"], repeats=0)


@pytest.mark.parametrize("impl", ["optcore", "numpy", "torch"])
@pytest.mark.parametrize("name", bench.OPTIMIZERS)
def test_steppers_step_and_reset(impl, name):
    if impl == "torch":
        pytest.importorskip("torch")
    s = bench.make_stepper(impl, name, bench.parse_size("2x100"))
    s.step()
    s.reset()
    s.step()
    params = [p.detach().numpy() for p in s.params] if impl == "torch" else s.params
    for p in params:
        assert (p != 0.5).any()  # the step moved the parameters
    s.reset()
    for p in params:
        assert (p == 0.5).all()


def test_bench_suite_records_bandwidth_in_extra_info(tmp_path):
    """The bench/ conftest hook adds gbps and the probe's limit to extra_info (smoke sizes)."""
    pytest.importorskip("pytest_benchmark")
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    out = tmp_path / "b.json"
    env = dict(os.environ, OPTCORE_BENCH_SMOKE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider",
         "-k", "adam-1M-1t-optcore or sgd-1000x1000-2t-numpy", f"--benchmark-json={out}",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0.01"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "bandwidth (fastest round)" in proc.stdout
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {"adam-1M-1t", "sgd-1000x1000-2t"} <= {b["group"] for b in benchmarks}
    for b in benchmarks:
        info = b["extra_info"]
        assert {"elements", "bytes", "pattern", "threads", "isa"} <= set(info)
        assert info["elements"] <= 1 << 16
        assert info["gbps"] == pytest.approx(info["bytes"] / b["stats"]["min"] / 1e9)
        assert info["limit_gbps"] > 0
        assert info["of_limit"] == pytest.approx(info["gbps"] / info["limit_gbps"])
