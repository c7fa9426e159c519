"""Repeated traces do not accumulate memory."""

from __future__ import annotations

import gc
import resource

import mlx.core as mx

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
