"""The ``optcore`` command."""
import argparse
import os
import sys


def _info(args):
    from optcore import show_config

    show_config()
    return 0


def _names(text):
    """``"a,b" "c"`` -> ``["a", "b", "c"]`` (for nargs="+" options that also take commas)."""
    return [n for part in text for n in part.split(",") if n]


def _compare(args):
    import numpy as np

    from optcore import compare

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    X = y = None
    if args.data is not None:
        try:
            data = np.load(args.data, allow_pickle=False)
            if isinstance(data, np.ndarray):  # a .npy file
                raise ValueError("it holds one array, not an .npz archive")
            with data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"--data {args.data}: cannot read it as .npz ({exc})") from None
        if "X" not in arrays or "y" not in arrays:
            raise ValueError(f"--data {args.data}: the .npz file must hold arrays 'X' and 'y'")
        X, y = arrays["X"], arrays["y"]
    try:
        results = compare.run(
            None if args.problems is None else _names(args.problems),
            None if args.methods is None else _names(args.methods),
            budget=args.budget, time_limit=args.time_limit, seed=args.seed,
            threads=args.threads, quick=args.quick, X=X, y=y, progress=sys.stderr,
        )
        print(compare.format_table(results))
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        compare.write(results, args.out, settings=settings)
    except (ImportError, OSError) as exc:
        print(f"optcore: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nplots, records (JSON) and table written to {args.out}/")
    return 0


def _add_compare(sub):
    p = sub.add_parser(
        "compare",
        help="first-order optimizers vs SciPy second-order methods on the built-in problems",
        description="Train every problem with every optcore optimizer (with and without "
        "global-norm clipping) and minimize it with every SciPy method, under the same budget "
        "of gradient evaluations; print a table and write plots and JSON records.",
    )
    p.add_argument("--problems", nargs="+", metavar="NAME",
                   help="rosenbrock, quadratic, logistic, softmax, mlp (default: all)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="sgd adagrad rmsprop adam adamw adamax nadam, each also with '+clip'; "
                   "newton-cg bfgs cg l-bfgs-b trust-ncg (default: all)")
    p.add_argument("--budget", type=float,
                   help="full-data gradient evaluations per run (default: per problem)")
    p.add_argument("--time-limit", type=float, help="seconds per run (default 10; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="threads for optcore and BLAS (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="your data: an .npz with arrays X (n_samples, n_features) and y (labels)")
    p.add_argument("--out", default="optcore-compare", metavar="DIR",
                   help="directory for the plots, JSON records and table (default optcore-compare)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test of seconds")
    p.set_defaults(func=_compare)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="optcore", description="Fused CPU optimizer kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the version, OpenMP runtime, threads and instruction set")
    p.set_defaults(func=_info)
    _add_compare(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (TypeError, ValueError) as exc:
        print(f"optcore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
