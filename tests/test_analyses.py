"""The analyses on tiny models of several families: each against an independent computation."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import bitwise_equal, is_top_k, tiny_family

from mlxterp import InterpretableModel, interventions as iv
from mlxterp_analyses import LogitLensResult, PatchingResult, SteeringVector
from mlxterp_analyses.patching import Cell, PatchingError, logit_difference, patch_sweep

FAMILIES = ["llama", "gemma2", "phi3"]  # plain; soft-capped logits and post-norms; fused projections
CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
ANSWERS = (11, 12)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return InterpretableModel(tiny_family(request.param))


def test_lens_at_the_last_layer_is_the_model(model):
    result = model.logit_lens(CLEAN, top_k=5)
    logits = model.run([CLEAN]).output[0].astype(mx.float32)
    last = model.architecture.n_layers - 1
    for position in range(len(CLEAN)):
        ids = [t for t, _, _ in result[last][position]]
        assert is_top_k(ids, logits[position])  # the lens projects all layers at once: not bitwise
        probs = mx.softmax(logits[position])
        assert result[last][position][0][1] == pytest.approx(probs[ids[0]].item(), rel=1e-5)
    assert len(result) == model.architecture.n_layers


def test_lens_projects_every_layer_in_one_batch(model):
    """Layer i's predictions are the final norm and unembedding of layers[i].output."""
    result = model.logit_lens(CLEAN, layers=[0, 1], top_k=3)
    resid = model.run([CLEAN], capture=["layers[0].output"]).activations["layers[0].output"]
    arch = model.architecture
    logits = arch.unembed(arch.final_norm(resid))[0].astype(mx.float32)
    assert is_top_k([t for t, _, _ in result[0][-1]], logits[-1])


def _sources(model, ids, sub):
    names = [f"layers.{i}.{sub}" for i in range(model.architecture.n_layers)]
    acts = model.run([ids], capture=names).activations
    return {i: acts[name] for i, name in enumerate(names)}


def _metric(model, ids):
    return logit_difference(*ANSWERS)(model.run([ids]).output).item()


@pytest.mark.parametrize("sub", ["output", "attn.z_heads"])
def test_patching_a_run_into_itself(model, sub):
    """Clean into clean recovers 100% in every cell, corrupted into corrupted 0%."""
    n_layers, n_heads = model.architecture.n_layers, model.architecture.n_heads
    cells = [Cell(i, position=p) for i in range(n_layers) for p in (0, 3, 7)] if sub == "output" else [
        Cell(i, head=h) for i in range(n_layers) for h in range(n_heads)
    ]
    score = logit_difference(*ANSWERS)
    clean_metric, corrupted_metric = _metric(model, CLEAN), _metric(model, CORRUPTED)
    for ids, expected in ((CLEAN, 100.0), (CORRUPTED, 0.0)):
        scores = patch_sweep(model, ids, _sources(model, ids, sub), sub, cells, score)
        recovery = (scores - corrupted_metric) / (clean_metric - corrupted_metric) * 100
        assert mx.allclose(recovery, mx.full(recovery.shape, expected), atol=1e-2).item()


@pytest.mark.parametrize("kwargs", [{"component": "mlp"}, {"component": "resid", "positions": "all"}, {"component": "attn", "heads": True}])
def test_batched_sweep_equals_one_forward_per_cell(model, kwargs):
    result = model.activation_patching(CLEAN, CORRUPTED, answers=ANSWERS, memory_budget=4 * 2**20, **kwargs)
    arch = model.architecture
    sub = {"mlp": "mlp", "resid": "output", "attn": "attn.z_heads"}[kwargs["component"]]
    clean = _sources(model, CLEAN, sub)
    clean_metric, corrupted_metric = _metric(model, CLEAN), _metric(model, CORRUPTED)
    for layer in range(arch.n_layers):
        name = f"layers.{layer}.{sub}"
        if kwargs.get("heads"):
            edits = [iv.replace_with(clean[layer]).at(heads=[h]) for h in range(arch.n_heads)]
        elif kwargs.get("positions"):
            edits = [iv.replace_with(clean[layer]).at(positions=[p]) for p in range(len(CORRUPTED))]
        else:
            edits = [iv.replace_with(clean[layer])]
        for cell, edit in enumerate(edits):
            logits = model.run([CORRUPTED], interventions={name: edit}).output
            metric = logit_difference(*ANSWERS)(logits).item()
            expected = (metric - corrupted_metric) / (clean_metric - corrupted_metric) * 100
            got = result[layer] if result.axis == "layer" else result[layer][cell]
            assert got == pytest.approx(expected, abs=1e-2), (layer, cell)


def test_custom_metric_and_alignment(model):
    probability = lambda logits: mx.softmax(logits[:, -1].astype(mx.float32), axis=-1)[:, ANSWERS[0]]  # noqa: E731
    result = model.activation_patching(CLEAN, CORRUPTED, component="resid", metric=probability, answers=ANSWERS)
    assert result.metric == "<lambda>"
    assert result[model.architecture.n_layers - 1] == pytest.approx(100.0, abs=1e-3)
    longer = [99, *CORRUPTED]
    with pytest.raises(PatchingError, match=r"(?s)different token counts \(8 clean, 9 corrupted\).*clean: .*corrupted: .*align='end'"):
        model.activation_patching(CLEAN, longer, answers=ANSWERS)
    aligned = model.activation_patching(CLEAN, longer, component="resid", positions="all", align="end", answers=ANSWERS)
    assert aligned.labels[0] == "99" and aligned[0][0] == pytest.approx(0.0, abs=1e-3)  # nothing to patch there


def test_patching_errors(model):
    with pytest.raises(PatchingError, match="component 'ffn' unknown"):
        model.activation_patching(CLEAN, CORRUPTED, component="ffn", answers=ANSWERS)
    with pytest.raises(PatchingError, match="heads=True patches attention heads"):
        model.activation_patching(CLEAN, CORRUPTED, component="mlp", heads=True, answers=ANSWERS)
    with pytest.raises(PatchingError, match="nothing to recover"):
        model.activation_patching(CLEAN, CLEAN, answers=ANSWERS)


def test_steering_vector_is_the_mean_difference(model):
    positive, negative = [[5, 6, 7], [8, 9, 10, 11]], [[12, 13], [14, 15, 16]]
    name = "layers.1.output"
    sv = model.steering_vector(positive, negative, layer=1)
    last = lambda prompts: mx.stack([model.run([p], capture=[name]).activations[name][0, -1] for p in prompts])  # noqa: E731
    expected = last(positive).mean(axis=0) - last(negative).mean(axis=0)
    assert mx.allclose(sv.array, expected, atol=1e-5).item()
    mean_sv = model.steering_vector(positive, negative, layer=1, position="mean")
    means = lambda prompts: mx.stack([model.run([p], capture=[name]).activations[name][0].mean(axis=0) for p in prompts])  # noqa: E731
    assert mx.allclose(mean_sv.array, means(positive).mean(axis=0) - means(negative).mean(axis=0), atol=1e-5).item()


def test_steering_changes_only_targeted_rows_and_positions(model):
    sv = model.steering_vector([[5, 6, 7]], [[12, 13, 14]], layer=1)
    batch = [CLEAN, CORRUPTED]
    site, later = "layers.1.output", f"layers.{model.architecture.n_layers - 1}.output"
    clean = model.run(batch, capture=[site, later]).activations
    edit = iv.add_vector(sv.array * 3).at(rows=[0], positions=[4])
    steered = model.run(batch, interventions={site: edit}, capture=[site, later]).activations
    delta = steered[site] - clean[site]
    assert mx.allclose(delta[0, 4], (sv.array * 3).astype(delta.dtype), atol=1e-5).item()
    untouched = mx.concatenate([delta[0, :4], delta[0, 5:], delta[1]])
    assert not mx.any(untouched).item()
    assert bitwise_equal(steered[later][1], clean[later][1])  # the other row never sees it
    assert bitwise_equal(steered[later][0, :4], clean[later][0, :4])  # earlier positions neither
    assert not bitwise_equal(steered[later][0, 4:], clean[later][0, 4:])


@pytest.mark.parametrize("intervene_on", ["all", "generated"])
def test_steered_greedy_generation_equals_recomputation_without_cache(model, intervene_on):
    sv = model.steering_vector([[5, 6, 7]], [[12, 13, 14]], layer=1)
    edits = sv.interventions(scale=4.0)
    plain = model.generate(CLEAN, max_tokens=8, stop_at_eos=False)
    steered = model.generate(CLEAN, max_tokens=8, interventions=edits, intervene_on=intervene_on, stop_at_eos=False)
    assert steered.tokens != plain.tokens
    sequence = list(CLEAN)
    for token in steered.tokens:
        if intervene_on == "all":
            recompute = edits
        else:  # only the positions of generated tokens
            generated = list(range(len(CLEAN), len(sequence)))
            recompute = {k: e.at(positions=generated) for k, e in edits.items()} if generated else {}
        logits = model.run([sequence], interventions=recompute).output
        assert mx.argmax(logits[0, -1]).item() == token
        sequence.append(token)


def test_generation_captures_per_token_and_streams(model):
    result = model.generate(CLEAN, max_tokens=4, capture=["layers[0].output", "logits"], stop_at_eos=False)
    assert len(result.activations) == len(result.tokens) == 4
    assert result.activations[0]["layers[0].output"].shape[1] == len(CLEAN)  # the prompt pass
    assert result.activations[1]["layers[0].output"].shape[1] == 1  # one cached step
    for token, acts in zip(result.tokens, result.activations):
        assert mx.argmax(acts["logits"][0, -1]).item() == token
    streamed = [step.token for step in model.generate(CLEAN, max_tokens=4, stream=True, stop_at_eos=False)]
    assert streamed == result.tokens


def test_results_serialise_and_plot(model, tmp_path):
    lens = model.logit_lens(CLEAN, top_k=2)
    patching = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=ANSWERS)
    steering = model.steering_vector([[5, 6]], [[7, 8]], layer=0)
    for result, cls in ((lens, LogitLensResult), (patching, PatchingResult), (steering, SteeringVector)):
        assert cls.load(result.save(tmp_path / f"{cls.__name__}.json")) == result
        path = tmp_path / f"{cls.__name__}.png"
        result.plot(path)
        assert path.stat().st_size > 10_000
    assert dict(patching.items()).keys() == set(range(model.architecture.n_layers))
