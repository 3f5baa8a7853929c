#!/usr/bin/env python3
"""Measure two revisions of optcore built side by side, alternated in one run.

On a shared, noisy machine, benchmark results saved hours apart are not comparable: the
machine's load changes more than the code. This script builds both revisions now, each into
its own virtual environment, and runs the chosen benchmarks alternately (A B, B A, A B, ...),
so both see the same conditions; it then prints, per benchmark, the ratio of their times.

    python bench/compare_revisions.py                        # main vs the working tree
    python bench/compare_revisions.py --base v0.1 --head HEAD -k "adam and 16M" --rounds 5

A revision is any git revision (built from a temporary ``git worktree`` checkout of it, removed
once built) or ``WORKTREE`` (the current checkout, uncommitted changes included). Both run the benchmark files of the
current checkout's ``bench/`` against their own build of optcore, so both revisions must
provide ``optcore.bench`` (every revision since the benchmark suite landed does).
The venvs go to ``--workdir`` (default ``.compare-revisions/`` at the top of the repository,
git-ignored) and are reused for a commit already built there; the working tree is rebuilt
every run. Delete the directory to reclaim the space.

Ratio = head time / base time, from the median of each round's median and from the best of
the rounds' minima: below 1 means the head is faster. A benchmark is flagged slower (faster)
only when both ratios agree beyond 5%; with ``--fail-above 1.10`` the exit status is 1 when
both ratios of any benchmark exceed 1.10. On a loaded machine the minimum is the steadier of
the two; use more ``--rounds`` and larger sizes than the smoke sizes for decisions.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

WORKTREE = "WORKTREE"


def _run(cmd, cwd=None, quiet=False, env=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None)
    if out.returncode != 0:
        tail = (out.stdout or "")[-3000:] if quiet else ""
        raise RuntimeError(f"command failed ({out.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return out.stdout


def _git(root, *args):
    return _run(["git", *args], cwd=root, quiet=True).strip()


def prepare(root, workdir, rev, label, python):
    """Build ``rev`` (a temporary ``git worktree`` checkout, removed after the build, or the
    current checkout for WORKTREE) into its own venv; return the venv's python and a key."""
    if rev == WORKTREE:
        src, key = root, "worktree"
    else:
        sha = _git(root, "rev-parse", "--verify", f"{rev}^{{commit}}")
        key = sha[:12]
        src = workdir / f"src-{key}"
    venv = workdir / f"venv-{key}"
    py = venv / "bin" / "python"
    stamp = venv / "built-from"
    if rev != WORKTREE and stamp.exists() and stamp.read_text() == key:
        print(f"[{label}] reusing the build of {rev} ({key})", flush=True)
        return py, key
    if not py.exists():
        _run([python, "-m", "venv", "--system-site-packages", str(venv)], quiet=True)
    try:
        if rev != WORKTREE:
            print(f"[{label}] checking out {rev} ({key}) in {src}", flush=True)
            _git(root, "worktree", "add", "--detach", str(src), sha)
        print(f"[{label}] building {rev} into {venv} (a minute or so) ...", flush=True)
        _run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
              "--force-reinstall", str(src)], quiet=True)
    finally:
        if rev != WORKTREE and src.exists():
            _git(root, "worktree", "remove", "--force", str(src))
    stamp.write_text(key)
    return py, key


def run_once(py, root, bench_args, json_path):
    cmd = [str(py), "-m", "pytest", str(root / "bench"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", *bench_args]
    # Run outside the source tree so that `import optcore` finds this venv's build.
    env = dict(os.environ, PYTHONPATH=str(root / "bench"))
    out = subprocess.run(cmd, cwd=json_path.parent, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    if out.returncode != 0 or not json_path.exists():
        raise RuntimeError(f"benchmark run failed ({out.returncode}):\n{out.stdout[-3000:]}")
    return {b["fullname"]: b for b in json.loads(json_path.read_text())["benchmarks"]}


def summarize(runs_a, runs_b):
    """Rows (group, name, base median, head median, ratio of medians, ratio of minima)."""
    rows = []
    for name in sorted(set(runs_a[0]) & set(runs_b[0])):
        a = [r[name]["stats"] for r in runs_a if name in r]
        b = [r[name]["stats"] for r in runs_b if name in r]
        med_a = statistics.median(s["median"] for s in a)
        med_b = statistics.median(s["median"] for s in b)
        min_a = min(s["min"] for s in a)
        min_b = min(s["min"] for s in b)
        rows.append((runs_a[0][name].get("group") or "", runs_a[0][name]["name"], med_a, med_b,
                     med_b / med_a, min_b / min_a))
    return rows


def format_rows(rows, base, head):
    width = max([len(r[1]) for r in rows] + [9])
    lines = [f"{'benchmark':<{width}} {'base median':>12} {'head median':>12} "
             f"{'median ratio':>13} {'min ratio':>10}",
             f"{'':<{width}} {base[:12]:>12} {head[:12]:>12} {'(head/base)':>13}"]
    group = None
    for g, name, ma, mb, rmed, rmin in sorted(rows):
        if g != group:
            lines.append(f"-- {g}")
            group = g
        flag = ("  slower" if min(rmed, rmin) > 1.05 else
                "  faster" if max(rmed, rmin) < 0.95 else "")
        lines.append(f"{name:<{width}} {ma * 1e3:>10.3f}ms {mb * 1e3:>10.3f}ms {rmed:>13.3f} "
                     f"{rmin:>10.3f}{flag}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="base revision (default main)")
    ap.add_argument("--head", default=WORKTREE, help=f"head revision (default {WORKTREE})")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression choosing benchmarks")
    ap.add_argument("--rounds", type=int, default=3, help="alternations A B / B A (default 3)")
    ap.add_argument("--workdir", default=None, help="where checkouts and venvs go")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the venvs")
    ap.add_argument("--fail-above", type=float, default=None,
                    help="exit 1 when a benchmark's median and min ratios head/base both exceed "
                         "this (e.g. 1.10)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    try:
        root = Path(_git(Path(__file__).resolve().parent, "rev-parse", "--show-toplevel"))
        workdir = Path(args.workdir or root / ".compare-revisions").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        py_a, key_a = prepare(root, workdir, args.base, "base", args.python)
        py_b, key_b = prepare(root, workdir, args.head, "head", args.python)
        bench_args = (["-k", args.select] if args.select else []) + list(args.pytest_args)
        runs = {"a": [], "b": []}
        out_dir = workdir / "runs"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        for r in range(args.rounds):
            order = [("a", py_a), ("b", py_b)] if r % 2 == 0 else [("b", py_b), ("a", py_a)]
            for which, py in order:
                label = "base" if which == "a" else "head"
                print(f"round {r + 1}/{args.rounds}: {label}", flush=True)
                runs[which].append(run_once(py, root, bench_args, out_dir / f"{which}{r}.json"))
    except (RuntimeError, OSError) as exc:
        print(f"compare_revisions: error: {exc}", file=sys.stderr)
        return 2
    rows = summarize(runs["a"], runs["b"])
    if not rows:
        print("compare_revisions: error: no benchmark ran in both revisions", file=sys.stderr)
        return 2
    print()
    print(format_rows(rows, f"{args.base}", f"{args.head}"))
    if args.fail_above is not None and any(min(r[4], r[5]) > args.fail_above for r in rows):
        print(f"\nsome benchmarks are slower than {args.fail_above}x the base", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
