"""Repeated traces do not accumulate memory."""

from __future__ import annotations

import gc
import resource

import mlx.core as mx
import pytest
from helpers import CORPUS, random_transcoders

import mlxterp
from mlxterp import interventions as iv
from mlxterp_core.trace import active_traces

N_TRACES = 1000
# Bounds: MLX memory in use must come back to within 64 KiB of where it started (it holds no
# arrays for finished traces), and the process may grow by at most 32 MiB over 1,000 traces
# (allocator caches and Python's own arenas, not a per-trace leak: a leak of one captured
# activation set per trace would be 1,000 x ~130 KiB = 130 MiB here).
MLX_BOUND = 64 * 1024
RSS_BOUND = 32 * 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_thousand_traces_do_not_grow_memory(llama):
    ids = [[3, 17, 42, 8, 99, 5, 61, 12]]
    interventions = {"model.model.layers.1.mlp": iv.scale(0.5)}

    def one_trace():
        with llama.trace(ids, interventions=interventions) as tr:
            assert tr.activations["model.model.layers.3"].shape == (1, 8, 64)

    for _ in range(20):  # warm up allocator caches and class caches
        one_trace()
    gc.collect()
    mx.clear_cache()
    mlx_before, rss_before = mx.get_active_memory(), _rss_bytes()
    for _ in range(N_TRACES):
        one_trace()
    gc.collect()
    mx.clear_cache()
    mlx_growth = mx.get_active_memory() - mlx_before
    rss_growth = _rss_bytes() - rss_before
    print(f"after {N_TRACES} traces: MLX active memory {mlx_growth:+d} B, RSS {rss_growth / 2**20:+.1f} MiB")
    assert mlx_growth <= MLX_BOUND
    assert rss_growth <= RSS_BOUND
    assert active_traces(llama) == []


WORK = {  # each trains a little on the tiny model, or builds a graph, and returns what it made
    "sae": lambda m: mlxterp.train_sae(m, "layers[1].output", CORPUS * 4, k=4, d_sae=64, n_tokens=256, batch_size=64, progress=False),
    "plt": lambda m: mlxterp.train_transcoders(m, CORPUS * 4, kind="plt", d_features=32, k=4, n_tokens=256,
                                               batch_size=64, progress=False),
    "clt": lambda m: mlxterp.train_transcoders(m, CORPUS * 4, kind="clt", d_features=32, k=4, n_tokens=256,
                                               batch_size=64, progress=False),
    "tuned lens": lambda m: m.train_tuned_lens(CORPUS, num_steps=2, tokens_per_step=32, context_size=16, progress=False),
    "probe": lambda m: m.probe(texts=CORPUS, labels=[0, 1] * 3, test_fraction=0.5),
    "attribution graph": lambda m: m.attribution_graph([[1, 5, 9, 13, 22, 40]], random_transcoders(m, "clt"),
                                                       progress=False),
}


@pytest.mark.parametrize("work", WORK)
def test_training_and_graphs_hold_no_memory_once_their_result_is_dropped(llama, work):
    """Training state (parameters, Adam moments, buffers) and a graph's forward passes go when
    the result goes, without waiting for Python's cyclic GC: reference cycles kept all of a CLT's
    state after training, and every frozen pass's records in a graph, until the collector ran."""
    WORK[work](llama)  # warm-up: compiled kernels and class caches
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    gc.disable()
    try:
        result = WORK[work](llama)
        assert mx.get_peak_memory() > before  # training used MLX memory: the check below can fail
        del result
        held = mx.get_active_memory() - before
    finally:
        gc.enable()
    assert held <= MLX_BOUND, f"{work}: {held} bytes of MLX memory still held after the result was dropped"
