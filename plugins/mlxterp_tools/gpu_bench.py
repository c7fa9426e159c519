"""The whole GPU comparison of issue 26 in one command, each figure beside its target, against
the peers installed on the same card (torch, nnsight, SAELens: never dependencies of mlxterp).

    PYTHONUNBUFFERED=1 python -m mlxterp_tools.gpu_bench --out DIR [--sections sae trace cache analyses]
                                                         [--quick] [--smoke] [sizes and rounds: --help]

Sections, in this order (``--sections`` picks some); each prints its lines as it goes, and
``DIR/gpu_bench.json`` is rewritten after each, so a run cut short keeps what it measured. A
section that fails is reported there with its error, and the next one runs.

1. ``sae``: SAE training (``mlxterp_tools.sae_gpu``): the same TopK job (d_in 2048, d_sae 16384,
   k 64, AuxK, Adam, batches of 4096 tokens, activations already on the device) in mlxterp and
   SAELens (target: mlxterp's tokens/s >= the faster SAELens row), and from a live model of
   SmolLM2's shape (target: one SAE >= 0.5x the plain forward's tokens/s); the step's parts.
2. ``trace``: the fixed cost of a trace (``mlxterp_tools.gpu_trace``): a random Llama of
   Llama-3.2-1B's shape, bfloat16, T = 128, at batch 1 and 8 (``--trace-batches``): the
   residual stream (target <= 1.05x plain MLX) and everything (<= 1.2x), and nnsight saving the
   same 16 layer outputs (target: mlxterp >= 2x faster).
3. ``cache``: ``cache_activations`` of the residual stream of a random Llama of SmolLM2-135M's
   shape (float16, stored float16, 16 batches of 32 x 128 tokens): all 30 layer outputs against
   the plain forward (target >= 0.85x tokens/s, the writes overlapped), against the nnsight way
   on the same card (a trace saving every layer's output, then safetensors), and one site
   against the forward cut after its block (target: cost <= 1.05x).
4. ``analyses``: on the same model, the "resid" activation patching sweep (every layer x
   position of an IOI prompt pair of equal length, byte tokens) and the logit lens, against
   nnsight batched on HF transformers' twin of the model (the same weights) and the plain
   forward (targets: faster than the faster nnsight way; the sweep's cells agree).

``--quick`` halves rounds and steps; ``--smoke`` runs every section at toy sizes, to check the
command on a CPU (torch peers run on torch's CPU there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxterp.plugin import InterpretableModel, describe_backend

from . import sae_gpu
from .harness import SMOLLM2_135M_SHAPE, median_times, random_llama

SECTIONS = ("sae", "trace", "cache", "analyses")
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
TINY_TRACE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512)


def say(*parts) -> None:
    print(*parts, flush=True)


def smollm2_model(smoke: bool):
    """A random Llama of SmolLM2-135M's shape in float16 (``smoke``: a 4-layer toy in float32),
    unquantized so that HF transformers' twin holds the same weights, with a byte tokenizer."""
    from .cache_gpu import ByteTokenizer

    shape = sae_gpu.TINY_SHAPE if smoke else {}
    module = random_llama(**shape)
    dtype = mx.float32 if smoke else mx.float16
    module.set_dtype(dtype)
    mx.eval(module.parameters())
    vocab = {**SMOLLM2_135M_SHAPE, **shape}["vocab_size"]
    return InterpretableModel(module, tokenizer=ByteTokenizer(vocab)), dtype


def run_sae(args, shared) -> dict:
    return sae_gpu.run(args, out=say, progress=shared.get("progress"))


def run_trace(args, shared) -> dict:
    from .gpu_trace import LLAMA_3_2_1B, measure

    shape = {**LLAMA_3_2_1B, **TINY_TRACE} if args.smoke else LLAMA_3_2_1B
    document = measure(args.trace_rounds, args.trace_tokens, args.trace_batches, shape=shape,
                       dtype=mx.float32 if args.smoke else mx.bfloat16, out=say, allow_cpu=args.smoke)
    for row in document["rows"]:
        row["targets"] = "residual stream <= 1.05x plain, everything <= 1.2x, mlxterp >= 2x faster than nnsight (B <= 8)"
    return document


def run_cache(args, shared) -> dict:
    from . import cache_gpu
    from .nnsight_peers import caching_cases, twin

    model, dtype = shared["model"]
    pair = shared.setdefault("twin", twin(model.model, dtype))
    described = ("random Llama, SmolLM2-135M shape" if not args.smoke else "4-layer toy Llama") + f", {dtype}"
    stored = "float32" if args.smoke else "float16"
    return cache_gpu.measure(model, described, args.cache_batch_size, 128, args.cache_batches, args.cache_repeats,
                             stored, peers=caching_cases(pair) if pair is not None else None, out=say)


def run_analyses(args, shared) -> dict:
    import numpy as np

    from .nnsight_peers import lens_case, patching_cases, twin

    model, dtype = shared["model"]
    pair = shared.setdefault("twin", twin(model.model, dtype))
    clean, corrupted = model.tokenizer.encode(CLEAN), model.tokenizer.encode(CORRUPTED)
    ids = mx.array([corrupted])
    n_layers = len(model.model.layers)
    # the answers: the tokens whose logits the change of prompt moves most, each way (a random
    # model's top predictions may well be the same token for both prompts)
    last = model.run(mx.array([clean, corrupted]), capture=["logits"]).activations["logits"][:, -1].astype(mx.float32)
    answers = (int(mx.argmax(last[0] - last[1]).item()), int(mx.argmax(last[1] - last[0]).item()))

    def sweep():
        return model.activation_patching(clean, corrupted, component="resid", positions="all", answers=answers,
                                         progress=False)

    result = sweep()
    cases = {"plain forward": lambda: mx.eval(model.model(ids)), "mlxterp sweep": sweep,
             "mlxterp logit lens": lambda: model.logit_lens(clean, top_k=5)}
    report: dict[str, Any] = {"model": "random Llama, SmolLM2-135M shape" if not args.smoke else "4-layer toy Llama",
                              "dtype": str(dtype), "clean": CLEAN, "corrupted": CORRUPTED, "answers": answers,
                              "cells": f"{n_layers} layers x {len(corrupted)} positions",
                              "metric_range": [result.corrupted_metric, result.clean_metric]}
    if pair is not None:
        peers, recovery = patching_cases(pair, clean, corrupted, answers)
        cases.update(peers)
        cases["nnsight logit lens"] = lens_case(pair, clean)
        theirs = recovery().float().cpu().numpy()
        report["max_cell_gap_percentage_points"] = float(np.abs(theirs - np.array(result.recovery)).max())
    say(f"  {report['cells']} cells; {'nnsight twin on ' + _torch_card() if pair is not None else 'no nnsight peer'}")
    medians = median_times(cases, args.analysis_rounds, warmup=1)
    report["seconds"] = medians
    sweep_s, lens_s, plain_s = medians["mlxterp sweep"], medians["mlxterp logit lens"], medians["plain forward"]
    say(f"  W4 resid sweep: mlxterp {sweep_s * 1e3:.1f} ms ({sweep_s / plain_s:.1f}x the plain forward)")
    say(f"  logit lens: mlxterp {lens_s * 1e3:.2f} ms ({lens_s / plain_s:.2f}x the plain forward)")
    nn_sweeps = {k: v for k, v in medians.items() if k.startswith("nnsight batched")}
    if nn_sweeps:
        best = min(nn_sweeps.values())
        report["sweep_speedup_over_best_nnsight"] = best / sweep_s
        report["sweep_met"] = best / sweep_s >= 1.0
        for name, seconds in nn_sweeps.items():
            say(f"    {name}: {seconds * 1e3:.1f} ms: mlxterp {seconds / sweep_s:.2f}x faster")
        say(f"    cells: max gap to nnsight {report['max_cell_gap_percentage_points']:.2g} percentage points "
            f"(metric from {result.corrupted_metric:.3g} to {result.clean_metric:.3g})")
        nn_lens = medians["nnsight logit lens"]
        report["lens_speedup_over_nnsight"] = nn_lens / lens_s
        report["lens_met"] = nn_lens / lens_s >= 1.0
        say(f"    nnsight logit lens {nn_lens * 1e3:.2f} ms: mlxterp {nn_lens / lens_s:.2f}x faster (target >= 1x)")
    report["targets"] = "mlxterp faster than the faster nnsight way, for the sweep and for the lens"
    return report


def _torch_card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "torch's CPU"


RUNNERS = {"sae": run_sae, "trace": run_trace, "cache": run_cache, "analyses": run_analyses}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_bench.json")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--quick", action="store_true", help="half the rounds and steps")
    sae_gpu.add_arguments(parser)
    parser.add_argument("--trace-rounds", type=int, default=25)
    parser.add_argument("--trace-tokens", type=int, default=128)
    parser.add_argument("--trace-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cache-batch-size", type=int, default=32)
    parser.add_argument("--cache-batches", type=int, default=16)
    parser.add_argument("--cache-repeats", type=int, default=5)
    parser.add_argument("--analysis-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        sae_gpu.smoke_sizes(args)
        args.trace_rounds, args.trace_batches = 2, [1, 2]
        args.cache_batch_size, args.cache_batches, args.cache_repeats, args.analysis_rounds = 2, 2, 1, 1
    if args.quick:
        args.steps, args.rounds = max(2, args.steps // 2), max(1, args.rounds // 2)
        args.trace_rounds, args.cache_repeats = max(2, args.trace_rounds // 2), max(1, args.cache_repeats // 2)
        args.analysis_rounds = max(1, args.analysis_rounds // 2)
    return args


def summary(report: dict) -> list[str]:
    """One line per figure with a target: what, figure, target, met."""
    lines = []
    sae = report["sections"].get("sae", {})
    for kind, row in (sae.get("job") or {}).items():
        if "vs_best_saelens" in row:
            lines.append(f"SAE job ({kind}): mlxterp {row['mlxterp']['tokens_per_s']:,.0f} tok/s = "
                         f"{row['vs_best_saelens']:.2f}x the faster SAELens | >= 1.0x | {_met(row['met'])}")
        elif "tokens_per_s" in row.get("mlxterp", {}):
            lines.append(f"SAE job ({kind}): mlxterp {row['mlxterp']['tokens_per_s']:,.0f} tok/s | SAELens not run | -")
    live = sae.get("live") or {}
    if "met" in live:
        lines.append(f"SAE from a live model: one SAE {live['one_sae_vs_plain']:.2f}x the plain forward | >= 0.5x | "
                     f"{_met(live['met'])}")
    for row in (report["sections"].get("trace") or {}).get("rows", []):
        b = row["batch"]
        lines.append(f"trace B={b}: residual stream {row['residual stream_ratio']:.3f}x | <= 1.05x | {_met(row['residual stream_met'])}")
        lines.append(f"trace B={b}: everything {row['everything_ratio']:.3f}x | <= 1.2x | {_met(row['everything_met'])}")
        if "speedup_vs_nnsight" in row:
            lines.append(f"trace B={b}: vs nnsight {row['speedup_vs_nnsight']:.2f}x faster | >= {row['speedup_target']}x | "
                         f"{_met(row['speedup_met'])}")
    cache = report["sections"].get("cache") or {}
    for key in ("all_layers", "one_site"):
        if key in cache:
            row = cache[key]
            lines.append(f"cache {key}: {row['ratio']:.2f}x the plain forward | >= {row['target']:.2f}x | {_met(row['met'])}")
            for name, value in row.items():
                if name.startswith("speedup over"):
                    lines.append(f"cache {key}: {name}: {value:.2f}x | >= 1x | {_met(value >= 1)}")
    analyses = report["sections"].get("analyses") or {}
    if "sweep_speedup_over_best_nnsight" in analyses:
        lines.append(f"W4 resid sweep: {analyses['sweep_speedup_over_best_nnsight']:.2f}x faster than the faster nnsight way"
                     f" | >= 1x | {_met(analyses['sweep_met'])}")
        lines.append(f"logit lens: {analyses['lens_speedup_over_nnsight']:.2f}x faster than nnsight | >= 1x | "
                     f"{_met(analyses['lens_met'])}")
    for name, section in report["sections"].items():
        if "error" in section:
            lines.append(f"{name}: FAILED ({section['error']})")
    return lines


def _met(flag) -> str:
    return "met" if flag else "NOT met"


def release_memory() -> None:
    """Give back what MLX's and torch's allocators keep cached: the next section starts clean."""
    import sys

    mx.clear_cache()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def write(report: dict, folder: Path) -> None:
    path = folder / "gpu_bench.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=str))
    os.replace(temporary, path)


def main(argv=None) -> int:
    args = parse(argv)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"backend": describe_backend(), "device": str(mx.default_device()),
                              "machine": platform.machine(), "versions": sae_gpu.versions(),
                              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "sections": {}}
    say(f"gpu_bench: {report['backend']}; {report['versions']}")
    shared: dict[str, Any] = {}
    for name in args.sections:
        say(f"== {name} ({time.perf_counter() - started:.0f} s) ==")
        begun = time.perf_counter()

        def progress(partial, name=name):  # a section's document so far, written out (sae: after each part)
            report["sections"][name] = {**partial, "partial": True}
            write(report, folder)

        shared["progress"] = progress
        if name in ("cache", "analyses") and "model" not in shared:
            shared["model"] = smollm2_model(args.smoke)
        result = sae_gpu.guarded(name, lambda: RUNNERS[name](args, shared), say)
        result["section_seconds"] = time.perf_counter() - begun
        report["sections"][name] = result
        write(report, folder)
        release_memory()
    report["summary"] = summary(report)
    report["total_seconds"] = time.perf_counter() - started
    write(report, folder)
    say(f"== summary ({report['total_seconds']:.0f} s): figure | target | met ==")
    for line in report["summary"]:
        say(f"  {line}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
