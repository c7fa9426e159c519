"""mlxterp's vectorised SiLU for MLX's CPU backend: within float tolerance of mlx-lm's forward,
faster on the CPU, invisible to traces (every invariant still holds), and removable."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import family_names, is_top_k, tiny_family, tiny_llama
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


def test_exp_and_softmax_are_exact_to_float_rounding():
    x = np.concatenate([np.linspace(-100, 90, 400_001), np.random.default_rng(0).normal(0, 20, 100_000)])
    x = x.astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    ours = np.array(cpu_kernels._exp_shifted(mx.array(x), mx.array(0.0)), dtype=np.float64)
    normal = (x >= -87.3) & (x <= 88.3)  # the domain where it is exact (a softmax's: <= 0)
    assert np.max(np.abs(ours[normal] - exact[normal]) / exact[normal]) < 2e-7  # MLX's own exp: ~2e-6
    assert np.all(ours[x < -87.3] == 0) and np.all(np.isinf(ours[x > 88.3]))
    special = np.array(cpu_kernels._exp_shifted(mx.array([-np.inf, np.inf, np.nan]), mx.array(0.0)))
    assert special[0] == 0 and special[1] == np.inf and np.isnan(special[2])

    scores = mx.array(np.random.default_rng(2).normal(0, 8, (4, 3, 7, 50)).astype(np.float32))
    scores = mx.where(mx.arange(50) < 40, scores, mx.finfo(mx.float32).min)  # masked columns
    exact = np.array(scores, dtype=np.float64)
    exact = np.exp(exact - exact.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    ours = np.max(np.abs(np.array(cpu_kernels.softmax(scores)) - exact))
    theirs = np.max(np.abs(np.array(mx.softmax(scores, axis=-1, precise=True)) - exact))
    assert ours < 1e-6 and ours <= theirs + 1e-7, (ours, theirs)  # float32 rounding of scores - max
    assert np.all(np.array(cpu_kernels.softmax(scores))[..., 40:] == 0)

    cotangent = mx.array(np.random.default_rng(3).normal(size=scores.shape).astype(np.float32))
    ours = mx.grad(lambda s: (cpu_kernels.softmax(s) * cotangent).sum())(scores)
    theirs = mx.grad(lambda s: (mx.softmax(s, axis=-1, precise=True) * cotangent).sum())(scores)
    assert float(mx.abs(ours - theirs).max()) < 1e-6


@pytest.mark.parametrize("heads, kv_heads, length, span, mask", [
    (4, 4, 9, 9, "causal"), (6, 2, 9, 9, "causal"), (6, 3, 1, 12, None), (4, 2, 5, 12, "causal"),
    (4, 1, 5, 12, "bool"), (4, 2, 5, 12, "additive"), (4, 2, 5, 12, "bool-per-head"),
])
def test_attention_matches_mlx_fast_sdpa(heads, kv_heads, length, span, mask):
    rng = np.random.default_rng(heads * 100 + span)
    q, k, v = (mx.array(rng.normal(0, 1.5, (2, h, n, 16)).astype(np.float32))
               for h, n in ((heads, length), (kv_heads, span), (kv_heads, span)))
    if mask == "bool":
        mask = mx.array(rng.random((length, span)) > 0.3) | (mx.arange(span) == 0)
    elif mask == "bool-per-head":
        mask = mx.array(rng.random((2, heads, length, span)) > 0.3) | (mx.arange(span) == 0)
    elif mask == "additive":
        mask = mx.array(rng.normal(0, 2, (length, span)).astype(np.float32))
    ours = cpu_kernels.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask=mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert ours.shape == theirs.shape
    assert float(mx.abs(ours - theirs).max()) < 1e-5
    grads = [mx.grad(lambda q: (f(q, k, v, scale=0.25, mask=mask) ** 2).sum())(q) for f in (
        lambda *a, **kw: cpu_kernels.scaled_dot_product_attention(*a, None, **kw),
        mx.fast.scaled_dot_product_attention)]
    assert float(mx.abs(grads[0] - grads[1]).max()) < 1e-4


def test_attention_defers_to_mlx_lm_for_quantized_caches_sinks_and_other_dtypes():
    from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_sdpa

    q = mx.random.normal((1, 4, 3, 16)).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, 3, 16)).astype(mx.bfloat16)
    ours = cpu_kernels.scaled_dot_product_attention(q, k, k, None, scale=0.25, mask="causal")
    assert mx.array_equal(ours, mlx_lm_sdpa(q, k, k, None, scale=0.25, mask="causal")).item()
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    sinks = mx.zeros((4,))
    ours = cpu_kernels.scaled_dot_product_attention(q, k, k, None, scale=0.25, mask="causal", sinks=sinks)
    assert mx.array_equal(ours, mlx_lm_sdpa(q, k, k, None, scale=0.25, mask="causal", sinks=sinks)).item()


@pytest.mark.parametrize("family", family_names())
def test_forward_within_float_tolerance_and_traces_keep_every_invariant(family):
    module = tiny_family(family)
    ids = mx.array([[1, 5, 9, 13, 2, 7, 11, 3]])
    reference = module(ids)
    report = cpu_kernels.install(module)
    if family in SWIGLU_FAMILIES:
        assert report.startswith("vectorised SiLU in"), report
    if report.startswith("MLX's own"):
        pytest.skip(f"{family}: {report}")
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
    for position, token in enumerate(fast[0].argmax(-1).tolist()):  # the same prediction, up to a near-tie
        assert is_top_k([token], reference[0, position])


@pytest.mark.parametrize("dims, head_dim, offset, scale", [(16, 16, 0, 1.0), (16, 16, 37, 1.0), (8, 16, 5, 0.5)])
def test_rope_matches_mlx_fast_rope(dims, head_dim, offset, scale):
    x = mx.array(np.random.default_rng(dims + offset).normal(0, 2, (2, 3, 7, head_dim)).astype(np.float32))
    holder = nn.Module()
    holder.rope = nn.RoPE(dims, base=10000.0, scale=scale)
    theirs = holder.rope(x, offset=offset)
    assert "RoPE angles from a table in 1 modules" in cpu_kernels.install(holder)
    assert type(holder.rope) is not nn.RoPE and isinstance(holder.rope, nn.RoPE)
    ours = holder.rope(x, offset=offset)
    assert float(mx.abs(ours - theirs).max()) < 1e-5 * float(mx.abs(theirs).max())
    assert mx.array_equal(ours[..., dims:], x[..., dims:]).item()  # partial rotation: the rest as it was
    assert mx.array_equal(holder.rope(x, offset=mx.array(offset)), theirs).item()  # array offsets: MLX's
    cpu_kernels.uninstall(holder)
    assert type(holder.rope) is nn.RoPE
