"""The distributed activation cache and patching sweep, one rank against several: the figures of
issue 16 (two GPUs over NCCL), runnable anywhere ``mlx.launch`` runs.

    # two GPUs of one host, MLX's CUDA backend (one process per GPU)
    python -m mlxterp_tools.distributed_gpu --ranks 2 --backend nccl --out /tmp/dist
    # the same on this CPU over the ring backend, at a size a laptop affords (checks the method)
    python -m mlxterp_tools.distributed_gpu --ranks 2 --backend ring --shape tiny --tokens 16384 --out /tmp/dist

The driver runs the worker twice: as one plain process and under ``mlx.launch -n RANKS``. Each
run caches the residual stream (``layers[*].output``) of a random Llama (Llama-3.2-1B's shape
in bfloat16 by default, or ``--shape tiny``) over the offline corpus (``pydoc_data``; a
byte-level tokenizer, so no download), timed from the first window to the manifest, and runs
``activation_patching`` ("resid", every layer x position) on the same model. The driver then
checks that the two datasets are identical row for row (every site, every row field, bit for
bit) and the two sweeps equal, and prints tokens/s of both runs and the speed-ups.

Nothing here is a dependency of the library: MLX's CUDA wheel and NCCL only where run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlxterp.plugin import ActivationDataset

# the other benchmarks' stand-in tokenizer and model shape
from .cache_gpu import ByteTokenizer
from .gpu_trace import LLAMA_3_2_1B

TINY = dict(
    hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True,
)
CLEAN = list(b"The Eiffel Tower is in the city of")  # byte ids, the same count: positions correspond
CORRUPTED = list(b"The Colosseum!!! is in the city of")


def worker(args) -> None:
    import mlx.core as mx

    from mlxterp.plugin import InterpretableModel, default_corpus

    from .harness import random_llama

    group = mx.distributed.init()
    shape = LLAMA_3_2_1B if args.shape == "1b" else TINY
    module = random_llama(**shape)  # seeded: every rank builds the same weights
    module.set_dtype(mx.bfloat16 if args.dtype == "bfloat16" else mx.float32)
    mx.eval(module.parameters())
    model = InterpretableModel(module, tokenizer=ByteTokenizer(shape["vocab_size"]))
    folder = Path(args.out) / f"ranks{group.size()}"
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # all loaded: start together
    start = time.perf_counter()
    model.cache_activations(default_corpus(), "layers[*].output", folder / "cache", context_size=args.context_size,
                            batch_size=args.batch_size, max_tokens=args.tokens, overwrite=True, progress=False,
                            group=group)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    cache_s = time.perf_counter() - start
    model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=(80, 82))  # warm-up
    start = time.perf_counter()
    patched = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=(80, 82))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    patch_s = time.perf_counter() - start
    if group.rank() == 0:
        report = {"ranks": group.size(), "device": str(mx.default_device()), "mlx": mx.__version__,
                  "shape": args.shape, "dtype": args.dtype, "cache_seconds": cache_s, "patching_seconds": patch_s,
                  "recovery": [[float(v) for v in row] for row in patched.recovery]}
        (folder / "report.json").write_text(json.dumps(report))


def compare(one: Path, many: Path) -> list[str]:
    """Where the two datasets differ (nothing: identical row for row and bit for bit)."""
    import numpy as np

    a, b = ActivationDataset(one / "cache"), ActivationDataset(many / "cache")
    problems = []
    if a.n_tokens != b.n_tokens or a.sites != b.sites:
        return [f"rows {a.n_tokens} vs {b.n_tokens}, sites {a.sites} vs {b.sites}"]
    for field in ("tokens", "document", "position", "offset", "bos"):
        if not np.array_equal(getattr(a, field), getattr(b, field)):
            problems.append(f"row field {field} differs")
    for site in a.sites:
        x, y = a[site].numpy(slice(None)), b[site].numpy(slice(None))
        if x.shape != y.shape or x.tobytes() != y.tobytes():
            problems.append(f"site {site} differs")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "ring"])
    parser.add_argument("--shape", default="1b", choices=["1b", "tiny"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="corpus tokens to cache (a prefix)")
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    reports = {}
    for n in (1, args.ranks):
        command = [sys.executable, "-m", "mlxterp_tools.distributed_gpu", *passed, "--worker"]
        if n > 1:  # one rank: a plain process (a singleton group)
            command = ["mlx.launch", "-n", str(n), "--backend", args.backend, "--", *command]
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command)
        report = out / f"ranks{n}" / "report.json"
        if done.returncode != 0 or not report.exists():  # mlx.launch exits 0 even when a rank fails
            print(f"the {n}-rank run failed (exit {done.returncode}; see the ranks' output above)")
            return 1
        reports[n] = json.loads(report.read_text())
    problems = compare(out / "ranks1", out / f"ranks{args.ranks}")
    one, many = reports[1], reports[args.ranks]
    import numpy as np

    tokens = ActivationDataset(out / "ranks1" / "cache").n_tokens
    sweep = float(np.max(np.abs(np.array(one["recovery"]) - np.array(many["recovery"]))))
    speedup = one["cache_seconds"] / many["cache_seconds"]
    print(f"device {one['device']}, mlx {one['mlx']}, backend {args.backend}, shape {args.shape}, {args.dtype}")
    print(f"cache layers[*].output, {tokens} tokens: 1 rank {tokens / one['cache_seconds']:.0f} tok/s, "
          f"{args.ranks} ranks {tokens / many['cache_seconds']:.0f} tok/s: {speedup:.2f}x (target >= 1.8x); "
          f"datasets {'identical row for row' if not problems else 'DIFFER: ' + '; '.join(problems)}")
    print(f"activation_patching resid: 1 rank {one['patching_seconds']:.2f} s, {args.ranks} ranks "
          f"{many['patching_seconds']:.2f} s: {one['patching_seconds'] / many['patching_seconds']:.2f}x; "
          f"max |difference| {sweep:.2e}")
    (out / "summary.json").write_text(json.dumps({"one": one, "many": many, "tokens": tokens, "cache_speedup": speedup,
                                                   "sweep_max_difference": sweep, "problems": problems}))
    return 0 if not problems and sweep <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
