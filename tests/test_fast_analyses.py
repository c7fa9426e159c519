"""Fast paths of the analyses give the numbers of the straightforward computations they replace."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_family

from mlxterp import InterpretableModel
from mlxterp_analyses import unembed as lens


def softmax_top_k(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """The logit lens's top-k before the fast path: full softmax, partition of probabilities."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    k = min(top_k, probs.shape[-1])
    ids = mx.argpartition(-probs, k - 1, axis=-1)[..., :k]
    chosen = mx.take_along_axis(probs, ids, axis=-1)
    order = mx.argsort(-chosen, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(chosen, order, axis=-1)


def exact_top_k(logits, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and probabilities computed in float64."""
    x = np.asarray(logits).astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-x, axis=-1, kind="stable")[:, :top_k]
    return ids, np.take_along_axis(probs, ids, axis=-1)


@pytest.mark.parametrize("vocab", [320, 49152, 50257, 100])
@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_top_k_from_logits_equals_softmax_top_k(vocab, top_k):
    """Same ids as the softmax route; probabilities within 1e-6 of float64. (MLX's CPU softmax
    sums 49152 float32 terms with relative errors up to ~3e-4: the old route is held to 1e-3.)"""
    mx.random.seed(vocab + top_k)
    logits = mx.random.normal((37, vocab)) * 4
    logits[3, 7] = 40.0  # one row with a single dominant token
    want_ids, want_probs = exact_top_k(logits, top_k)
    old_ids, old_probs = softmax_top_k(logits, top_k)
    host_ids, host_probs = lens.top_k_numpy(np.asarray(logits), top_k)
    device_ids, device_probs = lens.top_k_mlx(logits, top_k)
    x = np.asarray(logits)
    ranked = lambda ids: np.take_along_axis(x, np.asarray(ids), axis=-1).tolist()  # noqa: E731 (ties may swap ids)
    assert ranked(host_ids) == ranked(want_ids) == ranked(old_ids) == ranked(device_ids)
    assert np.abs(host_probs - want_probs).max() <= 1e-6
    old = np.asarray(old_probs)
    assert (np.abs(host_probs - old) <= 1e-3 * old).all()
    assert (np.abs(np.asarray(device_probs) - old) <= 1e-3 * old).all()


def test_top_k_is_exact_when_candidates_share_a_column():
    """The k largest logits all in one column of the grid, and ties at the k-th value."""
    vocab = 64 * 100
    logits = np.zeros((2, vocab), dtype=np.float32)
    logits[0, [5, 105, 205, 305]] = [4.0, 3.0, 2.0, 1.0]  # column 5 of every group row
    logits[1, [1, 2, 3]] = 2.0
    ids, probs = lens.top_k_numpy(logits, 4)
    assert ids[0].tolist() == [5, 105, 205, 305]
    assert sorted(ids[1, :3].tolist()) == [1, 2, 3] and logits[1, ids[1, 3]] == 0.0
    want = np.exp(logits[0, [5, 105, 205, 305]]) / np.exp(logits[0]).sum()
    assert np.abs(probs[0] - want).max() <= 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_logit_lens_equals_the_softmax_lens(family, monkeypatch):
    model = InterpretableModel(tiny_family(family, vocab_size=6000))
    ids = [5, 17, 3, 42, 9, 77, 1, 30]
    fast = model.logit_lens(ids, top_k=5)
    monkeypatch.setattr(lens, "top_predictions", lambda m, h, k: softmax_top_k(lens.project(m, h), k))
    slow = model.logit_lens(ids, top_k=5)
    resid = model.run([ids], capture=["layers[*].output"]).activations["layers[*].output"][:, 0]
    exact_ids, exact_probs = exact_top_k(lens.project(model, resid).reshape(-1, 6000), 5)
    for layer in fast.layers:
        for position, (got, want) in enumerate(zip(fast[layer], slow[layer])):
            row = layer * len(ids) + position
            assert [t for t, _, _ in got] == [t for t, _, _ in want] == exact_ids[row].tolist()
            assert max(abs(p - q) for (_, p, _), q in zip(got, exact_probs[row])) <= 1e-6
            assert max(abs(p - q) for (_, p, _), (_, q, _) in zip(got, want)) <= 1e-5


def test_logit_lens_on_the_real_model_equals_float64(smollm):
    text = "The Eiffel Tower is located in the city of"
    result = smollm.logit_lens(text, top_k=5)
    resid = smollm.run([text], capture=["layers[*].output"]).activations["layers[*].output"][:, 0]
    logits = lens.project(smollm, resid).astype(mx.float32)
    logits = logits.reshape(-1, logits.shape[-1])
    exact_ids, exact_probs = exact_top_k(logits, 5)
    old_ids, old_probs = softmax_top_k(logits, 5)
    x = np.asarray(logits)
    positions = len(result.token_ids)
    for layer in result.layers:
        for position, got in enumerate(result[layer]):
            row = layer * positions + position
            ids = [t for t, _, _ in got]
            assert x[row, ids].tolist() == x[row, exact_ids[row]].tolist() == x[row, np.asarray(old_ids[row])].tolist()
            probs = np.array([p for _, p, _ in got])
            assert np.abs(probs - exact_probs[row]).max() <= 1e-6
            assert (np.abs(probs - np.asarray(old_probs[row])) <= 1e-3 * np.asarray(old_probs[row])).all()


# -- patching sweeps with causal reuse ------------------------------------------------------------

from mlxterp import interventions as iv  # noqa: E402
from mlxterp_analyses import causal  # noqa: E402
from mlxterp_analyses.patching import Cell, causal_sweep, full_sweep, logit_difference, patch_sweep, reads_last  # noqa: E402

CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
ANSWERS = (11, 12)
SUBS = ["output", "input", "mlp", "attn", "resid_mid", "attn.z_heads"]


@pytest.fixture(scope="module", params=["llama", "gemma2", "phi3"])
def family_model(request):
    return InterpretableModel(tiny_family(request.param))


def naive_scores(model, clean, corrupted, sub, cells, score, offset=0):
    """One traced forward pass per cell, patched through the public intervention API."""
    names = {c.layer: f"layers.{c.layer}.{sub}" for c in cells}
    acts = model.run([clean], capture=list(names.values())).activations
    scores = []
    for cell in cells:
        source = acts[names[cell.layer]]
        if offset:  # target position p takes source position p + offset
            source = source[:, offset:] if offset > 0 else mx.concatenate([mx.zeros_like(source[:, :-offset]), source], axis=1)
        at = {}
        if cell.head is not None:
            at["heads"] = [cell.head]
        if cell.position is not None:
            at["positions"] = [cell.position]
        edit = iv.replace_with(source[:, : len(corrupted)])
        edits = {names[cell.layer]: edit.at(**at) if at else edit}
        if cell.position is not None and not 0 <= cell.position + offset < len(clean):
            edits = {}  # no source position: nothing to patch
        logits = model.run([corrupted], interventions=edits).output
        scores.append(score(logits).item())
    return scores


def sweep_cells(model, sub):
    arch = model.architecture
    if sub == "attn.z_heads":
        return [Cell(i, head=h) for i in range(arch.n_layers) for h in range(arch.n_heads)]
    if sub == "mlp":
        return [Cell(i) for i in range(arch.n_layers)] + [Cell(i, position=p) for i in (0, 2) for p in range(len(CORRUPTED))]
    return [Cell(i, position=p) for i in range(arch.n_layers) for p in range(len(CORRUPTED))]


def clean_sources(model, sub, ids=CLEAN):
    names = [f"layers.{i}.{sub}" for i in range(model.architecture.n_layers)]
    acts = model.run([ids], capture=names).activations
    return {i: acts[name] for i, name in enumerate(names)}


@pytest.mark.parametrize("call_cost", [0, causal.LAYER_CALL_COST])  # 0: one batch per start position
@pytest.mark.parametrize("sub", SUBS)
def test_causal_sweep_equals_one_trace_per_cell(family_model, sub, call_cost, monkeypatch):
    """Every cell within 1e-4 of recovery fraction of the naive loop, re-entering the run."""
    monkeypatch.setattr(causal, "LAYER_CALL_COST", call_cost)
    model = family_model
    score = logit_difference(*ANSWERS)
    cells = sweep_cells(model, sub)
    clean_metric, corrupted_metric = score(model.run([CLEAN]).output).item(), score(model.run([CORRUPTED]).output).item()
    fast = causal_sweep(model, CORRUPTED, clean_sources(model, sub), sub, cells, score, progress=False).tolist()
    naive = naive_scores(model, CLEAN, CORRUPTED, sub, cells, score)
    fraction = lambda s: (s - corrupted_metric) / (clean_metric - corrupted_metric)  # noqa: E731
    for cell, got, want in zip(cells, fast, naive):
        assert abs(fraction(got) - fraction(want)) <= 1e-4, cell


@pytest.mark.parametrize("declared", [None, 3, 5, 20])
def test_causal_sweep_with_custom_metrics(family_model, declared, monkeypatch):
    """A metric that declares no reads gets every position; one reading the last k gets those
    (20: more than the prompt has, so all)."""
    monkeypatch.setattr(causal, "LAYER_CALL_COST", 0)
    model = family_model

    def metric(logits):  # mean log-probability of token 11 over the last three positions
        return (logits[:, -3:].astype(mx.float32) - mx.logsumexp(logits[:, -3:].astype(mx.float32), axis=-1, keepdims=True))[..., 11].mean(axis=-1)

    score = metric if declared is None else reads_last(declared)(metric)
    cells = sweep_cells(model, "output")
    fast = causal_sweep(model, CORRUPTED, clean_sources(model, "output"), "output", cells, score, progress=False).tolist()
    naive = naive_scores(model, CLEAN, CORRUPTED, "output", cells, metric)
    assert fast == pytest.approx(naive, abs=1e-5)


def test_causal_sweep_with_aligned_prompts_of_different_lengths(family_model, monkeypatch):
    monkeypatch.setattr(causal, "LAYER_CALL_COST", 0)
    model = family_model
    longer = [99, 98, *CORRUPTED]
    score = logit_difference(*ANSWERS)
    cells = sweep_cells(model, "output")[: 2 * len(CORRUPTED)] + [Cell(1, position=p) for p in range(len(longer))]
    fast = causal_sweep(model, longer, clean_sources(model, "output"), "output", cells, score, offset=-2, progress=False).tolist()
    assert fast == pytest.approx(full_sweep(model, longer, clean_sources(model, "output"), "output", cells, score, offset=-2).tolist(), abs=1e-5)
    assert fast == pytest.approx(naive_scores(model, CLEAN, longer, "output", cells, score, offset=-2), abs=1e-5)


def test_sweeps_fall_back_where_reuse_is_not_exact(monkeypatch):
    """Sliding-window caches: no reuse; a re-entry that breaks: the control row notices."""
    gemma3 = InterpretableModel(tiny_family("gemma3_text"))
    score = logit_difference(*ANSWERS)
    cells = sweep_cells(gemma3, "output")
    with pytest.raises(causal.CannotReuse, match="not plain KV caches"):
        causal_sweep(gemma3, CORRUPTED, clean_sources(gemma3, "output"), "output", cells, score)
    assert patch_sweep(gemma3, CORRUPTED, clean_sources(gemma3, "output"), "output", cells, score).tolist() == pytest.approx(
        naive_scores(gemma3, CLEAN, CORRUPTED, "output", cells, score), abs=1e-4)

    llama = InterpretableModel(tiny_family("llama"))
    monkeypatch.setattr(causal, "LAYER_CALL_COST", 0)
    real_cache = causal.CorruptedRun.prefix_cache
    monkeypatch.setattr(causal.CorruptedRun, "prefix_cache", lambda self, layer, start, rows: real_cache(self, layer, 0, rows))
    sources = clean_sources(llama, "output")
    with pytest.raises(causal.CannotReuse, match="changed its logits"):
        causal_sweep(llama, CORRUPTED, sources, "output", sweep_cells(llama, "output"), score)
    assert patch_sweep(llama, CORRUPTED, sources, "output", sweep_cells(llama, "output"), score).tolist() == pytest.approx(
        naive_scores(llama, CLEAN, CORRUPTED, "output", sweep_cells(llama, "output"), score), abs=1e-4)


def test_causal_sweep_on_the_real_model_equals_one_trace_per_cell(smollm):
    clean, corrupted = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    result = smollm.activation_patching(clean, corrupted, component="resid", positions="all", progress=False)
    clean_ids, corrupted_ids = smollm.encode(clean), smollm.encode(corrupted)
    score = logit_difference(smollm.encode(" Paris")[0], smollm.encode(" Rome")[0])
    cells = [Cell(layer, position=p) for layer in (0, 9, 20, 29) for p in range(len(corrupted_ids))]
    naive = naive_scores(smollm, clean_ids, corrupted_ids, "output", cells, score)
    for cell, want in zip(cells, naive):
        fraction = (want - result.corrupted_metric) / (result.clean_metric - result.corrupted_metric)
        assert abs(result[cell.layer][cell.position] / 100 - fraction) <= 1e-4, cell


def test_progress_bar_only_on_a_terminal(family_model, monkeypatch, capsys):
    import io

    import mlxterp_core.progress as progress

    monkeypatch.setattr(progress, "DELAY", 0)
    monkeypatch.delenv("CI", raising=False)  # CI turns every bar off
    monkeypatch.delenv("MLXTERP_PROGRESS", raising=False)
    patch = dict(clean_text=CLEAN, corrupted_text=CORRUPTED, component="resid", positions="all", answers=ANSWERS)
    family_model.activation_patching(**patch)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for shown in (True, False):
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        family_model.activation_patching(**patch, progress=shown)
        assert ("patching" in terminal.getvalue()) is shown
