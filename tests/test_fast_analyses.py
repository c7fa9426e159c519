"""Fast paths of the analyses give the numbers of the straightforward computations they replace."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_family

from mlxterp import InterpretableModel
from mlxterp_analyses import lens


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
