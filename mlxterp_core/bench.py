"""``mlxterp bench``: one table of workloads, each figure beside its target.

A row is a function ``(repeats) -> list[Row]`` listed in :data:`ROWS` under a short key
(``W1``, ``W2``, ...); ``mlxterp bench`` runs them in order (``--rows W1 W3`` picks some) and
prints one line per result, ``--json PATH`` writes the same rows as JSON. To add a workload,
write a row function and add one line to ``ROWS``.

Every ratio is measured in one run, cases interleaved in a shuffled order each round
(:func:`median_times`), so that drift and other processes hit every case alike. Peers (HF
transformers on torch, nnsight) are measured side by side when they are installed and never
needed: a missing peer leaves its figure out and says so.

Rows:

- ``W1``: the default model as ``mlxterp.load()`` prepares it, plain forward of 1 x 32 and
  8 x 32 tokens, against HF transformers on torch's CPU backend (2 threads, the same float32
  weights) where torch is installed and MLX runs on the CPU.
- ``W2``: traces of the default model (1 x 32 tokens) recording the residual stream (30 layer
  outputs) and everything, as ratios to the plain forward of the same run.
- ``load``: the default model's forward as shipped (quantized, MLX's own BLAS; in a
  subprocess, because the BLAS is chosen per process) against ``mlxterp.load()``'s.
- ``attribution``: attribution patching of every component against the activation patching
  sweeps that measure the same cells.
- ``cache``: ``cache_activations`` of the default model over the default corpus, tokens/s
  against the plain forward of the same windows: all 30 layer outputs (target >= 0.85x) and
  one site, against the forward cut at the last layer it needs (target: cost <= 1.05x).

Run it on an otherwise idle machine: on 2 cores another busy process changes timings 10x.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx

SMOLLM2_135M_SHAPE = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    rope_theta=100000,
    tie_word_embeddings=True,
)


def random_llama(**overrides):
    """A randomly initialised mlx-lm Llama (SmolLM2-135M's shape unless overridden)."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**{**SMOLLM2_135M_SHAPE, **overrides}))
    mx.eval(model.parameters())
    return model


def median_times(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each case; cases run interleaved, in a shuffled order each round
    (so that no case always follows the same one), after ``warmup`` rounds."""
    import random

    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        names = list(cases)
        order.shuffle(names)
        for name in names:
            case = cases[name]
            start = time.perf_counter()
            case()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def trace_overhead(repeats: int = 5, tokens: int = 32, **shape) -> dict[str, float]:
    """Median seconds of the plain forward and of the three traces (see the module doc)."""
    from .model import InterpretableModel

    module = random_llama(**shape)
    model = InterpretableModel(module)
    config = {**SMOLLM2_135M_SHAPE, **shape}
    ids = mx.random.randint(0, config["vocab_size"], (1, tokens)).astype(mx.int32)
    residual = [f"model.model.layers.{i}" for i in range(config["num_hidden_layers"])]
    cases = {
        "plain": lambda: mx.eval(module(ids)),
        "capture nothing": lambda: model.run(ids, capture=[]),
        "residual stream": lambda: model.run(ids, capture=residual),
        "everything": lambda: model.run(ids),
    }
    reference = module(ids)
    for name, case in list(cases.items())[1:]:  # time only traces that compute the same thing
        if not mx.array_equal(case().output, reference).item():
            raise AssertionError(f"benchmark case {name!r} changed the model output")
    return median_times(cases, repeats)


def default_model_forward(quantized: bool | None, repeats: int = 5, tokens: int = 32) -> float:
    """Median seconds of the default model's forward pass on ``tokens`` token ids."""
    from .load import load

    model = load(quantized=quantized, validate=False)
    ids = mx.arange(100, 100 + tokens)[None]
    return median_times({"forward": lambda: mx.eval(model.model(ids))}, repeats)["forward"]


def load_speed(repeats: int = 5, tokens: int = 32) -> dict[str, float]:
    """Seconds per forward: as shipped (subprocess) and as mlxterp.load() prepares it (here)."""
    import os
    import subprocess
    import sys

    code = (
        "from mlxterp_core.bench import default_model_forward; "
        f"print(default_model_forward(quantized=True, repeats={repeats}, tokens={tokens}))"
    )
    env = {**os.environ, "MLXTERP_BLAS": "reference"}
    shipped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {
        "as shipped": float(shipped.stdout.strip().splitlines()[-1]),
        "mlxterp.load()": default_model_forward(quantized=None, repeats=repeats, tokens=tokens),
    }


CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def attribution_speed(repeats: int = 3) -> dict[str, float]:
    """Seconds: attribution patching of every component vs the activation patching sweeps."""
    from .load import load

    model = load(validate=False)

    def sweeps():
        for component in ("resid", "attn", "mlp"):
            model.activation_patching(CLEAN, CORRUPTED, component=component, positions="all")
        model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True)

    cases = {
        "attribution patching": lambda: model.attribution_patching(CLEAN, CORRUPTED),
        "activation patching": sweeps,
    }
    return median_times(cases, repeats)



# --- the table -------------------------------------------------------------------------------


@attrs.define
class Row:
    """One result: what was measured, the figure, the target beside it, and whether it was met
    (None where there is nothing to compare against, e.g. a peer that is not installed)."""

    workload: str
    figure: str
    target: str
    met: bool | None = None
    values: dict[str, Any] = attrs.field(factory=dict)  # the raw numbers, for --json


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _at_most(ratio: float, limit: float, what: str = "") -> tuple[str, bool]:
    return f"<= {limit:.2f}x{what}", ratio <= limit


def torch_llama(module):
    """HF transformers' Llama on torch's CPU backend with ``module``'s weights in float32, or
    None when torch / transformers are not installed or the model is not a Llama."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    import numpy as np
    from mlx.utils import tree_flatten

    args = getattr(module, "args", None)
    if getattr(args, "model_type", None) != "llama":
        return None
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim or args.hidden_size // args.num_attention_heads,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=max(args.max_position_embeddings or 0, 2048),
        attn_implementation="sdpa",
    )
    peer = LlamaForCausalLM(config).eval()
    weights = {
        name: torch.from_numpy(np.array(value.astype(mx.float32)))
        for name, value in tree_flatten(module.parameters())
    }
    peer.load_state_dict(weights, strict=not args.tie_word_embeddings)
    return peer


@functools.cache
def default_model():
    """The default model as ``mlxterp.load()`` prepares it, loaded once for all rows."""
    from .load import load

    return load(validate=False)


def w1_forward(repeats: int = 5) -> list[Row]:
    """The default model's plain forward, 1 x 32 and 8 x 32 tokens, against HF on torch CPU."""
    import numpy as np

    from .backend import on_cpu

    model = default_model()
    module = model.model
    batches = {f"{b}x32": mx.arange(100, 100 + 32 * b).reshape(b, 32) for b in (1, 8)}
    cases: dict[str, Callable[[], object]] = {
        f"mlx {shape}": (lambda ids=ids: mx.eval(module(ids))) for shape, ids in batches.items()
    }
    peer = torch_llama(module) if on_cpu() else None
    if peer is not None:
        import torch

        torch.set_num_threads(2)
        for shape, ids in batches.items():
            tokens = torch.from_numpy(np.array(ids))

            def run(tokens=tokens):
                with torch.inference_mode():
                    peer(tokens)

            cases[f"torch {shape}"] = run
        with torch.inference_mode():  # the peer computes the same logits, or it is no peer
            ids = batches["1x32"]
            theirs = peer(torch.from_numpy(np.array(ids))).logits.numpy()
            gap = float(np.abs(theirs - np.array(module(ids))).max())
    medians = median_times(cases, repeats)
    rows = []
    for shape in batches:
        ours = medians[f"mlx {shape}"]
        values = {"mlx_s": ours}
        if peer is None:
            why = "MLX is not on the CPU" if not on_cpu() else "torch/transformers not installed"
            rows.append(Row(f"W1 forward {shape}", _ms(ours), f"<= torch CPU ({why})", None, values))
            continue
        theirs = medians[f"torch {shape}"]
        values.update(torch_s=theirs, ratio=ours / theirs, max_logit_gap=gap)
        target, met = _at_most(ours / theirs, 1.0, " torch (2 threads)")
        figure = f"{_ms(ours)}; torch {_ms(theirs)}: {ours / theirs:.2f}x"
        rows.append(Row(f"W1 forward {shape}", figure, target, met, values))
    return rows


def w2_traces(repeats: int = 5) -> list[Row]:
    """Traces of the default model (1 x 32 tokens) as ratios to its plain forward."""
    model = default_model()
    module = model.model
    ids = mx.arange(100, 132)[None]
    n_layers = len(module.layers)
    residual = [f"layers.{i}.output" for i in range(n_layers)]
    cases = {
        "plain": lambda: mx.eval(module(ids)),
        "residual stream": lambda: model.run(ids, capture=residual),
        "everything": lambda: model.run(ids),
    }
    reference = module(ids)
    for name in ("residual stream", "everything"):  # time only traces that compute the same thing
        if not mx.array_equal(cases[name]().output, reference).item():
            raise AssertionError(f"benchmark case {name!r} changed the model output")
    medians = median_times(cases, repeats)
    plain = medians["plain"]
    rows = []
    for name, limit in (("residual stream", 1.05), ("everything", 1.2)):
        ratio = medians[name] / plain
        target, met = _at_most(ratio, limit, " plain")
        figure = f"{_ms(medians[name])} / plain {_ms(plain)}: {ratio:.3f}x"
        values = {"trace_s": medians[name], "plain_s": plain, "ratio": ratio}
        rows.append(Row(f"W2 trace, {name} ({n_layers} layers, 1x32)", figure, target, met, values))
    return rows


def load_rows(repeats: int = 5) -> list[Row]:
    speeds = load_speed(repeats)
    ratio = speeds["as shipped"] / speeds["mlxterp.load()"]
    figure = f"{_ms(speeds['mlxterp.load()'])} vs as shipped {_ms(speeds['as shipped'])}: {ratio:.1f}x faster"
    return [Row("load: forward 1x32 vs as shipped", figure, ">= 10x faster", ratio >= 10, speeds)]


def attribution_rows(repeats: int = 3) -> list[Row]:
    speeds = attribution_speed(max(1, min(repeats, 3)))
    ratio = speeds["activation patching"] / speeds["attribution patching"]
    figure = (f"{speeds['attribution patching']:.2f} s vs activation patching "
              f"{speeds['activation patching']:.2f} s: {ratio:.0f}x faster")
    return [Row("attribution patching, 1,170 cells", figure, "faster", ratio > 1, speeds)]


# --- activation caching ----------------------------------------------------------------------


def _plain_forward_cut(module, ids, layers: int | None):
    """The bare mlx-lm Llama forward of ``ids`` through its first ``layers`` blocks (None: the
    whole model, head included), evaluated: what caching is compared against."""
    if layers is None:
        mx.eval(module(ids))
        return
    from mlx_lm.models.base import create_attention_mask

    inner = module.model
    h = inner.embed_tokens(ids)
    mask = create_attention_mask(h, None)
    for block in inner.layers[:layers]:
        h = block(h, mask, cache=None)
    mx.eval(h)


def cache_speed(model=None, *, sites=("layers[*]",), cut: int | None = None, batch_size: int = 8,
                context_size: int = 128, batches: int = 4, repeats: int = 3, dtype=None) -> dict[str, float]:
    """Tokens/s of ``model.cache_activations`` (all of it: planning, the forward passes, the
    background writer, checksums, the manifest) against the plain forward of the same windows
    (cut after ``cut`` blocks, or whole), interleaved rounds, medians. ``model``: default model."""
    import tempfile

    from .corpus import default_corpus, token_windows

    model = model or default_model()
    corpus = default_corpus()
    max_tokens = batch_size * context_size * batches
    windows = [b.inputs for b in token_windows(model, corpus, context_size, batch_size=batch_size, max_tokens=max_tokens)]
    with tempfile.TemporaryDirectory(prefix="mlxterp-bench-cache-") as folder:
        cases = {
            "plain": lambda: [_plain_forward_cut(model.model, ids, cut) for ids in windows],
            "cache": lambda: model.cache_activations(corpus, list(sites), folder, context_size=context_size,
                                                     batch_size=batch_size, max_tokens=max_tokens, dtype=dtype,
                                                     overwrite=True, progress=False),
        }
        medians = median_times(cases, repeats)
    return {name: max_tokens / seconds for name, seconds in medians.items()}


def cache_rows(repeats: int = 3) -> list[Row]:
    """Caching the default model over the default corpus (4 batches of 8 x 128 tokens): all 30
    layer outputs against the full plain forward, and one site (layers[14]) against the plain
    forward cut after block 15, in tokens/s."""
    repeats = max(1, min(repeats, 3))
    model = default_model()
    rows = []
    for workload, sites, cut, limit in (
        ("cache: 30 layer outputs vs forward", ("layers[*]",), None, 0.85),
        ("cache: layers[14] vs forward to block 15", ("layers[14]",), 15, 1 / 1.05),
    ):
        speed = cache_speed(model, sites=sites, cut=cut, repeats=repeats)
        ratio = speed["cache"] / speed["plain"]
        figure = f"{speed['cache']:.0f} tok/s vs plain {speed['plain']:.0f} tok/s: {ratio:.2f}x"
        values = {"cache_tokens_per_s": speed["cache"], "plain_tokens_per_s": speed["plain"], "ratio": ratio}
        rows.append(Row(workload, figure, f">= {limit:.2f}x plain tok/s", ratio >= limit, values))
    return rows


ROWS: dict[str, Callable[[int], list[Row]]] = {
    "W1": w1_forward,
    "W2": w2_traces,
    "load": load_rows,
    "attribution": attribution_rows,
    "cache": cache_rows,
}
"""Every row of ``mlxterp bench``, in the order it prints them."""


def run_rows(keys: list[str] | None = None, repeats: int = 5, out=print) -> list[Row]:
    """Run the chosen rows (all by default), printing each result as it comes."""
    from .backend import describe

    unknown = [k for k in keys or [] if k not in ROWS]
    if unknown:
        from .errors import InputError

        raise InputError(f"unknown benchmark rows {unknown}: choose from {', '.join(ROWS)}")
    out(f"backend: {describe()}")
    out(f"{'workload':44s} {'figure':52s} {'target':28s} met")
    rows = []
    for key in keys or list(ROWS):
        for row in ROWS[key](repeats):
            rows.append(row)
            met = {True: "yes", False: "NO", None: "-"}[row.met]
            out(f"{row.workload:44s} {row.figure:52s} {row.target:28s} {met}")
    return rows


def write_json(rows: list[Row], path) -> None:
    import platform
    from pathlib import Path

    from .backend import describe

    document = {
        "backend": describe(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
        "rows": [attrs.asdict(row) for row in rows],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


def main(rows: list[str] | None = None, repeats: int = 5, json_path=None) -> None:
    results = run_rows(rows, repeats)
    if json_path is not None:
        write_json(results, json_path)
