"""mlxterp's tools: the ``mlxterp`` commands ``bench``, ``info``, ``demo`` and ``cache``, the
benchmark harness and every row of ``mlxterp bench``, and the longer benchmarks, run as
``python -m mlxterp_tools.<script>`` (``gpu_trace``, ``cache_gpu``, ``distributed_gpu``,
``sae_training``, ``transcoder_training``, ``snapshot_cost``, ``trace_before_after``).

A plugin like any other: it adds its commands through the ``mlxterp_commands`` hook and uses
only ``mlxterp.plugin`` and other plugins' public names. Another plugin adds rows to
``mlxterp bench`` with the ``mlxterp_bench_rows`` hook, returning functions that make
:class:`Row` objects.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .harness import SMOLLM2_135M_SHAPE, Row, default_model, median_times, random_llama, run_rows, write_json


@hookimpl
def mlxterp_commands(subparsers):
    from .commands import register

    register(subparsers)


__all__ = ["Row", "SMOLLM2_135M_SHAPE", "default_model", "median_times", "random_llama", "run_rows", "write_json"]
