"""Rows of the forward pass and of traces: ``W1`` (the default model's forward against HF on
torch), ``W2`` (traces against the plain forward), ``trace-python`` (the Python a trace adds)
and ``load`` (the default model as shipped against ``mlxterp.load()``'s)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import mlx.core as mx

from mlxterp.plugin import InterpretableModel, load, on_cpu

from .harness import (
    SMOLLM2_135M_SHAPE,
    Row,
    at_most,
    default_model,
    median_times,
    milliseconds,
    random_llama,
    torch_llama,
)


def trace_overhead(repeats: int = 5, tokens: int = 32, **shape) -> dict[str, float]:
    """Median seconds of the plain forward and of traces capturing nothing, the residual stream
    and everything, on a random Llama (SmolLM2-135M's shape unless overridden)."""
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


def trace_python_cost(repeats: int = 200, layers: int = 16, tokens: int = 4, wrap=None) -> dict[str, float]:
    """Seconds per call: building the plain forward's graph (``plain``), and what each trace
    adds to it (medians over rounds of the trace's time minus the plain forward's in the same
    round; cases shuffled each round).

    A random Llama of d = 64 with ``layers`` layers on 1 x ``tokens`` ids; ``mx.eval`` is a
    no-op while timing, so the figures are Python (building the graph, probing, recording,
    resolving names) and not MLX's evaluation, whose cost per operation on a loaded CPU is
    large and noisy. Times are this thread's CPU time (``time.thread_time``: with nothing
    evaluated, all the work is on this thread), so time lost to other processes on a shared
    machine is not counted. It runs on MLX's CPU device whatever the default (on CUDA the
    token-id check waits for two reductions, which is not Python). Traces capture
    ``capture=[]`` (nothing), the ``layers`` layer outputs by raw and by standard names, and
    everything. ``wrap``: the class that wraps the module (default InterpretableModel;
    another version's, to compare versions in one run).
    """
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        return _trace_python_cost(repeats, layers, tokens, wrap)
    finally:
        mx.set_default_device(device)


def _trace_python_cost(repeats: int, layers: int, tokens: int, wrap) -> dict[str, float]:
    import random

    module = random_llama(hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = (wrap or InterpretableModel)(module)
    ids = mx.arange(1, 1 + tokens)[None]
    raw = [f"model.model.layers.{i}" for i in range(layers)]
    standard = [f"layers.{i}.output" for i in range(layers)]
    cases = {
        "plain": lambda: module(ids),
        "capture nothing": lambda: model.run(ids, capture=[]),
        "residual stream, raw names": lambda: model.run(ids, capture=raw),
        "residual stream, standard": lambda: model.run(ids, capture=standard),
        "everything": lambda: model.run(ids),
    }
    reference = module(ids)
    for name, case in list(cases.items())[1:]:
        if not mx.array_equal(case().output, reference).item():
            raise AssertionError(f"benchmark case {name!r} changed the model output")
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    evaluate = mx.eval
    mx.eval = lambda *args, **kwargs: None
    try:
        for round_ in range(repeats + 5):
            names = list(cases)
            order.shuffle(names)
            took = {}
            for name in names:
                start = time.thread_time()
                cases[name]()  # what it returns is freed inside the timing
                took[name] = time.thread_time() - start
            if round_ >= 5:
                for name in names:
                    times[name].append(took[name] - (took["plain"] if name != "plain" else 0.0))
    finally:
        mx.eval = evaluate
    return {name: statistics.median(ts) for name, ts in times.items()}


def default_model_forward(quantized: bool | None, repeats: int = 5, tokens: int = 32) -> float:
    """Median seconds of the default model's forward pass on ``tokens`` token ids."""
    model = load(quantized=quantized, validate=False)
    ids = mx.arange(100, 100 + tokens)[None]
    return median_times({"forward": lambda: mx.eval(model.model(ids))}, repeats)["forward"]


def load_speed(repeats: int = 5, tokens: int = 32) -> dict[str, float]:
    """Seconds per forward: as shipped (subprocess) and as mlxterp.load() prepares it (here)."""
    import os
    import subprocess
    import sys

    code = (
        "from mlxterp_tools.forward_rows import default_model_forward; "
        f"print(default_model_forward(quantized=True, repeats={repeats}, tokens={tokens}))"
    )
    env = {**os.environ, "MLXTERP_BLAS": "reference"}
    shipped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {
        "as shipped": float(shipped.stdout.strip().splitlines()[-1]),
        "mlxterp.load()": default_model_forward(quantized=None, repeats=repeats, tokens=tokens),
    }


def w1_forward(repeats: int = 5) -> list[Row]:
    """The default model's plain forward, 1 x 32 and 8 x 32 tokens, against HF on torch CPU."""
    import numpy as np

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
            rows.append(Row(f"W1 forward {shape}", milliseconds(ours), f"<= torch CPU ({why})", None, values))
            continue
        theirs = medians[f"torch {shape}"]
        values.update(torch_s=theirs, ratio=ours / theirs, max_logit_gap=gap)
        target, met = at_most(ours / theirs, 1.0, " torch (2 threads)")
        figure = f"{milliseconds(ours)}; torch {milliseconds(theirs)}: {ours / theirs:.2f}x"
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
        target, met = at_most(ratio, limit, " plain")
        figure = f"{milliseconds(medians[name])} / plain {milliseconds(plain)}: {ratio:.3f}x"
        values = {"trace_s": medians[name], "plain_s": plain, "ratio": ratio}
        rows.append(Row(f"W2 trace, {name} ({n_layers} layers, 1x32)", figure, target, met, values))
    return rows


def trace_python_rows(repeats: int = 5) -> list[Row]:
    """The Python a trace adds to the plain forward, per trace (16 layers, graph not evaluated).
    See :func:`trace_python_cost`."""
    costs = trace_python_cost(repeats=max(100, 40 * repeats))
    plain = costs.pop("plain")
    rows = []
    for name, added in costs.items():
        figure = f"+{added * 1e3:.3f} ms a trace = {added / plain:.3f}x the plain graph ({milliseconds(plain)})"
        values = {"added_s": added, "plain_graph_s": plain, "ratio": added / plain}
        rows.append(Row(f"trace Python, {name}", figure, "- (GPU: W2)", None, values))
    return rows


def load_rows(repeats: int = 5) -> list[Row]:
    """The default model's forward as shipped against mlxterp.load()'s."""
    speeds = load_speed(repeats)
    ratio = speeds["as shipped"] / speeds["mlxterp.load()"]
    figure = (f"{milliseconds(speeds['mlxterp.load()'])} vs as shipped {milliseconds(speeds['as shipped'])}: "
              f"{ratio:.1f}x faster")
    return [Row("load: forward 1x32 vs as shipped", figure, ">= 10x faster", ratio >= 10, speeds)]
