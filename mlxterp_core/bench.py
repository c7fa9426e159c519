"""Benchmarks: the cost of tracing, and the speed of the default model as mlxterp loads it.

Tracing, as a ratio to the plain mlx-lm forward in the same run.

``mlxterp bench`` builds a randomly initialised Llama of SmolLM2-135M's shape (30 layers,
d=576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152), runs a (1, 32) batch of token ids,
and times, interleaved so that drift hits every case alike:

- ``plain``: ``mx.eval(model(ids))`` on the bare mlx-lm model;
- ``capture nothing``: a trace that records no site;
- ``residual stream``: a trace that records the 30 layer outputs;
- ``everything``: a trace that records every site (all module inputs and outputs).

It prints the median time of each and its ratio to ``plain``.

Loading (``--suite load``): the default model's forward pass of 32 tokens as shipped (quantized
weights, MLX's own BLAS: measured in a subprocess, because the BLAS is chosen per process)
against the same model as ``mlxterp.load()`` prepares it for this backend, and the ratio.

Attribution (``--suite attribution``): on the default model, one attribution-patching call
(resid, attn, mlp over layers x positions, and every head) against the batched activation
patching sweeps that measure the same cells, in the same run.

Run it on an otherwise idle machine: on 2 cores another busy process changes timings 10x.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def main(repeats: int = 5, tokens: int = 32, suite: str = "all") -> None:
    from .backend import describe

    print(f"backend: {describe()}")
    if suite in ("all", "trace"):
        trace_main(repeats, tokens)
    if suite in ("all", "load"):
        from .load import DEFAULT_MODEL

        print(f"{DEFAULT_MODEL}, forward of 1 x {tokens} tokens, median of {repeats}")
        speeds = load_speed(repeats, tokens)
        shipped = speeds["as shipped"]
        print(f"  as shipped (quantized, MLX's reference BLAS)  {shipped * 1000:9.1f} ms")
        print(f"  as mlxterp.load() prepares it                {speeds['mlxterp.load()'] * 1000:9.1f} ms  "
              f"{shipped / speeds['mlxterp.load()']:.1f}x faster (target >= 10x)")
    if suite in ("all", "attribution"):
        rounds = max(1, min(repeats, 3))
        print(f"default model, {CLEAN!r} vs {CORRUPTED!r}: resid/attn/mlp x 30 layers x 10 "
              f"positions and 30 x 9 heads, median of {rounds}")
        speeds = attribution_speed(rounds)
        for name, seconds in speeds.items():
            print(f"  {name:22s} {seconds:8.2f} s")
        ratio = speeds["activation patching"] / speeds["attribution patching"]
        print(f"  attribution patching is {ratio:.0f}x faster")


def trace_main(repeats: int, tokens: int) -> dict[str, float]:
    print(f"random Llama, SmolLM2-135M shape, batch 1 x {tokens} tokens, median of {repeats}")
    medians = trace_overhead(repeats, tokens)
    plain = medians["plain"]
    targets = {"capture nothing": 1.02, "residual stream": 1.05, "everything": 1.3}
    for name, seconds in medians.items():
        ratio = seconds / plain
        target = f"  (target <= {targets[name]:.2f}x)" if name in targets else ""
        print(f"  {name:16s} {seconds * 1000:9.1f} ms  {ratio:6.3f}x{target}")
    return {name: seconds / plain for name, seconds in medians.items()}
