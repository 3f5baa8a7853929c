"""`optcore compare` end to end through optcore.cli.main, and optcore.compare's pieces."""
import json
import math

import numpy as np
import pytest

from optcore import compare
from optcore.cli import main

pytest.importorskip("matplotlib")


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_quick_default_suite_writes_table_plots_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["compare", "--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    for name in compare.DEFAULT_PROBLEMS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        data = json.loads((out / f"{name}.json").read_text())
        assert data["problem"] == name
        records = data["records"]
        assert [r["method"] for r in records] == list(compare.DEFAULT_METHODS)
        for r in records:
            assert {"x", "fun", "grad_norm", "evaluations", "seconds", "trace", "nfev",
                    "nhev", "status", "message", "accuracy"} <= set(r)
            assert r["evaluations"] <= compare.QUICK_BUDGET
        assert name in table
    for method in compare.DEFAULT_METHODS:
        assert f" {method} " in table
    assert "final loss" in table and "accuracy" in table
    assert (out / "table.txt").read_text().strip() == table.split("\n\nplots")[0].strip()
    assert "written to" in table
    # the progress bar went to stderr, one line per run when not a terminal
    progress = captured.err.strip().splitlines()
    assert len(progress) == len(compare.DEFAULT_PROBLEMS) * len(compare.DEFAULT_METHODS)
    assert progress[-1].startswith("[" + "#" * 30 + "]")


def _losses(path):
    return [r["fun"] for r in json.loads(path.read_text())["records"]]


def test_results_are_reproducible_for_a_seed(tmp_path, capsys):
    args = ["compare", "--problems", "mlp", "quadratic", "--methods", "adam,sgd+clip", "cg",
            "--budget", "3", "--time-limit", "100"]
    for seed, d in [(1, "a"), (1, "b"), (2, "c")]:
        assert _run(args + ["--seed", str(seed), "--out", str(tmp_path / d)]) == 0
    capsys.readouterr()
    for name in ("mlp", "quadratic"):
        a, b, c = (_losses(tmp_path / d / f"{name}.json") for d in "abc")
        assert a == b
        assert a != c


@pytest.mark.parametrize("argv, match", [
    (["--methods", "adamx"], "unknown method 'adamx'"),
    (["--methods", "bfgs+clip"], "unknown method"),
    (["--problems", "rosenbruck"], "unknown problem 'rosenbruck'"),
    (["--budget", "0"], "budget must be"),
    (["--budget", "-3"], "budget must be"),
    (["--budget", "nan"], "budget must be"),
    (["--budget", "many"], "invalid float value"),
    (["--threads", "0"], "threads"),
    (["--seed", "-1"], "seed"),
    (["--time-limit", "0"], "time_limit"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(argv, match, tmp_path, capsys):
    assert _run(["compare", "--quick", "--out", str(tmp_path)] + argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert match in lines[0] and "error" in lines[0]
    assert "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("X, y, match", [
    (np.ones((40, 3, 2)), np.arange(40) % 2, "X must be 2-D"),
    (np.ones((40, 3)), np.arange(39) % 2, "40 samples but y has 39"),
    (np.where(np.eye(40, 3) > 0, np.nan, 1.0), np.arange(40) % 2, "NaN"),
    (np.ones((40, 3)), np.full(40, 0.5), "labels"),
])
def test_bad_data_gives_one_line_and_nonzero_exit(X, y, match, tmp_path, capsys):
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=y)
    assert _run(["compare", "--quick", "--data", str(path), "--out", str(tmp_path / "o")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0]


def test_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _run(["compare", "--quick", "--out", str(tmp_path / "file")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"optcore: error: --out {tmp_path / 'file'}: exists and is not a directory"]


def test_data_file_errors(tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", A=np.ones((4, 2)))
    (tmp_path / "junk.npz").write_text("not a zip")
    np.save(tmp_path / "one.npy", np.ones(3))
    for name, match in [("wrong.npz", "'X' and 'y'"), ("junk.npz", "cannot read"),
                        ("one.npy", "one array"), ("missing.npz", "cannot read")]:
        assert _run(["compare", "--quick", "--data", str(tmp_path / name)]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and match in lines[0]


def test_user_data_runs_on_the_data_problems(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 5))
    y = (X[:, 0] + 0.3 * rng.standard_normal(120) > 0).astype(int) + (X[:, 1] > 1)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    assert _run(["compare", "--quick", "--data", str(tmp_path / "d.npz"), "--problems",
                 "softmax", "mlp", "--methods", "adam", "l-bfgs-b", "--out",
                 str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "softmax.json").read_text())
    assert rec["n"] == 5 * 3 + 3
    # three classes: logistic regression is left out of the default problems, but an error
    # when asked for explicitly
    assert _run(["compare", "--quick", "--data", str(tmp_path / "d.npz"), "--methods", "adam",
                 "--out", str(tmp_path / "p")]) == 0
    assert not (tmp_path / "p" / "logistic.json").exists()
    capsys.readouterr()
    assert _run(["compare", "--quick", "--data", str(tmp_path / "d.npz"), "--problems",
                 "logistic", "--out", str(tmp_path / "q")]) != 0
    assert "labels 0/1" in capsys.readouterr().err


def test_warmup_cosine_schedule():
    s = compare.warmup_cosine(1.0, 100, warmup=0.1)
    assert [s(t) for t in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert s(100) == pytest.approx(0.0, abs=1e-15)


def test_run_restores_the_thread_count():
    import optcore

    optcore.set_num_threads(2)
    before = optcore.get_num_threads()  # 2, or 1 in a build without OpenMP
    compare.run(["quadratic"], ["adam"], budget=2, threads=1)
    assert optcore.get_num_threads() == before


def test_format_table_sorts_by_loss_and_marks_status():
    results = compare.run(["rosenbrock"], ["sgd", "trust-ncg"], budget=50, progress=None)
    table = compare.format_table(results).splitlines()
    assert table[0].split()[:3] == ["problem", "method", "final"]
    assert table[2].split()[1] == "trust-ncg"
    assert table[3].split()[1] == "sgd" and table[3].split()[-1] == "budget"


def test_records_hold_validation_fields_and_the_table_shows_them(tmp_path, capsys):
    assert _run(["compare", "--problems", "softmax", "rosenbrock", "--methods", "adam",
                 "l-bfgs-b", "--budget", "5", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "val loss" in table and "val acc" in table
    data = json.loads((tmp_path / "softmax.json").read_text())
    assert data["n_val"] == 359 and data["n_train"] == 1438 and data["regime"] == "evals"
    from optcore import problems

    problem = problems.SoftmaxRegression(holdout=compare.HOLDOUT, split_seed=compare.SPLIT_SEED)
    for r in data["records"]:
        assert {"val_loss", "val_accuracy", "epochs"} <= set(r)
        loss, acc = problem.validation(np.array(r["x"]))
        assert r["val_loss"] == pytest.approx(loss, rel=1e-12) and r["val_accuracy"] == acc
        assert f"{r['val_loss']:.4f}" in table
    ros = json.loads((tmp_path / "rosenbrock.json").read_text())
    assert all(r["val_loss"] is None and r["val_accuracy"] is None for r in ros["records"])


def test_epochs_regime_spends_passes_over_the_data(tmp_path, capsys):
    assert _run(["compare", "--regime", "epochs", "--problems", "logistic", "--methods",
                 "sgd", "newton-cg", "--budget", "6", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "logistic.json").read_text())
    assert data["regime"] == "epochs" and data["settings"]["regime"] == "epochs"
    sgd, newton = data["records"]
    # 1438 samples in batches of 128: 12 steps an epoch, the last of 30 samples
    assert sgd["nit"] == 6 * 12 and sgd["epochs"] == pytest.approx(6.0)
    assert sgd["evaluations"] == pytest.approx(72 * 128 / 1438)
    assert newton["epochs"] == newton["nfev"] + 2 * newton["nhev"] <= 6
    assert newton["evaluations"] == newton["nfev"] + newton["nhev"]


def test_time_regime_gives_every_method_the_same_wall_time(tmp_path, capsys):
    assert _run(["compare", "--regime", "time", "--time-limit", "0.2", "--problems", "mlp",
                 "--methods", "adam", "cg", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "mlp.json").read_text())
    for r in data["records"]:
        # a run stops at the first check after the limit (one step or evaluation later) or,
        # first-order, after the steps the calibration planned for the limit
        assert 0 < r["seconds"] < 0.2 + 0.5
        assert r["status"] in (0, 102) or r["message"].startswith("Optimization terminated")
    assert data["records"][0]["nit"] > 10


@pytest.mark.parametrize("argv, match", [
    (["--regime", "steps"], "invalid choice: 'steps'"),
    (["--regime", "time", "--budget", "3"], "regime 'time' takes no budget"),
])
def test_bad_regime_gives_one_line(argv, match, tmp_path, capsys):
    assert _run(["compare", "--quick", "--out", str(tmp_path)] + argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "error" in lines[0]
    assert list(tmp_path.iterdir()) == []
