"""The fixed cost of a trace on a GPU, against plain MLX and against nnsight, in one run.

    python -m mlxterp_tools.gpu_trace [--rounds 25] [--tokens 128] [--batches 1 8 32] [--json out.json]
                                      [--profile]

A randomly initialised Llama of Llama-3.2-1B's shape (16 layers, d=2048, 32 heads, 8 KV heads,
MLP 8192, vocabulary 128256) in bfloat16, T tokens, at each batch size:

- ``plain``: ``mx.eval(module(ids))`` on the bare mlx-lm model;
- ``plain keeping the layer outputs``: the same forward written out, evaluating the logits and
  the 16 layer outputs (what MLX itself costs for keeping them, with no mlxterp);
- ``capture nothing``: ``model.run(ids, capture=[])``;
- ``residual stream``: ``model.run(ids, capture=<the 16 layer outputs>)``;
- ``everything``: ``model.run(ids)`` (every module's input and output);
- where torch, transformers and nnsight are installed and CUDA is available, on the same card:
  ``torch``: HF transformers' Llama of the same shape (random weights, bfloat16, eager
  attention) under ``torch.inference_mode()``; ``nnsight``: an ``NNsight`` trace of that model
  saving the 16 decoder-layer outputs.

Cases run interleaved in a shuffled order each round; medians. Targets (issue 14): residual
stream <= 1.05x plain, everything <= 1.2x plain, and >= 2x faster than nnsight at B = 1 and 8,
>= 1.25x at B = 32. ``--profile`` also prints where a residual-stream trace's Python time goes
(cProfile of 50 traces at B = 1). torch and nnsight are optional; mlxterp never needs them.
"""

from __future__ import annotations

import argparse
import json
import platform

import mlx.core as mx

from mlxterp.plugin import InterpretableModel

from .harness import median_times, package_version, random_llama

LLAMA_3_2_1B = dict(
    hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, max_position_embeddings=131072,
)


def forward_keeping_layers(module, ids):
    """mlx-lm's Llama forward written out, returning the logits and the 16 layer outputs: what
    a trace of the residual stream evaluates, without mlxterp (the cost MLX itself adds)."""
    from mlx_lm.models.base import create_attention_mask

    inner = module.model
    h = inner.embed_tokens(ids)
    mask = create_attention_mask(h, None)
    outputs = []
    for layer in inner.layers:
        h = layer(h, mask, cache=None)
        outputs.append(h)
    return [inner.embed_tokens.as_linear(inner.norm(h)), *outputs]


def torch_dtype(dtype):
    """The torch dtype of an MLX floating dtype."""
    import torch

    return {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}[dtype]


def torch_cases(batches: dict[int, mx.array], shape: dict | None = None, dtype=mx.bfloat16, allow_cpu: bool = False):
    """(cases, card) for plain torch and nnsight on a random Llama of ``shape`` (default
    Llama-3.2-1B's) in ``dtype``, or ({}, why) when they cannot run here (without CUDA, unless
    ``allow_cpu``: a check of the code on a CPU)."""
    try:
        import numpy as np
        import torch
        from nnsight import NNsight
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return {}, f"torch/nnsight not installed ({e.name})"
    if not torch.cuda.is_available() and not allow_cpu:
        return {}, "no CUDA device for torch"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(**{**LLAMA_3_2_1B, **(shape or {})}, attn_implementation="eager")
    torch.manual_seed(0)
    peer = LlamaForCausalLM(config).to(device, torch_dtype(dtype)).eval()
    traced = NNsight(peer)
    cases = {}
    for b, ids in batches.items():
        tokens = torch.from_numpy(np.array(ids)).to(device)

        def plain(tokens=tokens):
            with torch.inference_mode():
                peer(tokens)
            if device == "cuda":
                torch.cuda.synchronize()

        def nnsight_trace(tokens=tokens):
            saved = []  # nnsight runs the block's body itself: fill a list from outside it
            with torch.inference_mode(), traced.trace(tokens):
                for i in range(config.num_hidden_layers):
                    saved.append(traced.model.layers[i].output.save())
            if device == "cuda":
                torch.cuda.synchronize()
            return saved

        cases[f"torch B={b}"] = plain
        cases[f"nnsight B={b}"] = nnsight_trace
    return cases, torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'} (torch on the CPU)"


def measure(rounds: int = 25, tokens: int = 128, batches: list[int] = (1, 8, 32), shape: dict | None = None,
            dtype=mx.bfloat16, profile: bool = False, out=print, allow_cpu: bool = False) -> dict:
    """Every case of the module doc, interleaved, medians of ``rounds``; printed (``out``) and
    returned as a JSON-ready document (a row per batch size, each figure beside its target).
    ``shape``: the random Llama's (default Llama-3.2-1B's)."""
    shape = shape or LLAMA_3_2_1B
    module = random_llama(**shape)
    module.set_dtype(dtype)
    mx.eval(module.parameters())
    model = InterpretableModel(module)
    residual = [f"model.model.layers.{i}" for i in range(shape["num_hidden_layers"])]
    mx.random.seed(1)
    inputs = {b: mx.random.randint(0, min(32000, shape["vocab_size"]), (b, tokens)).astype(mx.int32) for b in batches}
    mx.eval(list(inputs.values()))
    cases = {}
    for b, ids in inputs.items():
        cases[f"plain B={b}"] = lambda ids=ids: mx.eval(module(ids))
        cases[f"plain keeping the layer outputs B={b}"] = lambda ids=ids: mx.eval(forward_keeping_layers(module, ids))
        cases[f"capture nothing B={b}"] = lambda ids=ids: model.run(ids, capture=[])
        cases[f"residual stream B={b}"] = lambda ids=ids: model.run(ids, capture=residual)
        cases[f"everything B={b}"] = lambda ids=ids: model.run(ids)
        reference = module(ids)
        for name in ("residual stream", "everything"):
            if not mx.array_equal(cases[f"{name} B={b}"]().output, reference).item():
                raise AssertionError(f"{name} changed the model output")
    peers, card = torch_cases(inputs, shape, dtype, allow_cpu)
    cases.update(peers)

    medians = median_times(cases, rounds, warmup=2)

    out(f"device: {mx.default_device()}, card: {card}, "
        + ", ".join(f"{name} {package_version(name)}" for name in ("mlx", "mlx-lm", "torch", "transformers", "nnsight")))
    out(f"random Llama ({shape['num_hidden_layers']} layers, d={shape['hidden_size']}), {dtype}, T = {tokens}, "
        f"medians of {rounds} rounds")
    rows = []
    for b in batches:
        plain = medians[f"plain B={b}"]
        row = {"batch": b, "plain_ms": plain * 1e3}
        line = f"B={b:3d}  plain {plain * 1e3:7.2f} ms"
        for name, limit in (("residual stream", 1.05), ("everything", 1.2)):
            t = medians[f"{name} B={b}"]
            row[f"{name}_ms"] = t * 1e3
            row[f"{name}_ratio"] = t / plain
            row[f"{name}_target"] = limit
            row[f"{name}_met"] = t / plain <= limit
            line += f" | {name} {t * 1e3:7.2f} ms {t / plain:5.3f}x (<= {limit})"
        if f"nnsight B={b}" in medians:
            nn_t, torch_t = medians[f"nnsight B={b}"], medians[f"torch B={b}"]
            speedup = nn_t / medians[f"residual stream B={b}"]
            need = 2.0 if b <= 8 else 1.25
            row.update(nnsight_ms=nn_t * 1e3, torch_ms=torch_t * 1e3, speedup_vs_nnsight=speedup,
                       speedup_target=need, speedup_met=speedup >= need)
            line += f" | torch {torch_t * 1e3:7.2f} ms | nnsight {nn_t * 1e3:7.2f} ms: mlxterp {speedup:4.2f}x faster (>= {need})"
        for name in ("plain keeping the layer outputs", "capture nothing"):
            t = medians[f"{name} B={b}"]
            row[f"{name}_ms"] = t * 1e3
            line += f" | {name} {t * 1e3:7.2f} ms {t / plain:5.3f}x"
        rows.append(row)
        out(line)
    document = {"device": str(mx.default_device()), "card": card, "machine": platform.machine(),
                "versions": {n: package_version(n) for n in ("mlx", "mlx-lm", "torch", "transformers", "nnsight")},
                "shape": dict(shape), "dtype": str(dtype), "tokens": tokens, "rounds": rounds, "rows": rows}
    if profile:
        import cProfile
        import pstats

        ids = inputs[batches[0]]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            model.run(ids, capture=residual)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return document


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    document = measure(args.rounds, args.tokens, args.batches, profile=args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)


if __name__ == "__main__":
    main()
