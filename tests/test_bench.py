"""The benchmark command runs (its numbers are read by people, not asserted by tests)."""

from __future__ import annotations

from mlxterp_core.bench import trace_overhead


def test_trace_overhead_runs_on_a_small_shape():
    medians = trace_overhead(repeats=1, tokens=4, num_hidden_layers=2, vocab_size=64)
    assert list(medians) == ["plain", "capture nothing", "residual stream", "everything"]
    assert all(seconds > 0 for seconds in medians.values())
