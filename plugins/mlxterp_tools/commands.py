"""mlxterp's own commands, ``bench``, ``info``, ``demo`` and ``cache``, added to ``mlxterp``
through the ``mlxterp_commands`` hook as a third party's command would be. Each handler takes
the parsed arguments and returns the exit code; an ``MlxterpError`` that escapes it becomes
exit 2 with a one-line message (the ``mlxterp`` command does that)."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap

MODEL_HELP = "a .gguf file, an mlx-lm directory or a repo id (default: the default model)"


def register(subparsers) -> None:
    """Add the four commands to ``subparsers`` (an argparse sub-parsers action)."""
    from .bench import all_rows

    rows = all_rows()
    width = max(len(key) for key in rows)
    listing = "\n".join(textwrap.fill(_summary(function), 100, initial_indent=f"  {key:{width}s}  ",
                                       subsequent_indent=" " * (width + 4)) for key, function in rows.items())
    bench = subparsers.add_parser(
        "bench", help="time every workload, each figure beside its target",
        description="Time every workload (or the --rows chosen), each figure beside its target.",
        epilog=f"rows (in the order they run):\n{listing}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed rounds of each case (default: 5; some rows cap or scale it)")
    bench.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run (default: all; W1 W2 ...)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    bench.set_defaults(handler=bench_command)

    info = subparsers.add_parser("info", help="describe a model and its standard names")
    info.add_argument("model", nargs="?", help=MODEL_HELP)
    info.add_argument("--prompt", default="The capital of France is")
    info.set_defaults(handler=info_command)

    demo = subparsers.add_parser(
        "demo", help="logit lens, activation patching and steering on the default model",
        description="The logit lens, activation patching, steering and induction heads on the default model, with "
                    "plots. Takes about 20 s on a 2-core x86 CPU (17.6-18.5 s measured).")
    demo.add_argument("--out", default="mlxterp-demo", help="folder for the plots (default: ./mlxterp-demo)")
    demo.set_defaults(handler=demo_command)

    cache = subparsers.add_parser("cache", help="cache a corpus's activations at some sites to a dataset folder (resumable; mlx.launch splits it across processes)")
    cache.add_argument("model", nargs="?", help=MODEL_HELP)
    cache.add_argument("--corpus", help="a text file (one document per line), a .jsonl file with a \"text\" field or a folder of .txt files (default: the offline Python reference corpus)")
    cache.add_argument("--sites", nargs="+", required=True, help="standard names, raw names or globs, e.g. 'layers[*].output' 'layers[6].mlp.act'")
    cache.add_argument("--out", required=True, help="the dataset folder")
    cache.add_argument("--context-size", type=int, default=128, help="tokens per window (default: 128)")
    cache.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    cache.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="stored dtype (default: each site's own)")
    cache.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out (default: resume it)")
    cache.add_argument("--max-tokens", type=int, help="cache at most this many tokens (default: the whole corpus)")
    cache.add_argument("--shard-tokens", type=int, help="about how many tokens per shard (default: ~256 MiB shards)")
    cache.add_argument("--no-packing", action="store_true", help="one document per window, right-padded (default: packed windows)")
    cache.add_argument("--encoding", default="utf-8", help="the corpus files' text encoding (default: utf-8)")
    cache.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore", "backslashreplace", "surrogateescape"],
                       help="bytes that do not decode: an error naming the line (strict, the default), or replaced, ignored, ...")
    cache.add_argument("--shard", choices=["tensor", "pipeline"], help="split the model across the mlx.launch ranks "
                       "(every rank takes part in every batch; docs/guide/sharded.md) instead of splitting the corpus")
    cache.set_defaults(handler=cache_command)


def _summary(function) -> str:
    """The first sentence of a row function's docstring, on one line, without markup."""
    doc = " ".join((function.__doc__ or "").split()).split(". ")[0].rstrip(".")
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", doc).replace("``", "") or "-"


def bench_command(args) -> int:
    from .bench import main

    main(rows=args.rows, repeats=args.repeats, json_path=args.json)
    return 0


def info_command(args) -> int:
    from mlxterp.plugin import load

    from .info import describe_model

    print(describe_model(load(args.model), args.prompt))
    return 0


def demo_command(args) -> int:
    from .demo import main

    main(args.out)
    return 0


def cache_command(args) -> int:
    """``mlxterp cache``: exit 0 when this rank's part and the manifest are done, else 2
    (``mlx.launch`` itself exits 0 whatever its ranks do: check every rank's status)."""
    import mlx.core as mx

    from mlxterp.plugin import MlxterpError, default_corpus, load

    group = mx.distributed.init()
    prefix = "mlxterp cache" + (f" (rank {group.rank()}/{group.size()})" if group.size() > 1 else "")
    try:
        model = load(args.model, shard=args.shard, group=group if args.shard else None)
        dataset = model.cache_activations(
            args.corpus if args.corpus is not None else default_corpus(),
            args.sites,
            args.out,
            context_size=args.context_size,
            batch_size=args.batch_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
            packing=not args.no_packing,
            max_tokens=args.max_tokens,
            shard_tokens=args.shard_tokens,
            group=group,
            encoding=args.encoding,
            errors=args.errors,
        )
    except MlxterpError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    if group.rank() == 0 and dataset is not None:
        print(f"{prefix}: {dataset.n_tokens} tokens x {len(dataset.sites)} sites in {len(dataset.shards)} shards at {dataset.path}")
    return 0
