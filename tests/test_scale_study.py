"""optcore compare --scale: every method at every width has a record, a method that cannot run
says why, the memory probe against the bytes the method must hold, CLI errors as one line."""
import json
import math

import pytest

from optcore import compare, scale_study
from optcore.cli import main

pytest.importorskip("matplotlib")

RAN = {"done", "time", "converged"}


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    assert _run(["compare", "--scale", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "scale.json").read_text())["records"]


def test_quick_scale_refuses_nothing_silently(quick, capsys):
    out, records = quick
    ns = sorted({r["n"] for r in records})
    assert ns == [76 * h + 10 for h in scale_study.QUICK_HIDDEN]
    # every method has a record at every width, whatever happened to it
    assert sorted((r["n"], r["method"]) for r in records) == sorted(
        (n, m) for n in ns for m in scale_study.DEFAULT_METHODS)
    for r in records:
        if r["status"] in RAN:
            assert r["reason"] == "" and r["nit"] > 0 and r["memory_bytes"] > 0
            assert r["seconds_per_iter"] == pytest.approx(r["seconds"] / r["nit"])
            assert math.isfinite(r["val_loss"]) and 0 <= r["val_accuracy"] <= 1
        else:
            assert r["status"] in ("skipped", "too slow", "diverged") and r["reason"]
    bfgs = {r["n"]: r for r in records if r["method"] == "bfgs"}
    # 6 x 8 n^2 bytes: 45 MiB at n = 998 (under the quick 64 MiB), 4.5 GiB at n = 10042; at
    # n = 998 it runs (one O(n^3) iteration may not fit in 0.2 s on a loaded machine: then
    # "too slow", with the reason)
    assert bfgs[998]["status"] in RAN | {"too slow"} and bfgs[998]["memory_bytes"] > 0
    assert bfgs[10042]["status"] == "skipped" and bfgs[10042]["memory_bytes"] is None
    assert "dense n x n matrix: 4.51 GiB > memory limit 0.0625 GiB" == bfgs[10042]["reason"]
    ours = {r["n"]: r for r in records if r["method"] == "optcore-bfgs"}
    # the packed triangle, 4 n^2 bytes: 3.8 MiB at n = 998, 385 MiB at n = 10042
    assert ours[998]["status"] in RAN | {"too slow"} and ours[998]["memory_bytes"] > 0
    assert ours[10042]["reason"] == "dense n x n matrix: 0.376 GiB > memory limit 0.0625 GiB"
    table = (out / "scale.txt").read_text()
    assert "skipped: dense n x n matrix" in table
    for r in records:
        assert r["method"] in table
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_probe_sees_what_the_method_must_hold(quick):
    _, records = quick
    by = {(r["n"], r["method"]): r for r in records}
    for n in (998, 10042):
        # Adam: float32 parameters, gradients and two moments, 16 n bytes, at the least;
        # the minibatch temporaries (128 x hidden floats) come on top
        assert by[n, "adam"]["memory_bytes"] >= 16 * n
        assert by[n, "sgd"]["memory_bytes"] < by[n, "adam"]["memory_bytes"]
        # L-BFGS-B keeps 10 pairs (s, y) in float64
        assert by[n, "l-bfgs-b"]["memory_bytes"] >= 2 * 10 * 8 * n
    # SciPy's BFGS: the n x n inverse Hessian and the temporaries of its update
    assert by[998, "bfgs"]["memory_bytes"] >= 3 * 8 * 998**2
    # optcore's BFGS: the packed lower triangle, n (n + 1) / 2 float64
    assert 4 * 998 * 999 <= by[998, "optcore-bfgs"]["memory_bytes"] < 8 * 998**2


def test_a_method_that_completes_no_iteration_says_why():
    records = scale_study.run(["newton-cg", "adam"], hidden=[13], time_limit=1e-6)
    newton = records[0]
    assert newton["status"] == "too slow" and newton["nit"] == 0
    assert newton["reason"].startswith("no ") and "1e-06 s" in newton["reason"]
    assert newton["seconds_per_iter"] is None
    text = scale_study.format_table(records)
    assert "too slow: no " in text


@pytest.mark.parametrize("argv, match", [
    (["--problems", "mlp"], "--scale takes no --problems"),
    (["--budget", "3"], "--scale takes no --budget"),
    (["--regime", "time"], "--scale takes no --regime"),
    (["--memory-limit", "0"], "memory_limit must be > 0"),
    (["--time-limit", "inf"], "time_limit must be a finite number"),
    (["--methods", "newton"], "unknown method 'newton'"),
])
def test_scale_errors_are_one_line(argv, match, tmp_path, capsys):
    assert _run(["compare", "--scale", "--quick", "--out", str(tmp_path)] + argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "error" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_memory_limit_needs_scale(tmp_path, capsys):
    assert _run(["compare", "--quick", "--memory-limit", "5", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("optcore: error: --memory-limit goes with "
                                               "--scale")


def test_run_rejects_bad_widths():
    with pytest.raises(ValueError, match="hidden"):
        scale_study.run(["adam"], hidden=[0])
    with pytest.raises(ValueError, match="hidden is empty"):
        scale_study.run(["adam"], hidden=[])
    assert compare.HOLDOUT == 0.2
