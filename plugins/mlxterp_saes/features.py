"""Exploring features: top-activating examples over a corpus, steering, ablation and
attribution of a metric to features (gradient x activation through the splice, the error term
as its own node).

``top_activations`` streams the corpus once: for the features asked for it keeps, per feature,
the ``n_examples`` largest activations (ties broken by corpus order, so the result does not
depend on how the corpus is batched), every positive activation's value for the quantiles, and
how often each fires (its density). Each example is the window around the token: ``prefix``
tokens before it and ``suffix`` after, with the feature's activation on every one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Display, Serialisable, options

from .sae import SAE, SAEError


@attrs.frozen(repr=False)
class Example(Display):
    """One context: its tokens, the feature's activation on each, and which token is the one
    (``index``) with ``activation``; ``document`` and ``position`` locate it in the corpus."""

    tokens: list[str]
    values: list[float]
    index: int
    activation: float
    document: int
    position: int

    def _summary(self) -> str:
        before = "".join(self.tokens[max(0, self.index - 6): self.index])
        after = "".join(self.tokens[self.index + 1: self.index + 3])
        context = f"{before[-40:]}[{self.tokens[self.index][:20]}]{after[:20]}" if self.tokens else ""
        return f"{context!r} {self.activation:.4g}, document {self.document} position {self.position}"


@attrs.frozen(repr=False)
class FeatureExamples(Serialisable, Display):
    """``top_activations``: per feature its top examples, quantile examples, density."""

    site: str
    features: list[int]
    n_tokens: int
    density: list[float]  # fraction of tokens on which each feature fires
    max_activation: list[float]
    quantiles: list[list[float]]  # per feature: the activation at each quantile edge (positive values)
    top: list[list[Example]]  # per feature, largest first
    by_quantile: list[list[list[Example]]]  # per feature, per quantile band, a few examples

    def __getitem__(self, feature: int) -> list[Example]:
        """The top examples of ``feature``."""
        if feature not in self.features:
            raise SAEError(f"feature {feature} was not collected; these were: {self.features}.")
        return self.top[self.features.index(feature)]

    def _summary(self) -> str:
        shown = ", ".join(f"{f} (density {d:.2%})" for f, d in list(zip(self.features, self.density))[:3])
        return f"{len(self.features)} features at {self.site} over {self.n_tokens} tokens: {shown}"

    def plot(self, path=None):
        from mlxterp.plugin import figure_text, finish, pyplot

        plt = pyplot()

        n = len(self.features)
        fig, axes = plt.subplots(n, 1, figsize=(8, 1.2 + 1.6 * n), squeeze=False)
        for ax, feature, examples, density in zip(axes[:, 0], self.features, self.top, self.density):
            labels = [("".join(e.tokens[max(0, e.index - 4): e.index]) + "[" + e.tokens[e.index] + "]").replace("\n", "\\n")
                      for e in examples[:8]]  # one line per bar
            ax.barh(range(len(labels))[::-1], [e.activation for e in examples[:8]])
            ax.set_yticks(range(len(labels))[::-1], [figure_text(label[-40:]) for label in labels], fontsize=7)
            ax.set_title(f"feature {feature} at {self.site}: density {density:.2%}", fontsize=9)
        fig.tight_layout()
        return finish(fig, path)

    def _view(self) -> str:
        from mlxterp.plugin import token_heatmap_html

        parts = []
        for feature, examples, density in zip(self.features, self.top, self.density):
            if not examples:
                continue
            parts.append(token_heatmap_html([e.tokens for e in examples], [e.values for e in examples],
                                            title=f"feature {feature} at {self.site} (density {density:.2%})"))
        return "<div>" + "".join(parts) + "</div>"


def top_activations(
    sae: SAE,
    model,
    texts,
    features: int | Sequence[int],
    *,
    n_examples: int = 20,
    n_quantiles: int = 5,
    per_quantile: int = 3,
    n_tokens: int | None = 32_768,
    context_size: int = 128,
    batch_size: int = 8,
    prefix: int = 12,
    suffix: int = 4,
    progress: bool | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> FeatureExamples:
    """The top-activating contexts of ``features`` over ``texts`` (see the module doc; a corpus
    path is decoded with ``encoding`` and ``errors``, see ``mlxterp.read_documents``)."""
    from mlxterp.plugin import progress_over, site_batches, token_windows, trainable

    chosen = _features(sae, features)
    n_examples, n_quantiles = options.integer(n_examples, "n_examples", 1), options.integer(n_quantiles, "n_quantiles", 1)
    per_quantile, prefix, suffix = (options.integer(v, name, 0) for name, v in
                                    (("per_quantile", per_quantile), ("prefix", prefix), ("suffix", suffix)))
    n_tokens = None if n_tokens is None else options.integer(n_tokens, "n_tokens", 1)
    if model.tokenizer is None:
        raise SAEError("top_activations reads texts: the model needs a tokenizer.")
    select = mx.array(chosen)
    token_rows, value_rows, keep_rows, doc_rows, pos_rows = [], [], [], [], []
    windows = token_windows(model, texts, context_size, batch_size=batch_size, max_tokens=n_tokens,
                            encoding=encoding, errors=errors)
    windows = progress_over(windows, n_tokens, "top_activations", progress is not False, "tok", lambda b: b.n_tokens)
    for batch, acts, _ in site_batches(model, windows, [sae.cfg.site]):
        values = mx.take(sae.encode(acts[sae.cfg.site]), select, axis=-1)  # (B, T, F)
        keep = trainable(batch)
        for b in range(len(batch)):
            n = int(batch.lengths[b])
            token_rows.append(batch.tokens[b, :n])
            value_rows.append(np.asarray(values[b, :n]))
            keep_rows.append(keep[b, :n])
            doc_rows.append(batch.document[b, :n])
            pos_rows.append(batch.position[b, :n])
    if not token_rows:
        raise SAEError("the texts hold no tokens.")
    lengths = np.array([len(t) for t in token_rows])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(value_rows)  # (N, F), corpus order
    keep = np.concatenate(keep_rows)
    counted = int(keep.sum())
    masked = np.where(keep[:, None], values, -np.inf)
    pieces = {}

    def example(flat: int, column: int) -> Example:
        row = int(np.searchsorted(starts, flat, side="right") - 1)
        at = flat - starts[row]
        lo, hi = max(0, at - prefix), min(lengths[row], at + suffix + 1)
        ids = token_rows[row][lo:hi]
        key = tuple(ids.tolist())
        if key not in pieces:
            pieces[key] = [model.token_to_str(int(t)) for t in ids]
        return Example(tokens=pieces[key], values=value_rows[row][lo:hi, column].astype(float).tolist(),
                       index=int(at - lo), activation=float(values[flat, column]),
                       document=int(doc_rows[row][at]), position=int(pos_rows[row][at]))

    top, by_quantile, quantiles, density, maxima = [], [], [], [], []
    for column in range(len(chosen)):
        v = masked[:, column]
        positive = np.flatnonzero(v > 0)
        density.append(len(positive) / max(counted, 1))
        maxima.append(float(v[positive].max()) if len(positive) else 0.0)
        # largest first; equal values in corpus order (a stable sort of the negated values)
        order = positive[np.argsort(-v[positive], kind="stable")]
        top.append([example(int(i), column) for i in order[:n_examples]])
        edges = np.quantile(v[positive], np.linspace(0, 1, n_quantiles + 1)).tolist() if len(positive) else []
        quantiles.append(edges)
        bands = []
        for q in range(n_quantiles if edges else 0):
            inside = positive[(v[positive] >= edges[q]) & ((v[positive] < edges[q + 1]) | (q == n_quantiles - 1))]
            bands.append([example(int(i), column) for i in inside[:per_quantile]])
        by_quantile.append(bands)
    return FeatureExamples(site=sae.site if not sae.cfg.is_transcoder else sae.cfg.site, features=chosen,
                           n_tokens=counted, density=density, max_activation=maxima, quantiles=quantiles,
                           top=top, by_quantile=by_quantile)


# -- steering and ablation --------------------------------------------------------------------


def steer(sae: SAE, feature: int, scale: float, positions=None) -> dict[str, Callable]:
    """Interventions that add ``scale * W_dec[feature]`` at the SAE's site, for ``trace``,
    ``run`` and ``generate`` (no splice needed): ``model.generate(p, interventions=sae.steer(3, 8.0))``."""
    from mlxterp.plugin import interventions as iv

    add = iv.add_vector(options.number(scale, "scale") * sae.direction(feature))
    return {sae.site: add if positions is None else add.at(positions=positions)}


def ablate(sae: SAE, features: int | Sequence[int], value: float = 0.0, positions=None) -> dict[str, Callable]:
    """Interventions that set ``features`` to ``value`` (0: ablate; else clamp) through the
    splice: use with ``saes=[sae]``. With the error term on, the site moves by exactly
    ``(value - f_i) * W_dec[i]``."""
    from mlxterp.plugin import interventions as iv

    chosen = _features(sae, features)
    value = options.number(value, "value")
    mask = mx.array(np.isin(np.arange(sae.cfg.d_sae), chosen))
    edit = iv.Intervention(lambda f: mx.where(mask, mx.array(value, dtype=f.dtype), f),
                           f"set features {chosen} to {value}")
    return {sae.feature_name("features"): edit if positions is None else edit.at(positions=positions)}


def _features(sae: SAE, features: int | Sequence[int]) -> list[int]:
    """Feature indices (one or a non-empty list), each checked against the SAE's width."""
    if isinstance(features, (int, np.integer)) and not isinstance(features, bool):
        features = [features]
    if isinstance(features, (str, bytes)) or not isinstance(features, (Sequence, np.ndarray)) or not len(features):
        raise SAEError(f"features={features!r:.60}: give a feature index or a non-empty list of them.")
    for f in features:
        sae.direction(f)  # range check
    return [int(f) for f in features]


# -- attribution --------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class FeatureAttribution(Serialisable, Display):
    """Gradient x activation of a metric to every (position, feature) of an SAE and to its
    error term: the first-order change of the metric if that feature (or the error) were
    zero-ablated is minus its effect. ``effects[t][j]`` is the effect of feature
    ``top_features[j]`` at position t; ``error[t]`` the error term's."""

    site: str
    text: str
    tokens: list[str]
    metric: str
    metric_value: float
    top_features: list[int]
    total_effect: list[float]  # per top feature, summed over positions
    effects: list[list[float]]
    error: list[float]
    all_features: list[float]  # per position, the effect of every feature together

    def _summary(self) -> str:
        shown = ", ".join(f"{f}: {e:+.3f}" for f, e in list(zip(self.top_features, self.total_effect))[:3])
        return f"{self.metric} = {self.metric_value:.3f} at {self.site}; top features {shown}; error {sum(self.error):+.3f}"

    def plot(self, path=None):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()

        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(self.top_features) + 2), 3))
        labels = [str(f) for f in self.top_features] + ["error"]
        ax.bar(labels, self.total_effect + [sum(self.error)], color=["C0"] * len(self.top_features) + ["C7"])
        ax.set(title=f"attribution of {self.metric} at {self.site}", xlabel="feature", ylabel="gradient x activation")
        fig.tight_layout()
        return finish(fig, path)


def feature_attribution(
    sae: SAE,
    model,
    text,
    metric: Callable[[mx.array], mx.array] | None = None,
    answer=None,
    top: int = 10,
) -> FeatureAttribution:
    """Attribute ``metric`` (logits (1, T, V) -> scalar; default: the log-probability of
    ``answer``, else of the model's top prediction, at the last position) to the SAE's
    features and its error term, by gradient x activation through the splice. The effects and
    the error's add up to ``(x - b_dec) . dM/dx`` at the site (exactly, to float rounding).
    """
    from mlxterp.plugin import token_ids, token_text
    from mlxterp.plugin import Hooks

    ids = token_ids(model, text)
    inputs = mx.array([ids])
    if metric is None:
        logits = model.run(inputs, saes=[sae], capture=["logits"]).activations["logits"]
        target = int(mx.argmax(logits[0, -1]).item()) if answer is None else _answer(model, answer)

        def metric(logits, target=target):
            last = logits[0, -1].astype(mx.float32)
            return last[target] - mx.logsumexp(last)

        metric.__name__ = f"log p({token_text(model, target)!r})"
    features, error = sae.feature_name("features"), sae.feature_name("error")
    T = len(ids)

    def value(deltas):
        edits = {features: lambda f: f + deltas[0], error: lambda e: e + deltas[1]}
        with Hooks(model, edits, capture=[features, error, "logits"], saes=[sae]) as hooks:
            logits, recorded = hooks(inputs, evaluate=False)
        return metric(logits), (recorded[features], recorded[error])

    d_out = sae.cfg.d_out or sae.cfg.d_in
    zeros = [mx.zeros((1, T, sae.cfg.d_sae)), mx.zeros((1, T, d_out))]
    (m, (f, e)), (g_f, g_e) = mx.value_and_grad(value)(zeros)
    effect = (f * g_f)[0]  # (T, d_sae)
    err = (e * g_e).sum(axis=-1)[0]  # (T,)
    total = effect.sum(axis=0)
    order = mx.argsort(-mx.abs(total))[:top]
    chosen = [int(i) for i in order.tolist()]
    return FeatureAttribution(
        site=sae.site, text=text if isinstance(text, str) else model.decode(ids),
        tokens=[token_text(model, t) for t in ids], metric=getattr(metric, "__name__", "metric"),
        metric_value=float(m.item()), top_features=chosen, total_effect=mx.take(total, order).tolist(),
        effects=mx.take(effect, order, axis=1).tolist(), error=err.tolist(), all_features=effect.sum(axis=-1).tolist(),
    )


def _answer(model, answer) -> int:
    if isinstance(answer, (int, np.integer)):
        return int(answer)
    ids = model.encode(answer)
    if len(ids) != 1:
        raise SAEError(f"answer {answer!r} is {len(ids)} tokens; give one token (or its id).")
    return ids[0]


__all__ = ["Example", "FeatureAttribution", "FeatureExamples", "ablate", "feature_attribution", "steer", "top_activations"]
