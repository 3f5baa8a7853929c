"""The ``optcore`` command."""
import argparse
import importlib.util
import os
import sys


def _info(args):
    from optcore import show_config

    show_config()
    return 0


def _list(text, item, what):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list, got {text!r}")
    return [item(v) for v in values]


def _threads(text):
    def one(v):
        if not v.isdigit() or int(v) < 1:
            raise argparse.ArgumentTypeError(f"threads must be positive integers, got {v!r}")
        return int(v)

    return _list(text, one, "threads")


def _sizes(text):
    from optcore.bench import parse_size

    def one(v):
        try:
            return parse_size(v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return _list(text, one, "sizes")


def _optimizers(text):
    from optcore.bench import OPTIMIZERS

    def one(v):
        if v.lower() not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {v!r}; choose from {', '.join(OPTIMIZERS)}")
        return v.lower()

    return _list(text, one, "optimizers")


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _bench_training(args):
    """``optcore bench --training``: whole training steps of torch models (needs torch)."""
    import json

    try:
        from optcore.torch import training
    except ImportError as exc:
        raise ValueError(f"--training needs PyTorch: {exc}") from exc
    optimizers = args.optimizers or list(training.OPTIMIZERS)
    unknown = [o for o in optimizers if o not in training.OPTIMIZERS]
    if unknown:
        raise ValueError(f"--training runs {', '.join(training.OPTIMIZERS)}; not {unknown}")
    models = args.models or list(training.MODELS)
    unknown = [m for m in models if m not in training.MODELS]
    if unknown:
        raise ValueError(f"--models: choose from {', '.join(training.MODELS)}; not {unknown}")
    threads = args.threads or [2]
    if len(threads) != 1:
        raise ValueError("--training takes one thread count")
    if args.json:
        open(args.json, "a").close()

    def progress(msg):
        if not args.no_progress:
            print(f"  measuring {msg} ...", file=sys.stderr, flush=True)

    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("--deepspeed needs DeepSpeed: pip install 'optcore[deepspeed-baseline]'")
    result = training.run(models=models, optimizers=optimizers, threads=threads[0],
                          steps=args.steps or (6 if args.quick else 20),
                          warmup=2 if args.quick else 5, quick=args.quick, progress=progress,
                          deepspeed=args.deepspeed)
    print(training.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if result["losses_agree"] else 1


def _bench(args):
    import json

    from optcore import bench

    if args.training:
        return _bench_training(args)
    quick = args.quick
    sizes = args.sizes or [bench.parse_size(s) for s in (
        ("1M", "1000x1000") if quick else ("1M", "16M", "resnet50", "1000x1000", "flat:1000x1000"))]
    threads = args.threads
    if threads is None:
        from optcore import get_num_threads

        n = get_num_threads()
        threads = [n] if quick else sorted({1, n})
    repeats = args.repeats or (3 if quick else 5)
    optimizers = args.optimizers or list(bench.OPTIMIZERS)
    if args.json:
        open(args.json, "a").close()  # fail now, not after the measures, if it cannot be written

    def progress(msg):
        if not args.no_progress:
            print(f"  measuring {msg} ...", file=sys.stderr, flush=True)

    result = bench.run(optimizers=optimizers, sizes=sizes, threads=threads, repeats=repeats,
                       probe_elements=args.probe_elements or ((1 << 23) if quick else (1 << 24)),
                       use_torch=not args.no_torch, progress=progress)
    print(bench.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
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
    if args.scale:
        return _compare_scale(args)
    if args.memory_limit is not None:
        raise ValueError("--memory-limit goes with --scale")
    try:
        results = compare.run(
            None if args.problems is None else _names(args.problems),
            None if args.methods is None else _names(args.methods),
            budget=args.budget, time_limit=args.time_limit, seed=args.seed,
            threads=args.threads, quick=args.quick, X=X, y=y, progress=sys.stderr,
            regime=args.regime,
        )
        print(compare.format_table(results))
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        compare.write(results, args.out, settings=settings)
    except (ImportError, OSError) as exc:
        print(f"optcore: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nplots, records (JSON) and table written to {args.out}/")
    return 0


def _compare_scale(args):
    from optcore import scale_study

    given = [o for o, v in (("--problems", args.problems), ("--budget", args.budget),
                            ("--data", args.data)) if v is not None]
    if args.regime != "evals":
        given.append("--regime")
    if given:
        raise ValueError(f"--scale takes no {', '.join(given)}: it runs the MLP on the digits "
                         "under equal wall time")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    memory = None if args.memory_limit is None else args.memory_limit * 2**20
    try:
        records = scale_study.run(
            None if args.methods is None else _names(args.methods), time_limit=args.time_limit,
            memory_limit=memory, seed=args.seed, threads=args.threads, quick=args.quick,
            progress=sys.stderr)
        print(scale_study.format_table(records))
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        limit = args.time_limit or (scale_study.QUICK_TIME_LIMIT if args.quick
                                    else scale_study.TIME_LIMIT)
        scale_study.write(records, args.out, settings=settings, time_limit=limit)
    except (ImportError, OSError) as exc:
        print(f"optcore: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nplot, records (JSON) and table of the scaling study written to {args.out}/")
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
    p.add_argument("--regime", choices=("evals", "epochs", "time"), default="evals",
                   help="what every method gets the same amount of: full-data gradient "
                   "evaluations (default), passes over the training data, or wall time")
    p.add_argument("--budget", type=float,
                   help="gradient evaluations (--regime epochs: passes over the data) per run "
                   "(default: per problem)")
    p.add_argument("--time-limit", type=float,
                   help="seconds per run (default 10, quick 1; --regime time: 0.5, quick 0.05)")
    p.add_argument("--threads", type=int, default=1, help="threads for optcore and BLAS (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="your data: an .npz with arrays X (n_samples, n_features) and y (labels)")
    p.add_argument("--out", default="optcore-compare", metavar="DIR",
                   help="directory for the plots, JSON records and table (default optcore-compare)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test of seconds")
    p.add_argument("--scale", action="store_true",
                   help="scaling study: the MLP from about 1e3 to 1e6 parameters, every method "
                   "for the same time (3 s; --quick: 2 widths, 0.2 s); time and memory per "
                   "iteration and held-out loss, skipped methods with the reason")
    p.add_argument("--memory-limit", type=float, metavar="MIB",
                   help="--scale: memory a method may use, MiB (default 2048; quick 64)")
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
    p = sub.add_parser(
        "bench", help="measure the kernels against the machine's bandwidth, NumPy and torch",
        description="Measure the memory bandwidth with a roofline probe, then step each optimizer "
                    "with optcore, an in-place NumPy baseline and torch.optim (fused where torch "
                    "has it, else foreach), and print GB/s, %% of the probe's limit and speed-ups.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, the default thread count only, 3 repeats (seconds)")
    p.add_argument("--threads", type=_threads, metavar="N[,N...]",
                   help="thread counts (default: 1 and all; --quick: all)")
    p.add_argument("--sizes", type=_sizes, metavar="SIZE[,SIZE...]",
                   help="layouts: 16M (one tensor), 1000x1000 (1000 tensors of 1000), resnet50, "
                        "flat:1000x1000 (same elements, one buffer); k/M/G are powers of 1024")
    p.add_argument("--optimizers", type=_optimizers, metavar="NAME[,NAME...]",
                   help="subset of sgd,adagrad,rmsprop,adam,adamw,adamax,nadam (default: all)")
    p.add_argument("--repeats", type=_positive, metavar="R", help="timed steps, best counts")
    p.add_argument("--probe-elements", type=_positive, metavar="N",
                   help="elements per probe array (default 16M; --quick 8M)")
    p.add_argument("--no-torch", action="store_true", help="skip torch even when installed")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", metavar="FILE", help="also write the probe and rows as JSON")
    p.add_argument("--training", action="store_true",
                   help="instead: whole training steps (ResNet-18-style CNN, MLP) with torch, "
                        "optcore's optimizers, batch norm and fused BN+ReLU (needs torch; "
                        "default 2 threads, --quick: tiny models)")
    p.add_argument("--models", type=lambda t: _list(t, str, "models"), metavar="NAME[,NAME...]",
                   help="with --training: subset of resnet18,resnet18-cl,mlp (default: all)")
    p.add_argument("--steps", type=_positive, metavar="N",
                   help="with --training: steps per variant, the first 5 untimed (default 20)")
    p.add_argument("--deepspeed", action="store_true",
                   help="with --training: also (a) with DeepSpeed's CPU Adam for adam and adamw "
                        "(needs deepspeed: pip install 'optcore[deepspeed-baseline]')")
    p.set_defaults(func=_bench)
    _add_compare(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code
    try:
        return args.func(args)
    except (TypeError, ValueError, OSError) as exc:
        print(f"optcore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
