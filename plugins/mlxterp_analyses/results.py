"""Result objects of the analyses: attrs values that index like the original API's return
values, plot themselves with matplotlib, and serialise with cattrs (``to_data`` / ``save`` /
``load``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from mlxterp.plugin import LayerMapping, Serialisable
from mlxterp.plugin import Display, Rounded, index_of, percent, short

Prediction = tuple[int, float, str]  # (token id, probability, token text)


@attrs.frozen(repr=False)
class LogitLensResult(Display, Serialisable, LayerMapping):
    """What every layer predicts at every position: ``result[layer][position]`` is the top-k
    list of ``(token_id, probability, token_text)``, best first, so
    ``result[layer][-1][0][2]`` is the top token at the last position; ``result[-1]`` is the
    last layer."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    layers: list[int]
    predictions: dict[int, list[list[Prediction]]]
    top_k: int

    def __getitem__(self, layer: int) -> list[list[Prediction]]:
        return self.predictions[self.layers[self._position(layer)]]

    def top_tokens(self, position: int = -1) -> dict[int, str]:
        """layer -> the top predicted token at ``position``."""
        return {layer: rows[position][0][2] for layer, rows in self.predictions.items()}

    def _summary(self) -> str:
        last = self.layers[-1] if self.layers else None
        head = f"{short(self.text)}, {len(self.tokens)} tokens x {len(self.layers)} layers, top-{self.top_k}"
        if last is None or not self.tokens:
            return head
        final_id, final_p, final_text = self.predictions[last][-1][0]
        first = last
        for layer in reversed(self.layers):
            if self.predictions[layer][-1][0][0] != final_id:
                break
            first = layer
        return (f"{head}; at {short(self.tokens[-1], 20)} layer {last} predicts {short(final_text, 20)} "
                f"({percent(100 * final_p)}), top-1 since layer {first}")

    def _view(self) -> str:
        from mlxterp.plugin import lens_html

        return lens_html(self.tokens, self.layers, [self.predictions[layer] for layer in self.layers],
                         title=f"Logit lens: {self.text}")

    def plot(self, path: str | Path | None = None, max_display_tokens: int = 15, figsize=(16, 10)):
        from .plots import lens_heatmap

        return lens_heatmap(self, path, max_display_tokens, figsize)


@attrs.frozen(repr=False)
class PatchingResult(Display, Serialisable, LayerMapping):
    """Recovery (%) from patching clean activations into the corrupted run.

    ``axis`` is "layer" (one number per layer: ``result[layer]`` is a float, as in the original
    API), "position" or "head" (``result[layer]`` is a list over positions / heads;
    ``result[-1]`` the last layer). 0% is the corrupted run, 100% the clean run.
    """

    clean_text: str
    corrupted_text: str
    component: str
    axis: str
    layers: list[int]
    labels: list[str]  # the position tokens or head numbers of the second axis ([] for "layer")
    recovery: list[list[float]]  # (layers, cells) in %; one cell per layer for axis "layer"
    clean_answer: str
    corrupted_answer: str
    clean_metric: float
    corrupted_metric: float
    metric: str

    def __getitem__(self, layer: int):
        row = self.recovery[self._position(layer)]
        return row[0] if self.axis == "layer" else row

    def top(self, n: int = 5) -> list[tuple[int, int | None, float]]:
        """The n cells of highest recovery: (layer, position or head or None, recovery), the
        recovery shown to 4 significant digits (its value is exact)."""
        cells = [
            (layer, None if self.axis == "layer" else j, Rounded(value))
            for layer, row in zip(self.layers, self.recovery)
            for j, value in enumerate(row)
        ]
        return sorted(cells, key=lambda cell: cell[2], reverse=True)[:n]

    def _cell_name(self, layer: int, j: int | None) -> str:
        if j is None:
            return f"L{layer}"
        return f"L{layer}H{self.labels[j]}" if self.axis == "head" else f"L{layer} {self.labels[j]!r}"

    def _summary(self) -> str:
        size = f"{len(self.layers)} layers" + ("" if self.axis == "layer" else f" x {len(self.labels)} {self.axis}s")
        top = ", ".join(f"{self._cell_name(layer, j)} {percent(v)}" for layer, j, v in self.top(3))
        return (f"{self.component} by {self.axis}, {size}; {self.metric}: clean {self.clean_metric:.3g} "
                f"({self.clean_answer!r}), corrupted {self.corrupted_metric:.3g} ({self.corrupted_answer!r}); "
                f"top recovery: {top}")

    def _view(self) -> str:
        from mlxterp.plugin import heatmap_html

        subtitle = (f"clean {self.clean_text!r} ({self.clean_answer!r}, {self.metric} {self.clean_metric:.3g}); "
                    f"corrupted {self.corrupted_text!r} ({self.corrupted_answer!r}, {self.corrupted_metric:.3g})")
        title = f"Activation patching of {self.component}: recovery (%)"
        bound = max([100.0] + [abs(v) for row in self.recovery for v in row])  # as .plot() colours it
        if self.axis == "layer":  # one row of layers
            return heatmap_html([self.component], [f"L{layer}" for layer in self.layers], [[row[0] for row in self.recovery]],
                                title=title, subtitle=subtitle, unit="%", row_name="component", column_name="layer",
                                scale=bound)
        return heatmap_html([f"L{layer}" for layer in self.layers], self.labels, self.recovery, title=title,
                            subtitle=subtitle, unit="%", row_name="layer", column_name=self.axis, flip=True, scale=bound,
                            quote_columns=self.axis == "position")

    def plot(self, path: str | Path | None = None, figsize=(12, 7)):
        from .plots import patching_plot

        return patching_plot(self, path, figsize)


@attrs.frozen(repr=False)
class AttributionResult(Display, Serialisable):
    """Attribution patching's estimated recovery (%) for every component at once:
    ``result["resid"]`` (and "attn", "mlp", "resid_pre", "resid_mid") is a PatchingResult over
    layers x positions, ``result["heads"]`` over layers x heads, each with ``.plot()``."""

    clean_text: str
    corrupted_text: str
    layers: list[int]
    positions: list[str]  # corrupted-prompt tokens
    heads: list[str]
    estimates: dict[str, list[list[float]]]  # component -> (layers, positions or heads)
    clean_answer: str
    corrupted_answer: str
    clean_metric: float
    corrupted_metric: float
    metric: str

    def __getitem__(self, component: str) -> PatchingResult:
        component = list(self.estimates)[index_of(list(self.estimates), component, "component", type(self).__name__)]
        heads = component == "heads"
        return PatchingResult(
            clean_text=self.clean_text,
            corrupted_text=self.corrupted_text,
            component=f"{component} (attribution patching)",
            axis="head" if heads else "position",
            layers=self.layers,
            labels=self.heads if heads else self.positions,
            recovery=self.estimates[component],
            clean_answer=self.clean_answer,
            corrupted_answer=self.corrupted_answer,
            clean_metric=self.clean_metric,
            corrupted_metric=self.corrupted_metric,
            metric=self.metric,
        )

    def keys(self) -> list[str]:
        return list(self.estimates)

    def _summary(self) -> str:
        tops = []
        for component in self.estimates:
            cells = self[component].top(1)
            if cells:
                layer, j, v = cells[0]
                tops.append(f"{component} {self[component]._cell_name(layer, j)} {percent(v)}")
        return (f"{len(self.estimates)} components, {len(self.layers)} layers x {len(self.positions)} positions "
                f"/ {len(self.heads)} heads; {self.metric}: clean {self.clean_metric:.3g}, corrupted "
                f"{self.corrupted_metric:.3g}; top: {', '.join(tops)}")

    def _view(self) -> str:
        return "".join(self[component]._view() for component in self.estimates)

    def plot(self, component: str = "resid", path: str | Path | None = None, figsize=(12, 7)):
        return self[component].plot(path, figsize)


@attrs.frozen(repr=False)
class ResidComponents(Display, Serialisable):
    """The residual stream as a stack: ``vectors[c]`` is component ``labels[c]``, (T, D) each.

    ``kind`` "decomposed": embed, attn i / heads, mlp i: they sum to ``total``, the residual
    stream entering ``layer``. ``kind`` "accumulated": the residual stream at each layer
    boundary (embed, after L0, after L1, ...)."""

    text: str
    tokens: list[str]
    layer: int
    kind: str
    labels: list[str]
    vectors: list[list[list[float]]]
    total: list[list[float]]

    @property
    def array(self):
        """(C, T, D) mx.array of the components."""
        import mlx.core as mx

        return mx.array(self.vectors)

    def __getitem__(self, label: str):
        import mlx.core as mx

        return mx.array(self.vectors[index_of(self.labels, label, "component", type(self).__name__)])

    def sum(self):
        """The components summed, (T, D): equals ``total`` for a decomposition."""
        return self.array.sum(axis=0)

    def _summary(self) -> str:
        shown = ", ".join(self.labels[:4]) + (", ..." if len(self.labels) > 4 else "")
        width = len(self.total[0]) if self.total else 0
        return (f"{self.kind}, {len(self.labels)} components x {len(self.tokens)} tokens x {width}, "
                f"layer {self.layer}, {short(self.text)}: {shown}")

    def plot(self, path: str | Path | None = None, position: int = -1, figsize=(12, 5)):
        from .plots import resid_norms_plot

        return resid_norms_plot(self, path, position, figsize)


@attrs.frozen(repr=False)
class DLAResult(Display, Serialisable):
    """Direct logit attribution: ``values[c]`` is component ``labels[c]``'s contribution to
    ``logit[answers[0]] - logit[answers[1]]`` at ``position``; they sum to ``logit_diff``."""

    text: str
    tokens: list[str]
    position: int
    answers: list[str]
    labels: list[str]
    values: list[float]
    logit_diff: float
    n_heads: int  # 0 when attention layers were not split into heads

    def __getitem__(self, label: str) -> float:
        return self.values[index_of(self.labels, label, "component", type(self).__name__)]

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n components of largest |contribution| (shown to 4 significant digits)."""
        ranked = sorted(zip(self.labels, self.values), key=lambda lv: abs(lv[1]), reverse=True)[:n]
        return [(label, Rounded(value)) for label, value in ranked]

    def head_matrix(self) -> list[list[float]]:
        """(layers, heads) of per-head contributions (needs heads=True)."""
        if not self.n_heads:
            raise ValueError("this attribution did not split attention into heads (heads=False)")
        table: dict[int, list[float]] = {}
        for label, value in zip(self.labels, self.values):
            if label.startswith("L") and "H" in label and " " not in label:
                layer, head = label[1:].split("H")
                table.setdefault(int(layer), [0.0] * self.n_heads)[int(head)] = value
        return [table[layer] for layer in sorted(table)]

    def top_heads(self, n: int = 10) -> list[tuple[str, float]]:
        return [(label, value) for label, value in self.top(len(self.labels)) if "H" in label and " " not in label][:n]

    def table(self, n: int = 15) -> str:
        """The top components as a text table."""
        lines = [f"direct logit attribution of {self.answers[0]!r} - {self.answers[1]!r} at "
                 f"position {self.position} ({self.tokens[self.position]!r}); total {self.logit_diff:.3f}"]
        lines += [f"  {label:16s} {value:+8.3f}" for label, value in self.top(n)]
        return "\n".join(lines)

    def _summary(self) -> str:
        top = ", ".join(f"{label} {value:+.3g}" for label, value in self.top(3))
        at = self.tokens[self.position] if self.tokens else ""
        return (f"logit {self.answers[0]!r} - {self.answers[1]!r} at {at!r}: {self.logit_diff:+.3f} over "
                f"{len(self.labels)} components; top: {top}")

    def _view(self) -> str:
        from mlxterp.plugin import heatmap_html

        value = dict(zip(self.labels, self.values))
        layers = sorted({int(label[1:].split(" ")[0].split("H")[0]) for label in self.labels if label[:1] == "L"})
        heads = [f"H{h}" for h in range(self.n_heads)]
        table = [[sum(v for label, v in value.items() if label.startswith(f"L{i}H") or label in (f"L{i} attn", f"L{i} attn bias")),
                  value.get(f"L{i} mlp", 0.0)] + [value.get(f"L{i}{h}", 0.0) for h in heads] for i in layers]
        others = ", ".join(f"{label} {v:+.3g}" for label, v in value.items() if label[:1] != "L")
        at = self.tokens[self.position] if self.tokens else ""
        return heatmap_html([f"L{i}" for i in layers], ["attn", "mlp"] + heads, table,
                            title=f"Direct logit attribution of {self.answers[0]!r} - {self.answers[1]!r} at {at!r}",
                            subtitle=f"total {self.logit_diff:+.3f}; {others}", row_name="layer",
                            column_name="component", flip=True)

    def plot(self, path: str | Path | None = None, figsize=(14, 6)):
        from .plots import dla_plot

        return dla_plot(self, path, figsize)


@attrs.frozen(repr=False)
class AttentionPatterns(Display, Serialisable):
    """Attention probabilities of one layer: ``patterns[k]`` is head ``heads[k]``'s (T, T)
    matrix, rows the attending (query) tokens, columns the attended (key) tokens."""

    text: str
    tokens: list[str]
    layer: int
    heads: list[int]
    patterns: list[list[list[float]]]

    def __getitem__(self, head: int) -> list[list[float]]:
        return self.patterns[index_of(self.heads, head, "head", type(self).__name__)]

    def _summary(self) -> str:
        head = f"layer {self.layer}, {len(self.heads)} heads x {len(self.tokens)} tokens, {short(self.text)}"
        link = strongest_link(self.patterns)
        if link is None:
            return head
        k, query, key, weight = link
        return (f"{head}; strongest link past the first token: head {self.heads[k]} "
                f"{self.tokens[query]!r} -> {self.tokens[key]!r} {weight:.2f}")

    def _view(self) -> str:
        from mlxterp.plugin import attention_html

        return attention_html(self.tokens, [self.patterns], [self.layer], self.heads, title=f"Attention: {self.text}")

    def plot(self, path: str | Path | None = None, columns: int = 3, cell: float = 4.0):
        from .plots import attention_plot

        return attention_plot(self, path, columns, cell)


@attrs.frozen(repr=False)
class AttentionLayers(Display, Serialisable, LayerMapping):
    """Attention probabilities of several layers: ``result[layer]`` is that layer's
    AttentionPatterns; ``patterns`` is (layers, heads, T, T). ``to_html`` lets one pick the
    layer and the head."""

    text: str
    tokens: list[str]
    layers: list[int]
    heads: list[int]
    patterns: list[list[list[list[float]]]]

    def __getitem__(self, layer: int) -> AttentionPatterns:
        k = self._position(layer)
        return AttentionPatterns(self.text, self.tokens, self.layers[k], self.heads, self.patterns[k])

    def _summary(self) -> str:
        head = f"{len(self.layers)} layers x {len(self.heads)} heads x {len(self.tokens)} tokens, {short(self.text)}"
        links = [(link, layer) for layer, p in zip(self.layers, self.patterns) if (link := strongest_link(p))]
        if not links:
            return head
        (k, query, key, weight), layer = max(links, key=lambda item: item[0][3])
        return (f"{head}; strongest link past the first token: L{layer}H{self.heads[k]} "
                f"{self.tokens[query]!r} -> {self.tokens[key]!r} {weight:.2f}")

    def _view(self) -> str:
        from mlxterp.plugin import attention_html

        return attention_html(self.tokens, self.patterns, self.layers, self.heads, title=f"Attention: {self.text}")

    def plot(self, layer: int, path: str | Path | None = None, columns: int = 3, cell: float = 4.0):
        return self[layer].plot(path, columns, cell)


@attrs.frozen(repr=False)
class SteeringVector(Display, Serialisable):
    """A direction in the residual stream: mean(positive) - mean(negative) activations at
    ``name`` (a standard name such as ``layers.12.output``)."""

    name: str
    layer: int
    position: str
    vector: list[float]
    positive: list[str]
    negative: list[str]
    positive_projections: list[float]  # each prompt's activation . unit vector
    negative_projections: list[float]

    @property
    def array(self):
        import mlx.core as mx

        return mx.array(self.vector)

    @property
    def norm(self) -> float:
        return sum(v * v for v in self.vector) ** 0.5

    def interventions(self, scale: float = 1.0, positions=None, layers: list[int] | None = None) -> dict:
        """``{name: iv.add_vector(scale * vector)}`` at this vector's site (or the same site of
        other ``layers``), optionally restricted to ``positions``: ready for ``trace`` and
        ``generate``."""
        from mlxterp.plugin import interventions as iv

        edit = iv.add_vector(self.array * scale)
        if positions is not None:
            edit = edit.at(positions=positions)
        sub = self.name.split(".", 2)[2]
        return {f"layers.{layer}.{sub}": edit for layer in (layers or [self.layer])}

    def _summary(self) -> str:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else float("nan")

        return (f"{self.name} ({self.position} position), dim {len(self.vector)}, norm {self.norm:.3g}; "
                f"{len(self.positive)} positive / {len(self.negative)} negative prompts, mean projection "
                f"{mean(self.positive_projections):+.3g} / {mean(self.negative_projections):+.3g}")

    def plot(self, path: str | Path | None = None, figsize=(8, 4)):
        from .plots import steering_plot

        return steering_plot(self, path, figsize)


@attrs.frozen(repr=False)
class GenerationResult(Display, Serialisable):
    """A generated continuation. ``activations[k]`` holds what was captured in forward pass
    k: pass 0 is the prompt, pass k > 0 the step that consumed generated token k - 1 (not
    serialised)."""

    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    activations: list[Any] = attrs.field(factory=list, eq=False)

    def to_data(self) -> dict[str, Any]:
        data = super().to_data()
        data.pop("activations")
        return data

    def _summary(self) -> str:
        captured = f", {len(self.activations)} passes captured" if self.activations else ""
        return (f"{short(self.prompt)} -> {short(self.text)}, {len(self.tokens)} new tokens, "
                f"finished by {self.finish_reason}{captured}")


def strongest_link(patterns: list[list[list[float]]]) -> tuple[int, int, int, float] | None:
    """(head index, query, key, weight) of the largest attention weight that is neither to the
    first token nor to the query itself, or None for fewer than 3 tokens."""
    import numpy as np

    array = np.asarray(patterns, dtype=np.float32)  # (H, T, T)
    if array.ndim != 3 or array.shape[-1] < 3:
        return None
    masked = array.copy()
    masked[:, :, 0] = -1
    masked[:, np.arange(array.shape[1]), np.arange(array.shape[2])] = -1
    k, query, key = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return int(k), int(query), int(key), float(array[k, query, key])


@attrs.frozen(repr=False)
class PromptCheck(Display, Serialisable):
    """How the model ranks each token of an expected ``answer`` after ``prompt`` (TransformerLens's
    ``test_prompt``): for answer token i, its rank (0 = the top prediction), probability and
    logit given the prompt and the answer's tokens before it, and the top-k predictions there."""

    prompt: str
    answer_tokens: list[str]
    ranks: list[int]
    probabilities: list[float]
    logits: list[float]
    top: list[list[tuple[str, float]]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.ranks)
        if not -n <= i < n:
            raise IndexError(f"answer token {i} out of range: the answer has {n} tokens (0..{n - 1}, or negative from the end).")
        return {"token": self.answer_tokens[i], "rank": self.ranks[i], "probability": self.probabilities[i],
                "logit": self.logits[i], "top": self.top[i]}

    def __len__(self) -> int:
        return len(self.ranks)

    def _summary(self) -> str:
        parts = [f"{t!r} rank {r} ({p:.2%})" for t, r, p in zip(self.answer_tokens, self.ranks, self.probabilities)]
        top = ", ".join(f"{t!r} {p:.1%}" for t, p in self.top[0][:3])
        return f"{short(self.prompt)}: {'; '.join(parts[:4])}{' ...' if len(parts) > 4 else ''}; top first: {top}"
