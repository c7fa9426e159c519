"""Upstream mlxterp's ``mlxterp.visualization`` attention functions, over mlxterp's attention
patterns (``layers[i].attn.pattern``), its ``AttentionPatterns`` plot and its head scores
(``model.head_scores``, :mod:`mlxterp_heads`).

Where the definitions differ, ours are used: ``previous_token_score`` is the share of a head's
attention on the previous token over all rows (TransformerLens's ``"mul"``; upstream averages
over rows 1..T-1), and ``induction_score`` includes the last row of the first repeat (the
diagonal TransformerLens reads; a perfect head scores n/(n+1) on two repeats).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from mlxterp.plugin import OptionError
from mlxterp_analyses import AttentionPatterns
from mlxterp_heads import score_patterns, stripe_scores

HEAD_TYPES = ("previous_token", "first_token", "current_token")


class HeadScore(NamedTuple):
    """One head's score, as upstream's ``detect_induction_heads`` lists them."""

    layer: int
    head: int
    score: float
    head_type: str


def get_attention_patterns(trace, layers: int | Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """layer -> attention probabilities (B, H, T, T) of a trace, as NumPy arrays. Patterns are
    opt-in in mlxterp (fused attention never makes them): those the trace did not capture
    (``capture=["layers[*].attn.pattern"]``) come from one more forward pass of its inputs,
    with its interventions."""
    model = trace.model
    arch = model.architecture_or_raise("attention patterns")
    layers = range(arch.n_layers) if layers is None else [layers] if isinstance(layers, int) else layers
    names = {int(i): f"layers.{i}.attn.pattern" for i in layers}
    missing = [name for name in names.values() if name not in trace.activations]
    rerun = model.run(trace.inputs, interventions=trace.interventions, capture=missing).activations if missing else {}
    found = {i: trace.activations[name] if name not in missing else rerun[name] for i, name in names.items()}
    return {i: np.array(pattern.astype(mx.float32)) for i, pattern in found.items()}


def attention_heatmap(attention, tokens: Sequence[str], head_idx: int = 0, title: str | None = None,
                      backend: str = "auto", layer: int | None = None):
    """One head's pattern as a heatmap (query tokens down, key tokens along): the plot of
    :class:`~mlxterp_analyses.AttentionPatterns`. ``attention`` is (B, H, T, T), (H, T, T) or
    (T, T); returns the matplotlib Figure."""
    if backend not in ("auto", "matplotlib"):
        raise OptionError(f"backend={backend!r}: mlxterp draws with matplotlib; for an interactive view, show "
                          "model.attention_patterns(text, layer) in a notebook (docs/guide/migrating.md).")
    pattern = np.asarray(attention)
    pattern = pattern[0] if pattern.ndim == 4 else pattern
    pattern = pattern[head_idx] if pattern.ndim == 3 else pattern
    result = AttentionPatterns(text=title or "", tokens=list(tokens), layer=layer, heads=[head_idx],
                               patterns=[pattern.tolist()])
    return result.plot(columns=1)


def _one_head(pattern) -> mx.array:
    """A (T, T) pattern as (1, 1, T, T) float32."""
    return mx.array(np.asarray(pattern, dtype=np.float32))[None, None]


def _score(kind: str, pattern) -> float:
    one = _one_head(pattern)
    tokens = mx.zeros((1, one.shape[-1]), dtype=mx.int32)  # these kinds look at positions, not tokens
    return score_patterns(one, tokens, kind)[0, 0].item()


def previous_token_score(attention_pattern) -> float:
    """The share of a head's attention (T, T) on the previous token."""
    return _score("previous_token", attention_pattern)


def first_token_score(attention_pattern) -> float:
    """The share of a head's attention (T, T) on the first token."""
    return _score("first_token", attention_pattern)


def induction_score(attention_pattern, seq_len: int) -> float:
    """The induction stripe of a head's attention (T, T) on a sequence repeated with period
    ``seq_len``: the mean of A[i, i - seq_len + 1]."""
    return stripe_scores(_one_head(attention_pattern), seq_len)[0, 0].item()


def detect_induction_heads(model, n_random_tokens: int = 50, n_repeats: int = 2, threshold: float = 0.4,
                           layers: list[int] | None = None, seed: int = 42) -> list[HeadScore]:
    """Heads whose induction stripe on ``n_repeats`` repeats of ``n_random_tokens`` random
    ordinary tokens exceeds ``threshold``, best first: ``model.head_scores("induction", ...,
    error_measure="stripe")`` on one sequence."""
    scores = model.head_scores("induction", n_tokens=n_random_tokens, n_sequences=1, repeats=n_repeats, seed=seed,
                               layers=layers, error_measure="stripe")
    ranked = scores.top(len(scores.layers) * scores.n_heads)
    return [HeadScore(layer, head, float(score), "induction") for layer, head, score in ranked if score > threshold]


def detect_head_types(model, text: str, threshold: float = 0.4, layers: list[int] | None = None) -> dict[str, list[Any]]:
    """head type -> the (layer, head) pairs whose score on ``text`` exceeds ``threshold``, for
    previous-token, first-token and current-token heads (``model.head_scores``); ``"unknown"``
    lists the heads of none of them."""
    found: dict[str, list[tuple[int, int]]] = {}
    every: list[tuple[int, int]] = []
    for kind in HEAD_TYPES:
        scores = model.head_scores(kind, text, layers=layers)
        every = [(layer, head) for layer in scores.layers for head in range(scores.n_heads)]
        found[kind] = [(layer, head) for layer, head in every if scores[layer, head] > threshold]
    typed = {pair for pairs in found.values() for pair in pairs}
    found["unknown"] = [pair for pair in every if pair not in typed]
    return found


__all__ = ["HeadScore", "attention_heatmap", "detect_head_types", "detect_induction_heads", "first_token_score",
           "get_attention_patterns", "induction_score", "previous_token_score"]
