"""What a graph's features do, for its view: each feature's logit effects (its decoder rows,
summed over the layers it writes, read through the unembedding: the tokens it promotes and
suppresses directly) and its top activating contexts in a corpus.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mlxterp.plugin import Hooks, default_corpus, options, progress_bar, token_text, token_windows

from .attribution import _check_transcoders


def describe_features(graph, model, transcoders, *, nodes=None, corpus: Any = None, n_examples: int = 3,
                      max_tokens: int = 8192, context_size: int = 64, n_logits: int = 5, progress: bool = True):
    """Fill ``graph.feature_details`` (and return the graph) for the feature nodes ``nodes``:
    node indices, or None for those the default pruning keeps. For each: the ``n_logits``
    tokens its decoder promotes and suppresses most, and its ``n_examples`` top activating
    contexts in ``corpus`` (texts; None: the offline default corpus, ``max_tokens`` of it;
    ``n_examples=0``: none)."""
    tc = _check_transcoders(transcoders, model)
    n_examples = options.integer(n_examples, "n_examples", low=0)
    n_logits = options.integer(n_logits, "n_logits", low=1)
    if nodes is None:
        keep = graph.prune().node_mask[: graph.n_selected]
        nodes = np.flatnonzero(keep)
    nodes = [int(n) for n in nodes]
    for n in nodes:
        if not 0 <= n < graph.n_selected:
            raise options.OptionError(f"node {n} is not a feature node: they are 0..{graph.n_selected - 1}.")
    features = sorted({(int(graph.features[n, 0]), int(graph.features[n, 2])) for n in nodes})
    if not features:
        return graph
    details = {f"{layer}_{feat}": {} for layer, feat in features}
    _logit_effects(model, tc, features, details, n_logits)
    if n_examples:
        _examples(model, tc, features, details, corpus, n_examples, max_tokens, context_size, progress)
    graph.feature_details.update(details)
    return graph


def _logit_effects(model, tc, features, details, k: int, chunk: int = 256) -> None:
    arch = model.architecture
    zero = arch.unembed(mx.zeros((1, arch.d_model), dtype=mx.float32), softcap=False).astype(mx.float32)
    for start in range(0, len(features), chunk):
        part = features[start:start + chunk]
        directions = mx.stack([tc.W_dec[tc.layers.index(layer)][feat].astype(mx.float32).sum(axis=0) for layer, feat in part])
        logits = arch.unembed(directions, softcap=False).astype(mx.float32) - zero
        logits = np.array(logits - logits.mean(axis=-1, keepdims=True))
        for (layer, feat), row in zip(part, logits):
            order = np.argsort(row)
            entry = details[f"{layer}_{feat}"]
            entry["top_logits"] = [[token_text(model, int(t)), round(float(row[t]), 4)] for t in order[::-1][:k]]
            entry["bottom_logits"] = [[token_text(model, int(t)), round(float(row[t]), 4)] for t in order[:k]]


def _examples(model, tc, features, details, corpus, k, max_tokens, context_size, progress) -> None:
    layers = sorted({layer for layer, _ in features})
    wanted = {layer: [feat for l, feat in features if l == layer] for layer in layers}
    names = [f"layers.{layer}.{tc.reads}" for layer in layers]
    best: dict[tuple[int, int], list[tuple[float, list[int], int]]] = {f: [] for f in features}
    corpus = default_corpus() if corpus is None else corpus
    with Hooks(model, {}, capture=names, stop_after="auto") as hooks, progress_bar(max_tokens, "feature examples", progress, "tok") as bar:
        for windows in token_windows(model, corpus, context_size, max_tokens=max_tokens):
            _, rec = hooks(mx.array(windows.tokens))
            real = np.arange(windows.tokens.shape[1])[None, :] < windows.lengths[:, None]
            real &= ~windows.bos
            for layer, name in zip(layers, names):
                site = model.architecture.resolve(name)[0]
                acts = np.array(tc.encode(site.read(rec[site.site]).astype(mx.float32), layer)[..., mx.array(wanted[layer])])
                acts = np.where(real[..., None], acts, 0)
                for j, feat in enumerate(wanted[layer]):
                    column = acts[..., j]
                    top = np.argsort(column, axis=None)[::-1][:k]
                    for flat in top:
                        row, pos = np.unravel_index(flat, column.shape)
                        if column[row, pos] > 0:
                            best[layer, feat].append((float(column[row, pos]), windows.tokens[row].tolist(), int(pos)))
                    best[layer, feat] = sorted(best[layer, feat], key=lambda e: -e[0])[:k]
            bar.update(int(windows.lengths.sum()))
    for (layer, feat), entries in best.items():
        details[f"{layer}_{feat}"]["examples"] = [[round(value, 4), _context(model, tokens, pos)] for value, tokens, pos in entries]


def _context(model, tokens: list[int], pos: int, before: int = 8, after: int = 3) -> str:
    left = "".join(token_text(model, t) for t in tokens[max(0, pos - before):pos])
    right = "".join(token_text(model, t) for t in tokens[pos + 1:pos + 1 + after])
    return f"{left}[{token_text(model, tokens[pos])}]{right}".replace("\n", "\u21b5")


__all__ = ["describe_features"]
