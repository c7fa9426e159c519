"""Result objects of head detection (attrs values with the kit of mlxterp_core.results)."""

from __future__ import annotations

import math
from pathlib import Path

import attrs

from mlxterp.plugin import Serialisable


@attrs.frozen
class HeadScores(Serialisable):
    """A score per (layer, query head): ``scores[k][h]`` is head h of layer ``layers[k]``;
    ``result[layer]`` is that layer's row and ``result[layer, head]`` one score."""

    kind: str
    error_measure: str
    layers: list[int]
    n_heads: int
    scores: list[list[float]]  # (layers, heads); NaN where a head's counted attention is 0
    source: str  # what the scores were measured on
    n_sequences: int

    def __getitem__(self, key):
        if isinstance(key, tuple):
            layer, head = key
            return self.scores[self.layers.index(layer)][head]
        return self.scores[self.layers.index(key)]

    @property
    def array(self):
        """(layers, heads) mx.array of the scores."""
        import mlx.core as mx

        return mx.array(self.scores)

    def top(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The n highest-scoring heads: (layer, head, score), best first (NaN never ranks)."""
        cells = [(layer, head, value) for layer, row in zip(self.layers, self.scores)
                 for head, value in enumerate(row) if not math.isnan(value)]
        return sorted(cells, key=lambda cell: cell[2], reverse=True)[:n]

    def plot(self, path: str | Path | None = None, figsize=(8, 9)):
        from .plots import head_scores_plot

        return head_scores_plot(self, path, figsize)


@attrs.frozen
class InductionLoss(Serialisable):
    """Next-token loss on repeated random tokens: ``first_half`` over the first copy,
    ``second_half`` over the repeats (the first repeated token excluded), with the heads in
    ``ablated`` zero-ablated. ``per_position[p]`` is the mean loss of predicting token p + 1."""

    first_half: float
    second_half: float
    per_position: list[float]
    ablated: list[tuple[int, int]]
    n_tokens: int
    repeats: int
    n_sequences: int
    seed: int
    bos: bool
