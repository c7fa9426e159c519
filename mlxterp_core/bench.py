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
- ``trace-python``: the Python a trace adds to the forward, per trace (probing, recording,
  name resolution), on a tiny random Llama whose graph is built but never evaluated
  (:func:`trace_python_cost`): on a GPU that time adds to the plain forward's, so it is what
  decides W2's ratios there.
- ``load``: the default model's forward as shipped (quantized, MLX's own BLAS; in a
  subprocess, because the BLAS is chosen per process) against ``mlxterp.load()``'s.
- ``attribution``: attribution patching of every component against the activation patching
  sweeps that measure the same cells.
- ``cache``: ``cache_activations`` of the default model over the default corpus, tokens/s
  against the plain forward of the same windows: all 30 layer outputs (target >= 0.85x) and
  one site, against the forward cut at the last layer it needs (target: cost <= 1.05x).

Run it on an otherwise idle machine: on 2 cores another busy process changes timings 10x.

Workloads that need several processes or a GPU with its peers are scripts under
``benchmarks/``: ``gpu_trace.py`` (traces against plain MLX, torch and nnsight on one GPU),
``cache_gpu.py`` (caching on one GPU), ``sae_training.py`` (the longer SAE run) and
``distributed_gpu.py`` (the cache and the patching sweep on 1 and N ranks, e.g. two GPUs over
NCCL: ``python benchmarks/distributed_gpu.py --ranks 2 --backend nccl --out DIR``); see
docs/performance.md for their figures.
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

    from .model import InterpretableModel

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


def trace_python_rows(repeats: int = 5) -> list[Row]:
    """``trace-python``: per-trace Python of :func:`trace_python_cost` (16 layers)."""
    costs = trace_python_cost(repeats=max(100, 40 * repeats))
    plain = costs.pop("plain")
    rows = []
    for name, added in costs.items():
        figure = f"+{added * 1e3:.3f} ms a trace = {added / plain:.3f}x the plain graph ({_ms(plain)})"
        values = {"added_s": added, "plain_graph_s": plain, "ratio": added / plain}
        rows.append(Row(f"trace Python, {name}", figure, "- (GPU: W2)", None, values))
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

# --- analyses: the logit lens, patching sweeps, steered generation (W3-W5) ---------------------


def hf_logit_lens(peer, tokens, top_k: int = 5):
    """The logit lens by hand on HF transformers: every layer's hidden state through the final
    norm and the unembedding, softmax, top-k."""
    import torch

    with torch.inference_mode():
        hidden = torch.stack(peer(tokens, output_hidden_states=True).hidden_states[1:])
        probs = torch.softmax(peer.lm_head(peer.model.norm(hidden)).float(), dim=-1)
        return torch.topk(probs, top_k, dim=-1)


def w3_logit_lens(repeats: int = 5) -> list[Row]:
    """The logit lens of every layer x position of CLEAN, top-5, against the plain forward of
    the same prompt (and HF by hand on torch CPU where installed)."""
    import numpy as np

    from .backend import on_cpu

    model = default_model()
    ids = mx.array([model.encode(CLEAN)])
    n_layers, length = len(model.model.layers), ids.shape[1]
    cases = {
        "plain": lambda: mx.eval(model.model(ids)),
        "lens": lambda: model.logit_lens(CLEAN, top_k=5),
    }
    peer = torch_llama(model.model) if on_cpu() else None
    if peer is not None:
        import torch

        torch.set_num_threads(2)
        tokens = torch.from_numpy(np.array(ids))
        cases["HF by hand"] = lambda: hf_logit_lens(peer, tokens)
    medians = median_times(cases, repeats)
    lens, plain = medians["lens"], medians["plain"]
    values = {"lens_s": lens, "plain_s": plain, "ratio": lens / plain}
    figure = f"{_ms(lens)} / plain {_ms(plain)}: {lens / plain:.2f}x"
    target, met = _at_most(lens / plain, 2.0, " plain")
    if peer is not None:
        values["hf_by_hand_s"] = medians["HF by hand"]
        figure += f"; HF by hand {_ms(medians['HF by hand'])}"
        target += ", < HF by hand"
        met = met and lens < medians["HF by hand"]
    return [Row(f"W3 logit lens, {n_layers} layers x {length} positions, top-5", figure, target, met, values)]


def naive_patching(model, clean: str, corrupted: str, component: str = "resid") -> list[list[float]]:
    """Activation patching as a loop of one trace per cell (layer x position): recovery (%)."""
    from mlxterp import interventions as iv

    sub = {"resid": "output", "mlp": "mlp", "attn": "attn"}[component]
    n_layers = model.architecture.n_layers
    names = [f"layers.{i}.{sub}" for i in range(n_layers)]
    clean_run = model.run([clean], capture=[*names, "logits"]).activations
    corrupted_logits = model.run([corrupted], capture=["logits"]).activations["logits"]
    good, bad = mx.argmax(clean_run["logits"][0, -1]).item(), mx.argmax(corrupted_logits[0, -1]).item()

    def metric(logits):
        return (logits[0, -1, good] - logits[0, -1, bad]).item()

    low, high = metric(corrupted_logits), metric(clean_run["logits"])
    length = len(model.encode(corrupted))
    recovery = []
    for name in names:
        row = []
        for position in range(length):
            edit = {name: iv.replace_with(clean_run[name]).at(positions=[position])}
            logits = model.run([corrupted], interventions=edit, capture=["logits"]).activations["logits"]
            row.append((metric(logits) - low) / (high - low) * 100)
        recovery.append(row)
    return recovery


def w4_patching(repeats: int = 5) -> list[Row]:
    """The "resid" sweep (layers x positions) of CLEAN vs CORRUPTED against the naive loop of
    one trace per cell, in one run; every cell compared; peak memory against the budget."""
    from mlxterp_analyses.patching import MEMORY_BUDGET

    model = default_model()

    def sweep():
        return model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", progress=False)

    result = sweep()  # warm-up, and the cells to compare
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    sweep()
    peak = mx.get_peak_memory() - active
    naive_rounds = max(1, repeats // 3)
    sweep_times, naive_times, naive = [], [], None
    for round_ in range(naive_rounds):  # the naive loop takes ~20x longer: fewer rounds of it
        for _ in range(max(1, repeats // naive_rounds)):
            start = time.perf_counter()
            sweep()
            sweep_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive = naive_patching(model, CLEAN, CORRUPTED)
        naive_times.append(time.perf_counter() - start)
    fast, slow = statistics.median(sweep_times), statistics.median(naive_times)
    gap = max(abs(result[i][p] - naive[i][p]) / 100 for i in range(len(naive)) for p in range(len(naive[i])))
    cells = len(naive) * len(naive[0])
    values = {"sweep_s": fast, "naive_s": slow, "ratio": slow / fast, "max_recovery_gap": gap,
              "peak_memory_bytes": peak, "memory_budget_bytes": MEMORY_BUDGET}
    figure = f"{fast:.2f} s; naive loop {slow:.1f} s: {slow / fast:.1f}x; cells within {gap:.1e}"
    met = fast <= 1.5 and slow / fast >= 15 and gap <= 1e-4 and peak <= MEMORY_BUDGET
    target = "<= 1.5 s, >= 15x naive, <= 1e-4"
    memory = f"peak {peak / 2**20:.0f} MiB above the model, budget {MEMORY_BUDGET / 2**20:.0f} MiB"
    return [
        Row(f"W4 patching, resid {len(naive)} layers x {len(naive[0])} positions ({cells} cells)", figure, target, met, values),
        Row("W4 patching, peak memory", memory, "<= memory_budget", peak <= MEMORY_BUDGET, values),
    ]


STEER_PROMPT = "I went to see the new movie yesterday. I thought it was"


def w5_steering(repeats: int = 5) -> list[Row]:
    """Steered greedy generation of 20 tokens: tokens/s against mlx_lm.stream_generate."""
    from mlx_lm import stream_generate

    model = default_model()
    vector = model.steering_vector(["I loved it, wonderful."], ["I hated it, terrible."], layer=14)
    edits = vector.interventions(scale=1.5)
    counts: dict[str, int] = {}

    def plain():
        counts["plain"] = sum(1 for _ in stream_generate(model.model, model.tokenizer, STEER_PROMPT, max_tokens=20))

    def steered():
        counts["steered"] = len(model.generate(STEER_PROMPT, max_tokens=20, interventions=edits).tokens)

    medians = median_times({"mlx_lm.stream_generate": plain, "steered": steered}, repeats)
    ours = counts["steered"] / medians["steered"]
    theirs = counts["plain"] / medians["mlx_lm.stream_generate"]
    values = {"steered_tokens_per_s": ours, "stream_generate_tokens_per_s": theirs, "ratio": ours / theirs}
    figure = f"{ours:.1f} tok/s; stream_generate {theirs:.1f} tok/s: {ours / theirs:.2f}x"
    return [Row("W5 steered greedy generation, 20 tokens", figure, ">= 0.95x stream_generate", ours / theirs >= 0.95, values)]


ROWS: dict[str, Callable[[int], list[Row]]] = {
    "W1": w1_forward,
    "W2": w2_traces,
    "W3": w3_logit_lens,
    "W4": w4_patching,
    "W5": w5_steering,
    "trace-python": trace_python_rows,
    "load": load_rows,
    "attribution": attribution_rows,
    "cache": cache_rows,
}
"""The core's rows of ``mlxterp bench``, in the order it prints them (plugins add theirs:
the ``mlxterp_bench_rows`` hook; :func:`all_rows` has both)."""


def all_rows() -> dict[str, Callable[[int], list[Row]]]:
    """The core's rows, then every plugin's."""
    from .plugins import bench_rows

    return {**ROWS, **bench_rows()}


def run_rows(keys: list[str] | None = None, repeats: int = 5, out=print) -> list[Row]:
    """Run the chosen rows (all by default), printing each result as it comes."""
    from .backend import describe

    table = all_rows()
    unknown = [k for k in keys or [] if k not in table]
    if unknown:
        from .errors import InputError

        raise InputError(f"unknown benchmark rows {unknown}: choose from {', '.join(table)}")
    out(f"backend: {describe()}")
    out(f"{'workload':44s} {'figure':52s} {'target':28s} met")
    rows = []
    for key in keys or list(table):
        for row in table[key](repeats):
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
