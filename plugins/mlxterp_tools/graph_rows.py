"""The ``graphs`` rows of ``mlxterp bench``: attribution graphs of a 10-token and a 64-token
prompt on the default model, wall time and peak memory.

The transcoders: the folder ``$MLXTERP_BENCH_TRANSCODERS`` names (e.g. the cross-layer
transcoder ``python -m mlxterp_tools.transcoder_training`` trains), else a random cross-layer
transcoder of :data:`RANDOM_WIDTH` features per layer whose encoder is scaled to the model's
MLP inputs and whose biases make about :data:`RANDOM_L0` features fire per layer and token
(the same work as a trained one of that width and L0; its edges mean nothing).
"""

from __future__ import annotations

import os
import time

import mlx.core as mx
import numpy as np

from mlxterp.plugin import default_corpus

from .harness import Row, default_model

RANDOM_WIDTH = 2048
RANDOM_L0 = 16
BATCH_SIZE = 64
PROMPTS = {10: None, 64: 4096}  # prompt tokens -> max_feature_nodes (None: every active feature)


def bench_transcoders(model):
    """The transcoders of the rows (see the module doc) and how to say which they are."""
    import mlxterp_transcoders

    folder = os.environ.get("MLXTERP_BENCH_TRANSCODERS")
    if folder:
        return mlxterp_transcoders.load_transcoders(folder, model=model), f"transcoders {os.path.basename(folder.rstrip('/'))}"
    return random_clt(model), f"random CLT {RANDOM_WIDTH}/layer, L0 ~{RANDOM_L0}"


def random_clt(model, width: int = RANDOM_WIDTH, l0: int = RANDOM_L0, seed: int = 0):
    """A random cross-layer transcoder for ``model`` with about ``l0`` active features per
    layer and token on the default corpus (see the module doc)."""
    from mlxterp_circuits import prompt_ids
    from mlxterp_transcoders import Transcoders

    arch = model.architecture
    L, d = arch.n_layers, arch.d_model
    rng = np.random.default_rng(seed)
    ids = prompt_ids(model, " ".join(default_corpus()[:8]))[:128]
    with model.trace([ids], capture=[f"layers.{layer}.ln2" for layer in range(L)]) as tr:
        pass
    W_enc, b_enc, W_dec, b_dec = [], [], [], []
    for layer in range(L):
        x = np.array(tr.activations[f"layers.{layer}.ln2"][0, 1:].astype(mx.float32))
        W = rng.standard_normal((width, d)).astype(np.float32)
        pre = x @ W.T
        W /= pre.std(axis=0, keepdims=True).T + 1e-6  # unit spread per feature
        cut = np.quantile((x @ W.T).ravel(), 1 - l0 / width)  # about l0 of width fire
        W_enc.append(mx.array(W))
        b_enc.append(mx.full((width,), -float(cut)))
        W_dec.append(0.02 * mx.random.normal((width, L - layer, d), key=mx.random.key(seed * 1000 + layer)))
        b_dec.append(mx.zeros((d,)))
    return Transcoders("clt", list(range(L)), W_enc, b_enc, W_dec, b_dec, activation="relu", reads="ln2")


def graph_rows(repeats: int = 3) -> list[Row]:
    """Attribution graphs of a 10- and a 64-token prompt (median of ``repeats`` after a warm-up,
    capped at 3), wall time and peak MLX memory plus the graph's edge rows."""
    model = default_model()
    tc, which = bench_transcoders(model)
    text = " ".join(default_corpus()[20:40])
    from mlxterp_circuits import prompt_ids

    ids = prompt_ids(model, text)
    rows = []
    for n_tokens, cap in PROMPTS.items():
        prompt = ids[:n_tokens]
        times, peaks = [], []
        for round_ in range(1 + max(1, min(repeats, 3))):
            mx.clear_cache()
            mx.reset_peak_memory()
            start = time.perf_counter()
            graph = model.attribution_graph(prompt, tc, max_feature_nodes=cap, batch_size=BATCH_SIZE, progress=False)
            elapsed = time.perf_counter() - start
            if round_:
                times.append(elapsed)
                peaks.append(mx.get_peak_memory())
        seconds, peak = float(np.median(times)), max(peaks)
        edges = graph.rows.nbytes
        features = f"{graph.n_selected:,} of {len(graph.active_features):,} features" if cap else f"{graph.n_selected:,} features"
        figure = f"{seconds:.1f} s, peak {peak / 2**30:.2f} GiB (MLX) + {edges / 2**20:.0f} MiB of edges; {features}"
        settings = f"batch {BATCH_SIZE}" + (f", max_feature_nodes {cap}" if cap else "")
        rows.append(Row(f"attribution graph, {n_tokens} tokens ({which}; {settings})", figure, "-", None,
                        {"seconds": seconds, "peak_bytes": int(peak), "edge_bytes": int(edges), "n_active": len(graph.active_features),
                         "n_selected": graph.n_selected, "n_nodes": graph.n_nodes}))
    return rows
