"""mlxterp's vectorised SiLU for MLX's CPU backend: within float tolerance of mlx-lm's forward,
faster on the CPU, invisible to traces (every invariant still holds), and removable."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_family, tiny_llama
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlxterp import InterpretableModel
from mlxterp_core import cpu_kernels
from mlxterp_core.backend import on_cpu
from mlxterp_core.invariants import check_all

SWIGLU_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "granite"]


def test_silu_is_exact_to_float_tolerance_over_the_whole_range():
    g = np.concatenate([np.linspace(-120, 120, 240_001), np.random.default_rng(0).normal(0, 6, 100_000)])
    g = g.astype(np.float32)
    x = np.random.default_rng(1).normal(0, 2, g.shape).astype(np.float32)
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * x
    ours = np.array(cpu_kernels.swiglu(mx.array(g), mx.array(x)), dtype=np.float64)
    assert np.all(np.abs(ours - exact) <= 2e-7 * (1 + np.abs(g)) * np.abs(x) + 1e-30)
    assert np.isnan(np.array(cpu_kernels.swiglu(mx.array([np.nan]), mx.array([1.0])))).all()


def test_other_dtypes_use_mlx_lm_swiglu_unchanged():
    g = mx.random.normal((4, 8)).astype(mx.bfloat16)
    assert mx.array_equal(cpu_kernels.swiglu(g, g), mlx_lm_swiglu(g, g)).item()


@pytest.mark.skipif(not on_cpu(), reason="the vectorised SiLU is for MLX's CPU backend")
def test_silu_is_faster_than_mlx_lm_on_the_cpu():
    g, x = mx.random.normal((256, 1536)), mx.random.normal((256, 1536))
    mx.eval(g, x)

    def cpu_seconds(f):  # process time: other processes on the machine do not count
        mx.eval(f(g, x))
        start = time.process_time()
        for _ in range(10):
            mx.eval(f(g, x))
        return time.process_time() - start

    ours = min(cpu_seconds(cpu_kernels.swiglu) for _ in range(3))
    theirs = min(cpu_seconds(mlx_lm_swiglu) for _ in range(3))
    assert ours < 0.6 * theirs, (ours, theirs)


@pytest.mark.parametrize("family", SWIGLU_FAMILIES)
def test_forward_within_float_tolerance_and_traces_keep_every_invariant(family):
    module = tiny_family(family)
    ids = mx.array([[1, 5, 9, 13, 2, 7, 11, 3]])
    reference = module(ids)
    assert cpu_kernels.install(module).startswith("vectorised SiLU in")
    fast = module(ids)
    scale = float(mx.abs(reference).max())
    assert float(mx.abs(fast - reference).max()) <= 1e-5 * scale
    model = InterpretableModel(module)
    failed = [c for c in check_all(model, [1, 5, 9, 13, 2, 7]) if c.passed is False]
    assert not failed, failed
    cpu_kernels.uninstall(module)
    assert mx.array_equal(module(ids), reference).item()


def test_the_swap_changes_no_parameter_and_keeps_isinstance():
    from mlx_lm.models.llama import MLP

    module = tiny_llama()
    before = dict(module.parameters())
    cpu_kernels.install(module)
    mlp = module.model.layers[0].mlp
    assert isinstance(mlp, MLP) and type(mlp) is not MLP
    assert dict(module.parameters()).keys() == before.keys()
    assert cpu_kernels.install(module).startswith("MLX's own")  # idempotent: nothing left to swap


def test_load_reports_the_kernels_and_matches_mlx_lm_on_the_real_model(smollm):
    module = smollm.model
    ids = mx.array([smollm.encode("The Eiffel Tower is located in the city of")])
    if "vectorised" not in smollm.load_report["kernels"]:
        pytest.skip(f"not in use on this backend: {smollm.load_report['kernels']}")
    fast = module(ids)
    cpu_kernels.uninstall(module)
    try:
        reference = module(ids)
    finally:
        cpu_kernels.install(module)
    assert float(mx.abs(fast - reference).max()) <= 1e-5 * float(mx.abs(reference).max())
    assert mx.array_equal(fast.argmax(-1), reference.argmax(-1)).item()
