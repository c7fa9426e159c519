"""Head detection: closed-form scores on synthetic patterns, padding and batch invariance on a
tiny model, and on the default model induction heads that matter causally."""

from __future__ import annotations

import math
import random

import mlx.core as mx
import numpy as np
import pytest

from mlxterp import InputError, interventions as iv
from mlxterp_heads import detection_pattern, repeated_random_tokens, score_patterns, stripe_scores

T = 12


def as_patterns(matrix: mx.array) -> mx.array:
    return matrix[None, None]  # (1, 1, T, T)


def previous_token_pattern(length: int) -> mx.array:
    rows = [[1.0 if (j == i - 1 or (i == 0 and j == 0)) else 0.0 for j in range(length)] for i in range(length)]
    return mx.array(rows)


def uniform_causal(length: int) -> mx.array:
    return mx.array([[1.0 / (i + 1) if j <= i else 0.0 for j in range(length)] for i in range(length)])


def test_perfect_previous_token_head():
    pattern, tokens = as_patterns(previous_token_pattern(T)), mx.arange(T)[None]
    assert score_patterns(pattern, tokens, "previous_token", "mul").item() == pytest.approx((T - 1) / T, abs=1e-6)
    assert score_patterns(pattern, tokens, "previous_token", "abs").item() == pytest.approx(1 - 1 / T, abs=1e-6)


def test_uniform_causal_attention_closed_forms():
    pattern, tokens = as_patterns(uniform_causal(T)), mx.arange(T)[None]
    harmonic = sum(1 / k for k in range(1, T + 1))
    assert score_patterns(pattern, tokens, "previous_token", "mul").item() == pytest.approx((harmonic - 1) / T, abs=1e-6)
    assert score_patterns(pattern, tokens, "first_token", "mul").item() == pytest.approx(harmonic / T, abs=1e-6)
    abs_error = 1 + sum(2 * i / (i + 1) for i in range(1, T))
    assert score_patterns(pattern, tokens, "previous_token", "abs").item() == pytest.approx(1 - abs_error / T, abs=1e-6)
    # with distinct tokens there is nothing to duplicate or induct: "mul" is exactly 0
    assert score_patterns(pattern, tokens, "induction", "mul").item() == 0.0


def test_perfect_induction_head_on_repeated_tokens():
    n = 6
    tokens = mx.array([list(range(10, 10 + n)) * 2])
    rows = [[1.0 if (j == i if i < n else j == i - n + 1) else 0.0 for j in range(2 * n)] for i in range(2 * n)]
    pattern = as_patterns(mx.array(rows))
    assert score_patterns(pattern, tokens, "induction", "mul").item() == pytest.approx(0.5, abs=1e-6)
    assert score_patterns(pattern, tokens, "induction", "abs").item() == pytest.approx(0.5, abs=1e-6)
    assert stripe_scores(pattern, n).item() == pytest.approx(n / (n + 1), abs=1e-6)


def test_detection_patterns_mark_what_their_definitions_say():
    tokens = mx.array([[5, 7, 5, 7, 9]])
    duplicate = np.array(detection_pattern("duplicate_token", tokens)[0])
    induction = np.array(detection_pattern("induction", tokens)[0])
    assert duplicate[2, 0] == 1 and duplicate[3, 1] == 1 and duplicate.sum() == 2
    assert induction[2, 1] == 1 and induction[3, 2] == 1 and induction.sum() == 2  # the token after the earlier copy


def test_exclusions_copy_and_define_empty_attention_as_nan():
    pattern = as_patterns(mx.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]))  # all attention on position 0
    before = np.array(pattern)
    assert math.isnan(score_patterns(pattern, mx.arange(3)[None], "previous_token", "mul", exclude_bos=True).item())
    assert (np.array(pattern) == before).all()  # the caller's pattern is untouched
    with pytest.raises(InputError, match="exclude_bos"):
        score_patterns(pattern, mx.arange(3)[None], "first_token", exclude_bos=True)


def test_padding_does_not_change_scores():
    pattern = previous_token_pattern(T)
    padded = mx.zeros((T + 4, T + 4)).at[:T, :T].add(pattern)
    padded = padded.at[T:, :].add(1.0 / (T + 4))  # garbage rows at padding positions
    tokens = mx.concatenate([mx.arange(T), mx.zeros(4, dtype=mx.int32)])[None]
    for measure in ("mul", "abs"):
        alone = score_patterns(as_patterns(pattern), mx.arange(T)[None], "previous_token", measure).item()
        assert score_patterns(as_patterns(padded), tokens, "previous_token", measure, lengths=[T]).item() == pytest.approx(alone, abs=1e-6)


def test_head_scores_on_a_model_are_batch_and_padding_invariant(llama):
    prompts = ["The capital of France is Paris.", "Hello, how are you?", "I love this movie."]
    together = llama.head_scores("previous_token", prompts)
    reordered = llama.head_scores("previous_token", prompts[::-1])
    alone = [llama.head_scores("previous_token", p) for p in prompts]
    mean = np.mean([r.scores for r in alone], axis=0)
    np.testing.assert_allclose(together.scores, mean, atol=1e-5)
    np.testing.assert_allclose(reordered.scores, together.scores, atol=1e-5)
    assert (len(together.layers), together.n_heads) == (4, 4)  # query heads, not the 2 key/value heads


def test_head_scores_read_the_models_own_patterns(llama):
    """Replace every layer's pattern by a perfect previous-token pattern: the scores are the
    closed form, so the scores are computed from what the model attends with."""
    ids = list(range(20, 30))
    perfect = previous_token_pattern(len(ids))
    scores = llama.head_scores("previous_token", [ids], interventions={
        "layers.*.attn.pattern": lambda p: mx.broadcast_to(perfect, p.shape).astype(p.dtype)})
    np.testing.assert_allclose(scores.scores, (len(ids) - 1) / len(ids), atol=1e-6)


def test_repeated_random_tokens_are_seeded_and_ordinary(smollm):
    a = repeated_random_tokens(smollm, 20, 3, seed=1)
    assert (np.array(a) == np.array(repeated_random_tokens(smollm, 20, 3, seed=1))).all()
    assert not (np.array(a) == np.array(repeated_random_tokens(smollm, 20, 3, seed=2))).all()
    special = set(smollm.tokenizer.all_special_ids)
    assert a.shape == (3, 40) and not special & set(np.array(a).ravel().tolist())
    assert (np.array(a[:, :20]) == np.array(a[:, 20:])).all()
    assert repeated_random_tokens(smollm, 20, 3, seed=1, bos=True)[:, 0].tolist() == [smollm.tokenizer.bos_token_id] * 3


def test_bad_arguments_are_clear_errors(llama):
    with pytest.raises(InputError, match="unknown head kind"):
        llama.head_scores("copying")
    with pytest.raises(InputError, match="stripe"):
        llama.head_scores("previous_token", error_measure="stripe")
    with pytest.raises(InputError, match="does not exist"):
        llama.induction_loss(ablate=[(9, 0)])


def test_default_model_has_induction_heads_that_matter_causally(smollm):
    """Zero-ablating the top 5 induction heads raises the loss on the repeats far more than
    ablating 5 random heads, while the loss on the first copy barely moves."""
    scores = smollm.head_scores("induction", error_measure="stripe", n_tokens=32, n_sequences=6, seed=0)
    top = [(layer, head) for layer, head, _ in scores.top(5)]
    assert scores.top(1)[0][2] > 0.5
    kwargs = dict(n_tokens=32, n_sequences=6, seed=1)  # other sequences than the scoring ones
    clean = smollm.induction_loss(**kwargs)
    ablated = smollm.induction_loss(top, **kwargs)
    assert clean.second_half < clean.first_half - 3  # the repeats are predictable
    others = [(layer, head) for layer in range(30) for head in range(9) if (layer, head) not in top]
    rises = []
    for seed in range(3):
        control = smollm.induction_loss(random.Random(seed).sample(others, 5), **kwargs)
        rises.append(control.second_half - clean.second_half)
    rise = ablated.second_half - clean.second_half
    print(f"top-5 induction heads {top} (stripe {[round(s, 3) for *_, s in scores.top(5)]}); "
          f"clean loss {clean.first_half:.2f} / {clean.second_half:.2f}; ablated {ablated.first_half:.2f} / "
          f"{ablated.second_half:.2f}; random-5 rises {[round(r, 3) for r in rises]}")
    assert rise > 1.0 and rise > 3 * max(max(rises), 0.05)
    assert abs(ablated.first_half - clean.first_half) < 0.25 * rise
