"""Feature interventions: set transcoder features to values and read the new logits and
features, either in the frozen replacement model (``constrained=True``: attention patterns,
normalisation scales and every MLP output frozen, so a change is exactly what the attribution
graph's edges predict) or in the real model (``constrained=False``: the feature is clamped
where it is read and everything downstream responds), as circuit-tracer's
``feature_intervention``.

A feature set to ``value`` writes ``(value - its activation) * W_dec`` at its layer's MLP output
(a cross-layer transcoder's at every later layer's too): the clean activation when
constrained, the live one (the features of the MLP's live input) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Display, Hooks, options, token_text

from .attribution import _check_transcoders
from .replacement import GraphError, Replacement, prompt_ids


@attrs.define(eq=False, repr=False)
class FeatureIntervention(Display):
    """What setting features did: ``logits`` (T, V) and ``clean_logits`` (T, V) float32, the
    transcoder pre-activations of the run ``pre_activations`` (L, T, F) (position 0 zeroed,
    as in the graph) and ``activations`` (the features), the ``interventions`` made (layer,
    position, feature, value), whether ``constrained`` and whether attention was frozen."""

    tokens: list[int]
    token_strings: list[str]
    interventions: list[tuple[int, int, int, float]]
    logits: np.ndarray
    clean_logits: np.ndarray
    pre_activations: np.ndarray
    feature_activations: np.ndarray
    constrained: bool
    freeze_attention: bool
    next_token_strings: dict[int, str] = attrs.field(factory=dict)

    @property
    def activations(self) -> np.ndarray:
        """(L, T, F) the features of the run (position 0 zeroed)."""
        return self.feature_activations

    def logit_change(self, position: int = -1) -> np.ndarray:
        """(V,) how every logit at ``position`` moved."""
        return self.logits[position] - self.clean_logits[position]

    def top_tokens(self, k: int = 5, position: int = -1) -> list[tuple[str, float, float]]:
        """The ``k`` most probable next tokens after the intervention: (text, probability,
        probability before)."""
        after, before = _softmax(self.logits[position]), _softmax(self.clean_logits[position])
        top = np.argsort(-after, kind="stable")[:k]
        return [(self.next_token_strings.get(int(t), str(int(t))), float(after[t]), float(before[t])) for t in top]

    def _summary(self) -> str:
        mode = "constrained" if self.constrained else ("frozen attention" if self.freeze_attention else "live")
        (text, p, p0), = self.top_tokens(1)
        before = _softmax(self.clean_logits[-1])
        was = int(np.argmax(before))
        was_text = self.next_token_strings.get(was, str(was))
        return (f"feature intervention ({len(self.interventions)} edit{'s' * (len(self.interventions) != 1)}, {mode}): "
                f"top next token {was_text!r} p={float(before[was]):.3f} -> {text!r} p={p:.3f}")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x.astype(np.float64) - x.max())
    return (z / z.sum()).astype(np.float32)


def feature_intervention(
    model,
    prompt,
    interventions: Sequence[tuple[int, int, int, float]],
    transcoders,
    *,
    constrained: bool = True,
    freeze_attention: bool | None = None,
) -> FeatureIntervention:
    """Set features ``[(layer, position, feature, value), ...]`` of ``transcoders`` on
    ``prompt`` and return the new logits and features (see the module doc).

    ``constrained=True``: in the frozen replacement model the attribution graph describes;
    the change of a target's pre-activation or demeaned logit is the sum of the graph's edges
    from the edited features times their activation change. ``constrained=False``: effects
    propagate through the real MLPs and normalisations; ``freeze_attention`` (default: as
    ``constrained``) keeps the attention patterns of the clean run.
    """
    tc = _check_transcoders(transcoders, model)
    ids = prompt_ids(model, prompt)
    rep = Replacement(model, tc, ids)
    edits = _edits(interventions, rep)
    freeze_attention = constrained if freeze_attention is None else bool(freeze_attention)
    if constrained:
        writes = _writes(rep, edits, {layer: rep.post[layer] for layer in tc.layers})
        out = rep.frozen_pass(1, writes=writes, targets=[*rep.read_names, "logits"])
        logits, reads = out["logits"][0], [out[name][0] for name in rep.read_names]
    else:
        logits, reads = _live(rep, edits, freeze_attention)
    keep = (mx.arange(rep.n_pos) >= rep.zero_positions)[:, None]
    pre = mx.stack([mx.where(keep, tc.pre_acts(x, layer), 0.0) for layer, x in zip(tc.layers, reads)])
    post = mx.stack([mx.where(keep, tc.activate(tc.pre_acts(x, layer), layer), 0.0) for layer, x in zip(tc.layers, reads)])
    mx.eval(logits, pre, post)
    vocab = {int(t) for t in np.argsort(-rep.logits[-1])[:20]} | {int(t) for t in np.argsort(-np.array(logits[-1]))[:20]}
    return FeatureIntervention(
        tokens=ids, token_strings=[token_text(model, i) for i in ids],
        interventions=[(layer, pos, feat, float(value)) for layer, pos, feat, value in edits],
        logits=np.array(logits.astype(mx.float32)), clean_logits=rep.logits, pre_activations=np.array(pre),
        feature_activations=np.array(post), constrained=bool(constrained), freeze_attention=freeze_attention,
        next_token_strings={t: token_text(model, t) for t in vocab},
    )


def _edits(interventions, rep: Replacement) -> list[tuple[int, int, int, float]]:
    tc, T = rep.tc, rep.n_pos
    if isinstance(interventions, tuple) and len(interventions) == 4 and not isinstance(interventions[0], (tuple, list)):
        interventions = [interventions]
    edits = []
    for item in interventions:
        try:
            layer, pos, feat, value = item
        except (TypeError, ValueError):
            raise GraphError(f"intervention {item!r}: give (layer, position, feature, value) tuples.") from None
        layer = options.index(layer, rep.n_layers, "interventions", "layer")
        pos = options.index(pos, T, "interventions", "position")
        feat = options.index(feat, tc.d_features, "interventions", "feature")
        value = options.number(value, "interventions value")
        edits.append((layer, pos, feat, value))
    return edits


def _writes(rep: Replacement, edits, current: dict[int, mx.array], layers: Sequence[int] | None = None) -> dict[int, mx.array]:
    """{MLP layer: (1, T, d)} what the edits write, each ``(value - current) * W_dec`` at its
    layer and (a CLT) every later one; only the edits of ``layers`` (all by default)."""
    tc, T, d = rep.tc, rep.n_pos, rep.d_model
    writes: dict[int, Any] = {}
    for layer, pos, feat, value in edits:
        if layers is not None and layer not in layers:
            continue
        q = tc.layers.index(layer)
        delta = value - current[layer][pos, feat]
        rows = tc.W_dec[q][feat].astype(mx.float32)  # (S, d)
        onehot = mx.array((np.arange(T) == pos).astype(np.float32))[:, None]
        for s in range(rows.shape[0]):
            target = tc.layers[q + s] if tc.kind == "clt" else layer
            writes[target] = writes.get(target, 0) + onehot * (delta * rows[s])
    return {layer: w[None] for layer, w in writes.items()}


def _live(rep: Replacement, edits, freeze_attention: bool):
    """The real model with the edits clamped at their layers (features from the live MLP
    input), the attention patterns frozen or not: (logits (T, V), reads per layer (T, d))."""
    tc = rep.tc
    by_layer = {layer for layer, *_ in edits}
    pending: dict[int, mx.array] = {}
    box: dict[str, Any] = {}
    interventions: dict[str, Any] = {}
    if freeze_attention:
        for r in rep._pattern:
            clean = rep.patterns[r.site]
            interventions[r.name] = lambda p, clean=clean: clean.astype(p.dtype)
    keep = (mx.arange(rep.n_pos) >= rep.zero_positions)[:, None]

    def mlp(layer):
        read = rep._read[layer]

        def fn(y):
            if layer in by_layer:
                x = read.read(box["hooks"].recorded[read.site])[0].astype(mx.float32)
                live = mx.where(keep, tc.activate(tc.pre_acts(x, layer), layer), 0.0)
                for target, w in _writes(rep, edits, {layer: live}, layers=[layer]).items():
                    pending[target] = pending.get(target, 0) + w
            if layer in pending:
                return (y.astype(mx.float32) + pending[layer]).astype(y.dtype)
            return y
        return fn

    for layer, r in enumerate(rep._mlp):
        interventions[r.name] = mlp(layer)
    with Hooks(rep.model, interventions, capture=[*rep.read_names, "logits"]) as hooks:
        box["hooks"] = hooks
        _, rec = hooks(mx.array([rep.ids]))
    site = lambda name: rep.arch.resolve(name)[0]  # noqa: E731
    logits = site("logits").read(rec[site("logits").site])[0].astype(mx.float32)
    reads = [r.read(rec[r.site])[0].astype(mx.float32) for r in rep._read]
    return logits, reads


__all__ = ["FeatureIntervention", "feature_intervention"]
