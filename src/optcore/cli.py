"""The ``optcore`` command."""
import argparse
import sys


def _info(args):
    from optcore import show_config

    show_config()
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="optcore", description="Fused CPU optimizer kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the version, OpenMP runtime, threads and instruction set")
    p.set_defaults(func=_info)
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
