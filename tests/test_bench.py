"""The benchmark command runs (its numbers are read by people, not asserted by tests)."""

from __future__ import annotations

import json

import pytest

from mlxterp_tools import bench
from mlxterp_tools.forward_rows import trace_overhead, trace_python_cost
from mlxterp_tools.harness import Row, run_rows, write_json


def test_trace_overhead_runs_on_a_small_shape():
    medians = trace_overhead(repeats=1, tokens=4, num_hidden_layers=2, vocab_size=64)
    assert list(medians) == ["plain", "capture nothing", "residual stream", "everything"]
    assert all(seconds > 0 for seconds in medians.values())


def test_rows_print_each_figure_beside_its_target_and_write_the_same_json(monkeypatch, tmp_path):
    def fake(repeats):
        return [Row("W9 fake", f"{repeats} ms", "<= 2 ms", repeats <= 2, {"s": repeats / 1000})]

    monkeypatch.setitem(bench.ROWS, "W9", fake)
    printed = []
    rows = run_rows(bench.all_rows(), ["W9"], repeats=3, out=printed.append)
    line = next(p for p in printed if p.startswith("W9 fake"))
    assert "3 ms" in line and "<= 2 ms" in line and line.endswith("NO")
    write_json(rows, tmp_path / "bench.json")
    document = json.loads((tmp_path / "bench.json").read_text())
    assert document["rows"] == [
        {"workload": "W9 fake", "figure": "3 ms", "target": "<= 2 ms", "met": False, "values": {"s": 0.003}}
    ]


def test_unknown_rows_are_a_clear_error(capsys):
    from mlxterp_core.cli import main

    assert main(["bench", "--rows", "W0"]) == 2
    assert "unknown benchmark rows ['W0']" in capsys.readouterr().err


def test_trace_python_cost_runs_and_gives_mx_eval_back():
    import mlx.core as mx

    evaluate = mx.eval
    costs = trace_python_cost(repeats=3, layers=2)
    assert mx.eval is evaluate
    assert list(costs) == ["plain", "capture nothing", "residual stream, raw names", "residual stream, standard", "everything"]
    assert costs["plain"] > 0


def test_a_plugins_rows_join_the_table_after_the_tools_own(capsys):
    import mlxterp
    from mlxterp import hookimpl
    from mlxterp_core.cli import main

    class Rows:
        @hookimpl
        def mlxterp_bench_rows(self):
            return {"W9": lambda repeats: [Row("W9 from a plugin", f"{repeats} ms", "<= 2 ms", repeats <= 2)]}

    mlxterp.register_plugin(Rows(), name="rows")
    try:
        assert list(bench.all_rows()) == [*bench.ROWS, "W9"]
        assert main(["bench", "--rows", "W9", "--repeats", "1"]) == 0
        line = next(p for p in capsys.readouterr().out.splitlines() if p.startswith("W9 from a plugin"))
        assert line.endswith("yes")
    finally:
        mlxterp.load_plugins([])


def test_the_graph_rows_random_transcoder_fires_about_l0_features(wrapped_tokenizer):
    """The stand-in CLT of ``mlxterp bench --rows graphs`` does the work of a trained one of its
    width and L0: about ``l0`` features per layer and token fire on text."""
    from helpers import tiny_llama
    from mlxterp_circuits.replacement import Replacement, prompt_ids
    from mlxterp_tools.graph_rows import random_clt

    from mlxterp import InterpretableModel, default_corpus

    model = InterpretableModel(tiny_llama(num_hidden_layers=3), tokenizer=wrapped_tokenizer)
    tc = random_clt(model, width=256, l0=8)
    ids = prompt_ids(model, " ".join(default_corpus()[50:60]))[:40]
    active = len(Replacement(model, tc, ids).active) / (3 * (len(ids) - 1))
    assert tc.kind == "clt" and 4 <= active <= 16, active
