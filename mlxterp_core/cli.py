"""The ``mlxterp`` command (also ``python -m mlxterp``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxterp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time every workload, each figure beside its target")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run (default: all; W1 W2 ...)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    info = commands.add_parser("info", help="describe a model and its standard names")
    info.add_argument("model", nargs="?", help="a .gguf file, an mlx-lm directory or a repo id (default: the default model)")
    info.add_argument("--prompt", default="The capital of France is")
    demo = commands.add_parser("demo", help="logit lens, activation patching and steering on the default model")
    demo.add_argument("--out", default="mlxterp-demo", help="folder for the plots (default: ./mlxterp-demo)")
    cache = commands.add_parser("cache", help="cache a corpus's activations at some sites to a dataset folder (resumable; mlx.launch splits it across processes)")
    cache.add_argument("model", nargs="?", help="a .gguf file, an mlx-lm directory or a repo id (default: the default model)")
    cache.add_argument("--corpus", help="a text file (one document per line), a .jsonl file with a \"text\" field or a folder of .txt files (default: the offline Python reference corpus)")
    cache.add_argument("--sites", nargs="+", required=True, help="standard names, raw names or globs, e.g. 'layers[*].output' 'layers[6].mlp.act'")
    cache.add_argument("--out", required=True, help="the dataset folder")
    cache.add_argument("--context-size", type=int, default=128)
    cache.add_argument("--batch-size", type=int, default=8)
    cache.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="stored dtype (default: each site's own)")
    cache.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    cache.add_argument("--max-tokens", type=int, help="cache at most this many tokens")
    cache.add_argument("--shard-tokens", type=int, help="about how many tokens per shard (default: ~256 MiB shards)")
    cache.add_argument("--no-packing", action="store_true", help="one document per window, right-padded (default: packed windows)")
    cache.add_argument("--encoding", default="utf-8", help="the corpus files' text encoding (default: utf-8)")
    cache.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore", "backslashreplace", "surrogateescape"],
                       help="bytes that do not decode: an error naming the line (strict, the default), or replaced, ignored, ...")
    args = parser.parse_args(argv)
    if args.command == "cache":
        from .caching import cache_main

        return cache_main(args)
    if args.command == "bench":
        from .bench import main as run_bench
        from .errors import MlxterpError

        try:
            run_bench(rows=args.rows, repeats=args.repeats, json_path=args.json)
        except MlxterpError as e:
            print(f"mlxterp bench: {e}", file=sys.stderr)
            return 2
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
