"""Patching and attribution through SAE splices: an unedited splice (error term on) gives the
numbers of no splice; a lossy one (error term off) gives those of one spliced forward pass per
cell, including where the patch is at the SAE's own feature sub-site."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_family

from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp_analyses.patching import Cell, logit_difference, patch_sweep
from mlxterp_saes import SAE, SAEConfig

CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
ANSWERS = (11, 12)
SITE = "layers.1.output"
F = 96


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_family("llama"))


@pytest.fixture(scope="module")
def sae(model):
    """A random ReLU SAE at layers.1.output; random enough that without its error term the
    model's logits move a lot."""
    d = model.run([CLEAN], capture=[SITE]).activations[SITE].shape[-1]
    rng = np.random.default_rng(0)
    w = {"W_enc": rng.normal(0, 0.3, (d, F)), "W_dec": rng.normal(0, 0.3, (F, d)),
         "b_dec": rng.normal(0, 0.1, d), "b_enc": rng.normal(0, 0.1, F)}
    return SAE(SAEConfig("standard", d, F, site=SITE), {k: mx.array(v.astype(np.float32)) for k, v in w.items()})


def naive(model, sub, cells, score, saes):
    """One spliced forward pass per cell, patched through the public intervention API."""
    names = {c.layer: f"layers.{c.layer}.{sub}" for c in cells}
    clean = model.run([CLEAN], capture=list(names.values()), saes=saes).activations
    scores = []
    for cell in cells:
        at = {"positions": [cell.position]} if cell.position is not None else {}
        if cell.head is not None:
            at["heads"] = [cell.head]
        edit = iv.replace_with(clean[names[cell.layer]])
        logits = model.run([CORRUPTED], interventions={names[cell.layer]: edit.at(**at) if at else edit}, saes=saes).output
        scores.append(score(logits).item())
    return scores


def sources(model, sub, layers, saes):
    acts = model.run([CLEAN], capture=[f"layers.{i}.{sub}" for i in layers], saes=saes).activations
    return {i: acts[f"layers.{i}.{sub}"] for i in layers}


@pytest.mark.parametrize("component, kwargs", [
    ("mlp", {}), ("attn", {"positions": "all"}), ("resid", {"positions": "all"}),
    ("resid_pre", {}), ("attn", {"heads": True}),
])
def test_patching_through_an_unedited_splice_equals_no_splice(model, sae, component, kwargs):
    plain = model.activation_patching(CLEAN, CORRUPTED, component=component, answers=ANSWERS, progress=False, **kwargs)
    spliced = model.activation_patching(CLEAN, CORRUPTED, component=component, answers=ANSWERS, progress=False,
                                        saes=[sae], **kwargs)
    with model.saes(sae):
        attached = model.activation_patching(CLEAN, CORRUPTED, component=component, answers=ANSWERS, progress=False, **kwargs)
    assert spliced.clean_metric == plain.clean_metric and spliced.corrupted_metric == plain.corrupted_metric
    assert np.abs(np.array(spliced.recovery) - np.array(plain.recovery)).max() <= 1e-3  # percent
    assert attached.recovery == spliced.recovery
    assert model.attached_saes == ()


@pytest.mark.parametrize("sub", ["output", "input", "mlp", "attn", "attn.z_heads"])
def test_patching_through_a_lossy_splice_equals_one_spliced_pass_per_cell(model, sae, sub):
    """The sweep runs whole passes under a splice (re-entering blocks one by one would skip
    it); its numbers are the naive loop's, and not those of the model without the splice."""
    lossy = sae.with_error_term(False)
    score = logit_difference(*ANSWERS)
    arch = model.architecture
    if sub == "attn.z_heads":
        cells = [Cell(i, head=h) for i in (0, 2) for h in range(arch.n_heads)]
    else:
        cells = [Cell(i) for i in range(arch.n_layers)] + [Cell(i, position=p) for i in (0, 2) for p in range(len(CORRUPTED))]
    layers = sorted({c.layer for c in cells})
    with model.saes(lossy):
        swept = patch_sweep(model, CORRUPTED, sources(model, sub, layers, None), sub, cells, score, progress=False).tolist()
    want = naive(model, sub, cells, score, [lossy])
    assert swept == pytest.approx(want, abs=1e-4)
    unspliced = patch_sweep(model, CORRUPTED, sources(model, sub, layers, None), sub, cells, score, progress=False).tolist()
    assert max(abs(a - b) for a, b in zip(unspliced, want)) > 0.1  # the splice matters here


def test_activation_patching_with_saes_equals_the_naive_loop(model, sae):
    lossy = sae.with_error_term(False)
    result = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=ANSWERS,
                                       progress=False, saes=[lossy])
    score = logit_difference(*ANSWERS)
    cells = [Cell(i, position=p) for i in range(model.architecture.n_layers) for p in range(len(CORRUPTED))]
    want = naive(model, "output", cells, score, [lossy])
    fraction = [(w - result.corrupted_metric) / (result.clean_metric - result.corrupted_metric) * 100 for w in want]
    got = [v for row in result.recovery for v in row]
    assert got == pytest.approx(fraction, abs=1e-2)


def test_patching_at_the_feature_sub_site(model, sae):
    """Patching every feature of the SAE (error term on) is one spliced pass with the
    features replaced; patching the features and the error term together is patching the site."""
    sub = "output.sae.features"
    score = logit_difference(*ANSWERS)
    cells = [Cell(1)] + [Cell(1, position=p) for p in range(len(CORRUPTED))]
    with model.saes(sae):
        swept = patch_sweep(model, CORRUPTED, sources(model, sub, [1], None), sub, cells, score, progress=False).tolist()
    assert swept == pytest.approx(naive(model, sub, cells, score, [sae]), abs=1e-4)
    names = [f"{SITE}.sae.features", f"{SITE}.sae.error"]
    clean = model.run([CLEAN], capture=names, saes=[sae]).activations
    both = model.run([CORRUPTED], saes=[sae], interventions={n: iv.replace_with(clean[n]) for n in names}).output
    site = model.run([CORRUPTED], interventions={SITE: iv.replace_with(model.run([CLEAN], capture=[SITE]).activations[SITE])}).output
    assert score(both).item() == pytest.approx(score(site).item(), abs=1e-4)
    assert swept[0] != pytest.approx(score(site).item(), abs=1e-3)  # the error term carries the rest


def test_attribution_through_an_unedited_splice_equals_no_splice(model, sae):
    plain = model.attribution_patching(CLEAN, CORRUPTED, answers=ANSWERS)
    spliced = model.attribution_patching(CLEAN, CORRUPTED, answers=ANSWERS, saes=[sae])
    for component, values in plain.estimates.items():
        assert np.abs(np.array(spliced.estimates[component]) - np.array(values)).max() <= 1e-3, component


def test_attribution_through_a_lossy_splice_is_its_first_order_change(model, sae):
    """Each estimate is the metric's derivative along clean - corrupted through the splice:
    a central finite difference of spliced passes agrees, and the splice changes the estimate."""
    lossy = sae.with_error_term(False)
    result = model.attribution_patching(CLEAN, CORRUPTED, components=["resid"], answers=ANSWERS, saes=[lossy])
    plain = model.attribution_patching(CLEAN, CORRUPTED, components=["resid"], answers=ANSWERS)
    score = logit_difference(*ANSWERS)
    names = [f"layers.{i}.output" for i in (0, 2)]
    clean = model.run([CLEAN], capture=names, saes=[lossy]).activations
    corrupted = model.run([CORRUPTED], capture=names, saes=[lossy]).activations
    span = result.clean_metric - result.corrupted_metric
    step = 3e-3  # small enough for the float32 difference, not so small that rounding dominates
    for name, layer in zip(names, (0, 2)):
        for p in (2, 3, 7):
            delta = (clean[name] - corrupted[name]) * (mx.arange(len(CORRUPTED)) == p)[None, :, None]
            moved = [score(model.run([CORRUPTED], saes=[lossy], interventions={name: iv.add_vector(s * delta)}).output).item()
                     for s in (step, -step)]
            derivative = (moved[0] - moved[1]) / (2 * step)
            assert result["resid"][layer][p] == pytest.approx(derivative / span * 100, abs=0.05 + 1e-3 * abs(derivative / span * 100))
    assert np.abs(np.array(result.estimates["resid"][0]) - np.array(plain.estimates["resid"][0])).max() > 1.0


def test_sae_analyses_run_inside_a_block_that_attaches_the_same_sae(llama, sae):
    """``sae.attribution`` splices ``sae`` itself; inside ``with model.saes(sae)`` it is
    spliced once, with the same numbers (the tiny Llama with a tokenizer, width 64 too)."""
    outside = sae.attribution(llama, "The capital of France", answer=11, top=3)
    with llama.saes(sae):
        inside = sae.attribution(llama, "The capital of France", answer=11, top=3)
    assert inside.top_features == outside.top_features
    assert inside.total_effect == pytest.approx(outside.total_effect, abs=1e-6)


def test_generate_with_saes_equals_generate_inside_the_block(model, sae):
    lossy = sae.with_error_term(False)
    given = model.generate(CLEAN, max_tokens=5, saes=[lossy], stop_at_eos=False).tokens
    with model.saes(lossy):
        attached = model.generate(CLEAN, max_tokens=5, stop_at_eos=False).tokens
    assert given == attached
    assert model.generate(CLEAN, max_tokens=5, saes=[sae], stop_at_eos=False).tokens == \
        model.generate(CLEAN, max_tokens=5, stop_at_eos=False).tokens
