"""The ``mlxterp`` command (also ``python -m mlxterp``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxterp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time tracing and the default model's forward pass")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--tokens", type=int, default=32)
    bench.add_argument("--suite", choices=["all", "trace", "load", "attribution"], default="all")
    info = commands.add_parser("info", help="describe a model and its standard names")
    info.add_argument("model", nargs="?", help="a .gguf file, an mlx-lm directory or a repo id (default: the default model)")
    info.add_argument("--prompt", default="The capital of France is")
    demo = commands.add_parser("demo", help="logit lens, activation patching and steering on the default model")
    demo.add_argument("--out", default="mlxterp-demo", help="folder for the plots (default: ./mlxterp-demo)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import main as run_bench

        run_bench(repeats=args.repeats, tokens=args.tokens, suite=args.suite)
    elif args.command == "info":
        from .errors import MlxterpError
        from .info import describe_model
        from .load import load

        try:
            print(describe_model(load(args.model), args.prompt))
        except MlxterpError as e:
            print(f"mlxterp info: {e}", file=sys.stderr)
            return 2
    elif args.command == "demo":
        from .demo import main as run_demo

        run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
