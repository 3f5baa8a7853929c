"""tests/isa_fingerprint.py, the bitwise comparison of builds that CI runs across instruction
sets: it passes on the same results (here written on one thread and checked on two) and fails,
naming them, on a changed bit, dtype or shape, or a missing or extra result."""
import json

import numpy as np

import optcore

import isa_fingerprint as F


def test_write_then_check_passes_across_thread_counts(tmp_path, capsys):
    path = tmp_path / "fp.json"
    was = optcore.get_num_threads()
    try:
        optcore.set_num_threads(1)
        assert F.main(["write", str(path)]) == 0
        optcore.set_num_threads(2)
        assert F.main(["check", str(path)]) == 0
    finally:
        optcore.set_num_threads(was)
    assert "matches all" in capsys.readouterr().out
    names = json.loads(path.read_text())
    for family in ("kernel0.sgd.", "opt5.Adam.int8.", "opt9.NAdam.bf16-kahan.compensation",
                   "norm.bfloat16.global.", "clip.adaptive.", "bn.NHWC.relu.dx", "max_norm."):
        assert any(k.startswith(family) for k in names), family


def test_check_fails_on_a_changed_or_missing_result(tmp_path, capsys):
    a = np.arange(5, dtype=np.float32)
    b = a.copy()
    b.view(np.uint32)[3] ^= 1  # one bit
    expected = F.digests({"x": a, "y": a, "z": a})
    assert F.differences(expected, F.digests({"x": a, "y": a, "z": a})) == []
    assert F.differences(expected, F.digests({"x": b, "y": a, "z": a})) == ["x"]
    assert F.differences(expected, F.digests({"x": a, "y": a.astype(np.float64), "z": a})) == ["y"]
    assert F.differences(expected, F.digests({"x": a, "y": a, "z": a.reshape(5, 1)})) == ["z"]
    assert F.differences(expected, F.digests({"x": a, "y": a, "w": a})) == ["w", "z"]

    path = tmp_path / "fp.json"
    assert F.main(["write", str(path)]) == 0
    saved = json.loads(path.read_text())
    key = sorted(saved)[7]
    saved[key] = saved[key][:-1] + ("0" if saved[key][-1] != "0" else "1")
    path.write_text(json.dumps(saved))
    assert F.main(["check", str(path)]) == 1
    assert key in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert F.main([]) == 2
    assert F.main(["compare", "x"]) == 2
    assert "usage" in capsys.readouterr().err
