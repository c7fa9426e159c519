"""The ``mlxterp`` command (also ``python -m mlxterp``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxterp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time tracing against the plain mlx-lm forward")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--tokens", type=int, default=32)
    commands.add_parser("demo", help="trace and intervene on a small model")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import main as run_bench

        run_bench(repeats=args.repeats, tokens=args.tokens)
    elif args.command == "demo":
        from .demo import main as run_demo

        run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
