"""Collect activations at sites and positions, and sweep probes over the sites.

``model.probe(texts, labels)`` traces the prompts in right-padded batches with a capture filter
(the embeddings and every layer's output by default), summarises each prompt at one position
(its last real token, the mean over its real tokens, or a given index), fits a probe per site on
a group split, and reports held-out accuracy and AUROC. ``probe_dataset`` does the same from an
``ActivationDataset`` whose documents carry the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxterp.plugin import InputError, OptionError, options, progress_over, site_batches

from .fitting import auroc, fit, fit_logistic_sites, split_groups
from .results import ProbeSweep

MAX_STORED_PROJECTIONS = 2000


def probe_sites(model, layers: list[int] | None = None, component: str = "output", include_embed: bool = True) -> list[str]:
    arch = model.architecture_or_raise("probes")
    layers = options.layers(layers, arch.n_layers)
    return (["embed"] if include_embed else []) + [f"layers.{i}.{component}" for i in layers]


def collect(model, texts: Sequence, sites: list[str], position="last", batch_size: int = 16,
            progress: bool | None = None) -> mx.array:
    """(S, N, D) float32: one vector per prompt and site; ``position`` is "last", "mean" or an
    index into each prompt (negative counts from its last real token). The prompts run through
    the activation stream in right-padded batches, each forward stopped after the last layer
    probed."""
    if not texts:
        raise InputError("probes need at least one prompt.")
    if position not in ("last", "mean") and not isinstance(position, int):
        raise InputError(f"position={position!r}: use 'last', 'mean' or an int.")
    batches = (model.prepare_inputs(list(texts[start : start + batch_size])) for start in range(0, len(texts), batch_size))
    batches = progress_over(batches, len(texts), "probe", progress is not False, "prompt", lambda b: len(b.lengths))
    parts = []
    for inputs, acts, _ in site_batches(model, batches, sites):
        lengths = mx.array(inputs.lengths)
        rows = mx.arange(len(inputs.lengths))
        summaries = []
        for site in sites:
            x = acts[site].astype(mx.float32)  # (B, T, D)
            if position == "last":
                summaries.append(x[rows, lengths - 1])
            elif position == "mean":
                mask = inputs.mask[..., None].astype(mx.float32)
                summaries.append((x * mask).sum(axis=1) / lengths[:, None])
            else:
                index = mx.where(mx.array(position) < 0, lengths + position, mx.array(position))
                if bool(((index < 0) | (index >= lengths)).any().item()):
                    raise InputError(f"position {position} is outside a prompt of the batch (lengths {list(inputs.lengths)}).")
                summaries.append(x[rows, index])
        part = mx.stack(summaries)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=1)


def sweep(
    features: mx.array,
    labels,
    sites: list[str],
    *,
    groups=None,
    method: str = "logistic",
    l2: float = 1e-2,
    test_fraction: float = 0.3,
    seed: int = 0,
    position: str = "last",
    texts: Sequence[str] = (),
) -> ProbeSweep:
    """Fit one probe per site on features (S, N, D) and score it on held-out groups."""
    fit_options(method, l2, test_fraction, seed)
    labels, train, test = split(labels, groups, features.shape[1], test_fraction, seed)
    n = features.shape[1]
    train_index, test_index = mx.array(np.flatnonzero(train)), mx.array(np.flatnonzero(test))
    accuracy, train_accuracy, areas, directions, biases, projections = [], [], [], [], [], []
    if method == "logistic":  # every site's probe in one batched fit
        fitted = fit_logistic_sites(features[:, train_index], labels[train], l2)
    else:
        fitted = [fit(features[s][train_index], labels[train], method, l2) for s in range(len(sites))]
    for s, probe in enumerate(fitted):
        x = features[s]
        logits = np.array(probe.logits(x))
        predicted = logits > 0
        accuracy.append(float((predicted[test] == labels[test].astype(bool)).mean()))
        train_accuracy.append(float((predicted[train] == labels[train].astype(bool)).mean()))
        areas.append(auroc(logits[test], labels[test]))
        directions.append(np.array(probe.direction).tolist())
        biases.append(probe.bias)
        if n <= MAX_STORED_PROJECTIONS:
            unit = probe.direction / (mx.linalg.norm(probe.direction) + 1e-12)
            projections.append(np.array(x @ unit).tolist())
    return ProbeSweep(
        method=method, position=str(position), sites=list(sites), accuracy=accuracy, auroc=areas,
        train_accuracy=train_accuracy, directions=directions, biases=biases,
        n_train=int(train.sum()), n_test=int(test.sum()), labels=labels.astype(int).tolist(),
        texts=[t if isinstance(t, str) else str(t) for t in texts], projections=projections,
    )


def fit_options(method: str, l2: float, test_fraction: float, seed: int) -> None:
    """Check the options of a probe sweep (OptionError naming the option, value and range)."""
    options.choice(method, ("logistic", "mass_mean"), "method")
    options.number(l2, "l2", 0.0, open_low=True)  # Newton's step needs the penalty when a class is separable
    options.number(test_fraction, "test_fraction", 0.0, 1.0, open_low=True, open_high=True)
    options.integer(seed, "seed", 0)


def split(labels, groups, n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, train mask, test mask) for ``n`` examples: one 0/1 label per example, both
    classes on both sides of the group split."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise OptionError(f"labels: {labels.shape[0] if labels.ndim else 'a scalar'} for {n} examples; give one 0/1 label per example.")
    values = set(np.unique(labels).tolist()) if labels.dtype.kind in "biuf" else {None}
    if not values <= {0, 1} or len(values) < 2:
        raise OptionError(f"labels must be 0/1 with both classes present; got the values {sorted(map(str, values))[:6]}.")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise OptionError(f"groups: {groups.shape[0] if groups.ndim else 'a scalar'} for {n} examples; give one group id per example.")
    train, test = split_groups(groups, test_fraction, seed)
    for side, mask in (("training", train), ("test", test)):
        if len(set(labels[mask].tolist())) < 2:
            raise OptionError(f"the {side} split has only one class; give more groups or change seed/test_fraction.")
    return labels.astype(np.int64), train, test


def probe(
    model,
    texts: Sequence[str],
    labels,
    *,
    groups=None,
    layers: list[int] | None = None,
    component: str = "output",
    position="last",
    include_embed: bool = True,
    method: str = "logistic",
    l2: float = 1e-2,
    test_fraction: float = 0.3,
    seed: int = 0,
    batch_size: int = 16,
    plot: bool = False,
    save_path=None,
    progress: bool | None = None,
) -> ProbeSweep:
    """Probe every layer for a binary property of the prompts.

    Args:
        texts: the prompts; ``labels``: 0/1 per prompt; ``groups``: a group id per prompt
            (e.g. the template it came from): a group is never split between training and test.
        layers: probe these layers (default every layer).
        component: probe ``layers[i].<component>`` (default the layer's output), plus the
            embeddings as the baseline when ``include_embed``.
        position: "last" (each prompt's last real token), "mean" or an index.
        method: "logistic" (L2 ``l2`` > 0, standardised features) or "mass_mean".
        test_fraction: about this fraction of the groups, in (0, 1), is held out.
        seed: chooses the held-out groups (>= 0).

    Every option is checked before the first forward pass (an OptionError naming it).

    Returns:
        ProbeSweep: per site the held-out accuracy and AUROC, ``best()``, ``plot()`` and
        ``steering_vector(layer)`` for the steering API.
    """
    texts = options.prompts(texts, "texts")
    fit_options(method, l2, test_fraction, seed)
    split(labels, groups, len(texts), test_fraction, seed)
    batch_size = options.integer(batch_size, "batch_size", 1)
    sites = probe_sites(model, layers, component, include_embed)
    arch = model.architecture_or_raise("probes")
    for site in sites:
        arch.resolve(site)  # a component this family lacks is an error before anything runs
    if isinstance(position, (int, np.integer)) and not isinstance(position, bool):
        position = int(position)
    elif not isinstance(position, str) or position not in ("last", "mean"):
        raise OptionError(f"position={position!r:.60}: use 'last', 'mean' or an int.")
    if isinstance(position, int):
        shortest = min(model.prepare_inputs(texts).lengths)
        if not -shortest <= position < shortest:
            raise OptionError(f"position={position}: the shortest prompt has {shortest} tokens, so it must be in "
                              f"[{-shortest}, {shortest - 1}] (negative counts from each prompt's last token).")
    features = collect(model, texts, sites, position, batch_size, progress)
    result = sweep(features, labels, sites, groups=groups, method=method, l2=l2, test_fraction=test_fraction,
                   seed=seed, position=position, texts=texts)
    if plot:
        result.plot(save_path)
    return result


def probe_dataset(
    dataset,
    labels,
    sites: list[str] | None = None,
    *,
    position: str = "last",
    method: str = "logistic",
    l2: float = 1e-2,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> ProbeSweep:
    """Probe the sites of an ``ActivationDataset`` (default all) for a per-document property:
    ``labels[d]`` is document d's 0/1 label; documents are the groups. ``position`` "last" uses
    each document's last cached token, "mean" its mean over cached non-BOS tokens, "all" every
    non-BOS token (labelled by its document)."""
    options.choice(position, ("last", "mean", "all"), "position")
    fit_options(method, l2, test_fraction, seed)
    sites = list(dataset.sites) if sites is None else [dataset.site_name(s) for s in options.prompts(sites, "sites")]
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "biuf" or not set(np.unique(labels).tolist()) <= {0, 1}:
        raise OptionError(f"labels must be one 0/1 label per document of the dataset; got {labels!r:.60}.")
    document, bos = np.asarray(dataset.document), np.asarray(dataset.bos)
    rows = np.flatnonzero(~bos)
    docs = document[rows]
    if docs.size == 0:
        raise InputError("the dataset has no non-BOS tokens to probe.")
    if docs.max() >= len(labels):
        raise InputError(f"the dataset has documents up to {docs.max()}, but only {len(labels)} labels.")
    if position == "all":
        features = mx.stack([dataset[s][rows].astype(mx.float32) for s in sites])
        return sweep(features, labels[docs], sites, groups=docs, method=method, l2=l2,
                     test_fraction=test_fraction, seed=seed, position=position)
    unique = np.unique(docs)
    if position == "last":
        last = {d: r for d, r in zip(docs, rows)}  # rows are in order: the last one wins
        chosen = np.array([last[d] for d in unique])
        features = mx.stack([dataset[s][chosen].astype(mx.float32) for s in sites])
    elif position == "mean":
        features = mx.stack([_document_means(dataset[s][rows].astype(mx.float32), docs, unique) for s in sites])
    else:
        raise InputError(f"position={position!r}: use 'last', 'mean' or 'all'.")
    return sweep(features, labels[unique], sites, groups=unique, method=method, l2=l2,
                 test_fraction=test_fraction, seed=seed, position=position)


def _document_means(x: mx.array, docs: np.ndarray, unique: np.ndarray) -> mx.array:
    index = mx.array(np.searchsorted(unique, docs))
    sums = mx.zeros((len(unique), x.shape[1])).at[index].add(x)
    counts = mx.zeros((len(unique),)).at[index].add(1.0)
    return sums / counts[:, None]
