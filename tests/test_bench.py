"""The benchmark command runs (its numbers are read by people, not asserted by tests)."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_the_gpu_bench_measures_past_the_warm_up_and_reports_every_target(tmp_path):
    """``sae_gpu.throughput`` takes tokens/s from the difference of a short and a long run (no
    figure when noise makes the long one no slower); ``gpu_bench``'s summary puts each figure
    beside its target and reports a failed section; ``--smoke`` shrinks every size."""
    from mlxterp_tools import gpu_bench, sae_gpu

    seconds = {3: 1.0, 13: 3.0}
    found = sae_gpu.throughput(lambda n: seconds[n], warmup=3, steps=10, batch=100, rounds=2)
    assert found["tokens_per_s"] == pytest.approx(10 * 100 / 2.0) and found["step_ms"] == pytest.approx(200.0)
    seconds[13] = 0.9
    assert "tokens_per_s" not in sae_gpu.throughput(lambda n: seconds[n], 3, 10, 100, 1)
    args = gpu_bench.parse(["--smoke", "--out", str(tmp_path)])
    assert args.d_sae <= 512 and args.steps <= 3 and args.trace_batches == [1, 2]
    report = {"sections": {
        "sae": {"job": {"gaussian": {"mlxterp": {"tokens_per_s": 2.0}, "vs_best_saelens": 1.5, "met": True}},
                "live": {"one_sae_vs_plain": 0.4, "met": False}},
        "cache": {"all_layers": {"ratio": 0.9, "target": 0.85, "met": True, "speedup over nnsight": 3.0}},
        "trace": {"error": "RuntimeError: no GPU"},
    }}
    lines = gpu_bench.summary(report)
    assert any("1.50x the faster SAELens | >= 1.0x | met" in line for line in lines)
    assert any("0.40x the plain forward | >= 0.5x | NOT met" in line for line in lines)
    assert any("speedup over nnsight: 3.00x | >= 1x | met" in line for line in lines)
    assert "trace: FAILED (RuntimeError: no GPU)" in lines


def test_the_gpu_bench_writes_the_sae_section_after_each_part(tmp_path, monkeypatch):
    """A device call may cut the SAE section short: its document is written out (marked partial)
    after each job and after the live model, before the section ends."""
    from mlxterp_tools import gpu_bench, sae_gpu

    written = []

    def fake(name):
        def measure(*args, **kwargs):
            on_disk = json.loads((tmp_path / "gpu_bench.json").read_text()) if (tmp_path / "gpu_bench.json").exists() else {}
            written.append((name, on_disk.get("sections", {}).get("sae", {})))
            return {"tokens_per_s": 1.0, "step_ms": 1.0}
        return measure

    monkeypatch.setattr(sae_gpu, "live_model", lambda smoke=False: None)
    monkeypatch.setattr(sae_gpu, "mlxterp_job", fake("mlxterp"))
    monkeypatch.setattr(sae_gpu, "saelens_job", lambda args, kind, tf32: {"skipped": "not here"})
    monkeypatch.setattr(sae_gpu, "live_job", fake("live"))
    monkeypatch.setattr(sae_gpu, "parts", fake("parts"))
    gpu_bench.main(["--smoke", "--sections", "sae", "--out", str(tmp_path)])
    seen = {name: sorted(section.get("job", {})) for name, section in written}
    assert seen["live"] == ["gaussian", "lowrank"] and written[1][1]["partial"]  # both jobs were on disk first
    assert "live" in written[-1][1] and written[-1][1]["partial"]  # and the live model before the parts ran
    final = json.loads((tmp_path / "gpu_bench.json").read_text())["sections"]["sae"]
    assert "partial" not in final and set(final["job"]) == {"gaussian", "lowrank"} and "parts_ms" in final


def test_the_bench_prints_each_row_as_it_comes_into_a_pipe():
    """A long benchmark redirected to a log shows each row when it is measured, not all at the end."""
    script = """
import sys
import mlxterp
from mlxterp import hookimpl
from mlxterp_core.cli import main
from mlxterp_tools.harness import Row

class Rows:
    @hookimpl
    def mlxterp_bench_rows(self):
        return {"W9": lambda repeats: [Row("W9 buffered by lines", str(sys.stdout.line_buffering), "-", None)]}

mlxterp.register_plugin(Rows(), name="rows")
sys.exit(main(["bench", "--rows", "W9", "--repeats", "1"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert next(line for line in done.stdout.splitlines() if line.startswith("W9 buffered by lines")).split()[4] == "True"
