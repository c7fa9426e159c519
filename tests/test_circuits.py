"""Attribution patching, residual decomposition, direct logit attribution and head views, each
checked against an independent computation on tiny models of several families and the real one."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import family_names, tiny_family

from mlxterp import InterpretableModel, interventions as iv
from mlxterp_analyses import AttentionPatterns, AttributionResult, DLAResult, ResidComponents
from mlxterp_analyses.decomposition import frozen_norm
from mlxterp_analyses.patching import logit_difference

CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
ANSWERS = (11, 12)
SITES = {"resid": "output", "attn": "attn", "mlp": "mlp", "heads": "attn.z_heads"}


def _model(family: str, quantized: bool = False) -> InterpretableModel:
    module = tiny_family(family)
    if quantized:
        nn.quantize(module, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    return InterpretableModel(module)


@pytest.mark.parametrize("family,quantized", [("llama", False), ("gemma2", False), ("phi3", False), ("llama", True)])
def test_attribution_matches_finite_differences(family, quantized):
    """The estimate is the derivative of the metric along (clean - corrupted): a central
    finite difference with a small step along that direction, cell by cell, agrees."""
    model = _model(family, quantized)
    result = model.attribution_patching(CLEAN, CORRUPTED, answers=ANSWERS)
    score = logit_difference(*ANSWERS)
    scale = (result.clean_metric - result.corrupted_metric) / 100
    step = 1e-2
    for component, sub in SITES.items():
        for layer in (0, 2):
            name = f"layers.{layer}.{sub}"
            delta = (model.run([CLEAN], capture=[name]).activations[name]
                     - model.run([CORRUPTED], capture=[name]).activations[name])
            for cell in (1, 3) if component == "heads" else (2, 3, 7):
                def shifted(sign, cell=cell):
                    edit = iv.add_vector(sign * step * delta)
                    edit = edit.at(heads=[cell]) if component == "heads" else edit.at(positions=[cell])
                    return score(model.run([CORRUPTED], interventions={name: edit}).output).item()

                derivative = (shifted(1) - shifted(-1)) / (2 * step) / scale
                estimate = result.estimates[component][layer][cell]
                assert estimate == pytest.approx(derivative, rel=2e-2, abs=0.05), (component, layer, cell)


def test_attribution_result_views_and_plots(tmp_path):
    model = _model("llama")
    result = model.attribution_patching(CLEAN, CORRUPTED, answers=ANSWERS, components=["resid", "heads"])
    assert result.keys() == ["resid", "heads"]
    assert result["resid"].axis == "position" and len(result["resid"][0]) == len(CORRUPTED)
    assert result["heads"].axis == "head" and len(result["heads"][0]) == model.architecture.n_heads
    assert AttributionResult.load(result.save(tmp_path / "a.json")) == result
    result.plot("heads", tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 10_000


@pytest.mark.parametrize("family", family_names())
def test_decomposition_sums_to_the_residual_and_dla_to_the_logit_difference(family):
    model = _model(family)
    n = model.architecture.n_layers
    for heads in (False, True):
        parts = model.decompose_resid(CLEAN, heads=heads)
        resid = model.run([CLEAN], capture=[f"layers.{n - 1}.output"]).activations[f"layers.{n - 1}.output"][0]
        assert mx.allclose(parts.sum(), resid, rtol=1e-4, atol=1e-4).item()
    middle = model.decompose_resid(CLEAN, layer=1)
    assert middle.labels == ["embed", "L0 attn", "L0 mlp"]
    layer1 = model.run([CLEAN], capture=["layers.1.input"]).activations["layers.1.input"][0]
    assert mx.allclose(middle.sum(), layer1, rtol=1e-4, atol=1e-4).item()
    dla = model.direct_logit_attribution(CLEAN, answers=ANSWERS, position=5)
    arch = model.architecture
    final = model.run([CLEAN], capture=["ln_final"]).activations["ln_final"][0, 5]
    logits = arch.unembed(final, softcap=False).astype(mx.float32)  # before any soft-capping
    assert sum(dla.values) == pytest.approx((logits[ANSWERS[0]] - logits[ANSWERS[1]]).item(), rel=1e-3, abs=1e-4)
    assert dla.logit_diff == pytest.approx((logits[ANSWERS[0]] - logits[ANSWERS[1]]).item(), rel=1e-4, abs=1e-5)
    assert len(dla.head_matrix()) == n


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "cohere"])
def test_frozen_norm_is_the_norm_at_the_point(family):
    """RMS norms (Gemma's 1 + w included) and LayerNorms: the linearisation reproduces the norm
    at the actual residual stream, and is linear."""
    model = _model(family)
    arch = model.architecture
    x = model.run([CLEAN], capture=[f"layers.{arch.n_layers - 1}.output"]).activations[f"layers.{arch.n_layers - 1}.output"][0]
    apply, bias = frozen_norm(arch.final_norm, x)
    assert mx.allclose(apply(x) + bias, arch.final_norm(x), rtol=1e-4, atol=1e-5).item()
    a, b = mx.random.normal(x.shape), mx.random.normal(x.shape)
    assert mx.allclose(apply(a + 2 * b), apply(a) + 2 * apply(b), rtol=1e-4, atol=1e-4).item()


def test_accumulated_resid_and_attention_patterns(tmp_path):
    model = _model("llama")
    acc = model.accumulated_resid(CLEAN)
    acts = model.run([CLEAN], capture=["embed", "layers.2.output"]).activations
    assert acc.labels == ["embed", "after L0", "after L1", "after L2"]
    assert mx.allclose(acc["embed"], acts["embed"][0]).item()
    assert mx.allclose(acc["after L2"], acts["layers.2.output"][0]).item()
    patterns = model.attention_patterns(CLEAN, layer=1)
    assert len(patterns.heads) == 4 and len(patterns[2]) == len(CLEAN)
    assert all(abs(sum(row) - 1) < 1e-5 for row in patterns[2])
    for result, cls in ((acc, ResidComponents), (patterns, AttentionPatterns)):
        assert cls.load(result.save(tmp_path / f"{cls.__name__}.json")) == result
        result.plot(tmp_path / f"{cls.__name__}.png")
        assert (tmp_path / f"{cls.__name__}.png").stat().st_size > 10_000


def test_dla_result_views(tmp_path):
    model = _model("llama")
    dla = model.direct_logit_attribution(CLEAN, answers=ANSWERS)
    assert DLAResult.load(dla.save(tmp_path / "d.json")) == dla
    assert dla.top_heads(3)[0][0].startswith("L")
    assert "direct logit attribution" in dla.table()
    dla.plot(tmp_path / "dla.png")
    assert (tmp_path / "dla.png").stat().st_size > 10_000


def test_on_the_real_model(smollm):
    """Observed on SmolLM2-135M, Eiffel Tower vs Colosseum: attribution and activation patching
    agree on the attention heads (Pearson ~0.87) and attention outputs (~0.83), less on the
    residual stream (~0.59), and not on MLPs (~-0.37: layer 0's MLP, the largest real effect,
    is far from linear). DLA of ' Paris' - ' London' names head L23H4, the top head of
    activation patching too."""
    clean, corrupted = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    attribution = smollm.attribution_patching(clean, corrupted, components=["heads", "attn"])
    patched = smollm.activation_patching(clean, corrupted, component="attn", heads=True)
    assert attribution["heads"].top(1)[0][:2] == patched.top(1)[0][:2] == (23, 4)
    dla = smollm.direct_logit_attribution("The capital of France is", answers=(" Paris", " London"))
    assert sum(dla.values) == pytest.approx(dla.logit_diff, rel=1e-3)
    assert dla.top_heads(1)[0][0] == "L23H4"
