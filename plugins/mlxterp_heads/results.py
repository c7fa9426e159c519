"""Result objects of head detection (attrs values with the kit of mlxterp_core.results)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import attrs

from mlxterp.plugin import Display, LayerMapping, Rounded, Serialisable, index_of, short


@attrs.frozen(repr=False)
class HeadScores(Display, Serialisable, LayerMapping):
    """A score per (layer, query head): ``scores[k][h]`` is head h of layer ``layers[k]``;
    ``result[layer]`` is that layer's row and ``result[layer, head]`` one score (negative
    layers and heads count from the end)."""

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
            return self.scores[self._position(layer)][index_of(range(self.n_heads), head, "head", "HeadScores")]
        return self.scores[self._position(key)]

    @property
    def array(self):
        """(layers, heads) mx.array of the scores."""
        import mlx.core as mx

        return mx.array(self.scores)

    def top(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The n highest-scoring heads: (layer, head, score), best first (NaN never ranks; the
        score shown to 4 significant digits, its value exact)."""
        cells = [(layer, head, Rounded(value)) for layer, row in zip(self.layers, self.scores)
                 for head, value in enumerate(row) if not math.isnan(value)]
        return sorted(cells, key=lambda cell: cell[2], reverse=True)[:n]

    def _summary(self) -> str:
        top = ", ".join(f"L{layer}H{head} {value:.3g}" for layer, head, value in self.top(3))
        described = re.match(r"\d+ (prompts|sequences)\b", self.source)  # else the text itself
        source = self.source if described else short(self.source, 60)
        return (f"{self.kind} ({self.error_measure}), {len(self.layers)} layers x {self.n_heads} heads on "
                f"{source}; top: {top or 'none (every score is NaN)'}")

    def _view(self) -> str:
        from mlxterp.plugin import heatmap_html

        return heatmap_html([f"L{layer}" for layer in self.layers], [f"H{head}" for head in range(self.n_heads)],
                            self.scores,
                            title=f"{self.kind.replace('_', '-')} head scores ({self.error_measure})",
                            subtitle=self.source, row_name="layer", column_name="head", flip=True)

    def plot(self, path: str | Path | None = None, figsize=(8, 9)):
        from .plots import head_scores_plot

        return head_scores_plot(self, path, figsize)


@attrs.frozen(repr=False)
class InductionLoss(Display, Serialisable):
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

    def _summary(self) -> str:
        shown = ", ".join(f"L{layer}H{head}" for layer, head in self.ablated[:4])
        more = f" +{len(self.ablated) - 4} more" if len(self.ablated) > 4 else ""
        ablated = f"{shown}{more} ablated" if self.ablated else "no heads ablated"
        bos = ", BOS first" if self.bos else ""
        return (f"{self.n_sequences} sequences of {self.n_tokens} random tokens x {self.repeats}{bos}, {ablated}: "
                f"loss {self.first_half:.3g} nats on the first copy, {self.second_half:.3g} on the repeats")
