"""``mlxterp bench``: one table of workloads, each figure beside its target.

A row is a function ``(repeats) -> list[Row]`` listed in :data:`ROWS` under a short key
(``W1``, ``W2``, ...); ``mlxterp bench`` runs them in order (``--rows W1 W3`` picks some) and
prints one line per result, ``--json PATH`` writes the same rows as JSON. To add a workload,
write a row function and add one line to ``ROWS`` (another plugin: the ``mlxterp_bench_rows``
hook). :mod:`mlxterp_tools.harness` measures and prints.

Peers (HF transformers on torch, nnsight) are measured side by side when they are installed and
never needed: a missing peer leaves its figure out and says so.

Rows:

- ``W1``: the default model as ``mlxterp.load()`` prepares it, plain forward of 1 x 32 and
  8 x 32 tokens, against HF transformers on torch's CPU backend (2 threads, the same float32
  weights) where torch is installed and MLX runs on the CPU.
- ``W2``: traces of the default model (1 x 32 tokens) recording the residual stream (30 layer
  outputs) and everything, as ratios to the plain forward of the same run.
- ``W3``-``W5``: the logit lens, an activation patching sweep and steered generation
  (:mod:`mlxterp_tools.analysis_rows`).
- ``trace-python``: the Python a trace adds to the forward, per trace (probing, recording,
  name resolution), on a tiny random Llama whose graph is built but never evaluated
  (:func:`~mlxterp_tools.forward_rows.trace_python_cost`): on a GPU that time adds to the
  plain forward's, so it is what decides W2's ratios there.
- ``load``: the default model's forward as shipped (quantized, MLX's own BLAS; in a
  subprocess, because the BLAS is chosen per process) against ``mlxterp.load()``'s.
- ``attribution``: attribution patching of every component against the activation patching
  sweeps that measure the same cells.
- ``probe``: the linear-probe sweep of docs/guide/probes.md against its forward passes.
- ``cache``: ``cache_activations`` of the default model over the default corpus, tokens/s
  against the plain forward of the same windows: all 30 layer outputs (target >= 0.85x) and
  one site, against the forward cut at the last layer it needs (target: cost <= 1.05x).
- ``saes``: training TopK SAEs from text (:mod:`mlxterp_tools.sae_rows`), one and four from one
  forward, in tokens/s beside the plain forward.
- ``transcoders``: training a TopK PLT set and a TopK CLT on all 30 layers from text
  (:mod:`mlxterp_tools.transcoder_rows`), in tokens/s beside the plain forward.
- ``sharded``: a model sharded over 2 ring ranks of this machine (:mod:`mlxterp_tools.sharded_rows`),
  tensor and pipeline parallel: the forward against the unsharded model run by both ranks at once,
  a residual-stream trace (target <= 1.1x the sharded forward) and many gathered sites (one
  collective a pass for all of them).

Run it on an otherwise idle machine: on 2 cores another busy process changes timings 10x.

Workloads that need several processes or a GPU with its peers are scripts of this package:
``python -m mlxterp_tools.gpu_bench --out DIR`` (all of the GPU comparison of issue 26 in one
command: SAE training against SAELens, traces, caching, patching and the logit lens against
nnsight), ``python -m mlxterp_tools.gpu_trace`` (traces against plain MLX, torch and nnsight on one GPU),
``mlxterp_tools.sae_gpu`` (SAE training against SAELens and from a live model),
``mlxterp_tools.cache_gpu`` (caching on one GPU), ``mlxterp_tools.sae_training`` (the longer SAE
run), ``mlxterp_tools.transcoder_training`` (PLTs against a CLT on every layer) and ``mlxterp_tools.distributed_gpu`` (the cache and the patching sweep on 1 and N ranks,
e.g. two GPUs over NCCL: ``python -m mlxterp_tools.distributed_gpu --ranks 2 --backend nccl
--out DIR``); see docs/performance.md for their figures.
"""

from __future__ import annotations

from collections.abc import Callable

from mlxterp.plugin import bench_rows

from .analysis_rows import attribution_rows, probe_rows, w3_logit_lens, w4_patching, w5_steering
from .cache_rows import cache_rows
from .forward_rows import load_rows, trace_python_rows, w1_forward, w2_traces
from .graph_rows import graph_rows
from .harness import Row, line_by_line, run_rows, write_json
from .sae_rows import sae_rows
from .sharded_rows import sharded_rows
from .transcoder_rows import transcoder_rows

ROWS: dict[str, Callable[[int], list[Row]]] = {
    "W1": w1_forward,
    "W2": w2_traces,
    "W3": w3_logit_lens,
    "W4": w4_patching,
    "W5": w5_steering,
    "trace-python": trace_python_rows,
    "load": load_rows,
    "attribution": attribution_rows,
    "probe": probe_rows,
    "cache": cache_rows,
    "saes": sae_rows,
    "transcoders": transcoder_rows,
    "graphs": graph_rows,
    "sharded": sharded_rows,
}
"""The rows of ``mlxterp bench``, in the order it prints them (other plugins add theirs: the
``mlxterp_bench_rows`` hook; :func:`all_rows` has both)."""


def all_rows() -> dict[str, Callable[[int], list[Row]]]:
    """This package's rows, then every other plugin's."""
    return {**ROWS, **bench_rows()}


def main(rows: list[str] | None = None, repeats: int = 5, json_path=None) -> list[Row]:
    """Run the chosen rows (all by default), print them, and write them to ``json_path``."""
    line_by_line()
    results = run_rows(all_rows(), rows, repeats)
    if json_path is not None:
        write_json(results, json_path)
    return results
