"""Linear probes in MLX: L2-regularised logistic regression and mass-mean probes, AUROC, and
group splits (one prompt, document or template never on both sides of the split).

Logistic regression is fitted full-batch by Newton's method on standardised features (training
statistics), the intercept unpenalised; the direction is returned in the raw activation space
(``w / std``), so ``x @ direction + bias`` is the probe's logit on a raw activation. The
mass-mean probe's direction is the difference of the class means (Marks & Tegmark's
``MMProbe``), the same vector a steering vector is made of.
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import numpy as np

from mlxterp_core import options
from mlxterp_core.errors import InputError

NEWTON_STEPS = 30


@attrs.frozen
class LinearProbe:
    """``logit = x @ direction + bias`` on raw activations x (..., D)."""

    direction: mx.array  # (D,)
    bias: float
    method: str

    def logits(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.direction + self.bias

    def predict(self, x: mx.array) -> mx.array:
        return self.logits(x) > 0


def fit_logistic(x: mx.array, y, l2: float = 1e-2, steps: int = NEWTON_STEPS) -> LinearProbe:
    """Logistic regression on (N, D) activations and 0/1 labels (N,), with L2 penalty
    ``l2 / 2 * |w|^2`` on the standardised weights (mean log-loss + penalty)."""
    x, y = _checked(x, y)
    mean, std = x.mean(axis=0), mx.sqrt(x.var(axis=0)) + 1e-6
    z = mx.concatenate([(x - mean) / std, mx.ones((x.shape[0], 1))], axis=1)  # (N, D + 1)
    n, width = z.shape
    penalty = mx.concatenate([mx.full((width - 1,), l2), mx.array([1e-8])])
    theta = mx.zeros((width,))
    for _ in range(steps):
        p = mx.sigmoid(z @ theta)
        grad = z.T @ (p - y) / n + penalty * theta
        hessian = (z.T * (p * (1 - p))) @ z / n + mx.diag(penalty)
        theta = theta - mx.linalg.solve(hessian, grad, stream=mx.cpu)
        mx.eval(theta)
    w, b = theta[:-1] / std, theta[-1]
    return LinearProbe(direction=w, bias=float((b - (w * mean).sum()).item()), method="logistic")


def fit_mass_mean(x: mx.array, y) -> LinearProbe:
    """direction = mean(x | y = 1) - mean(x | y = 0); the threshold halfway between the means."""
    x, y = _checked(x, y)
    positive = (x * y[:, None]).sum(axis=0) / y.sum()
    negative = (x * (1 - y)[:, None]).sum(axis=0) / (1 - y).sum()
    direction = positive - negative
    return LinearProbe(direction=direction, bias=float((-(direction * (positive + negative) / 2).sum()).item()), method="mass_mean")


def fit(x: mx.array, y, method: str = "logistic", l2: float = 1e-2) -> LinearProbe:
    if method == "logistic":
        return fit_logistic(x, y, l2)
    if method == "mass_mean":
        return fit_mass_mean(x, y)
    raise InputError(f"method={method!r}: use 'logistic' or 'mass_mean'.")


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for 0/1 ``labels`` (Mann-Whitney, ties halved)."""
    try:
        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        scores = labels = None
    if scores is None or scores.ndim != 1 or labels.shape != scores.shape or not np.isin(labels, (0, 1)).all():
        raise InputError("auroc(scores, labels): one score per example and a 0/1 label for each, as two lists of one length.")
    if np.isnan(scores).any():
        raise InputError("auroc: the scores hold NaN.")
    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # average rank within ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_groups(groups, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N,) train and test masks: whole groups go to one side, the test side gets about
    ``test_fraction`` of the groups (at least one), chosen with ``seed``."""
    test_fraction = options.number(test_fraction, "test_fraction", 0.0, 1.0, open_low=True, open_high=True)
    seed = options.integer(seed, "seed", 0)
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.dtype.kind not in "biuUS":
        raise InputError(f"groups={groups!r:.60}: give one group id (an int or a string) per example.")
    unique = np.unique(groups)
    if len(unique) < 2:
        raise InputError("a group split needs at least two groups (give groups=, or more examples).")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(unique)[: max(1, int(round(test_fraction * len(unique))))]
    test = np.isin(groups, chosen)
    return ~test, test


def _checked(x, y) -> tuple[mx.array, mx.array]:
    try:
        x = mx.array(x).astype(mx.float32)
        y = mx.array(np.asarray(y, dtype=np.float32))
    except (TypeError, ValueError):
        raise InputError("a probe fits (N, D) activations (numbers) to (N,) 0/1 labels.") from None
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise InputError(f"a probe fits (N, D) activations to (N,) labels; got {tuple(x.shape)} and {tuple(y.shape)}.")
    values = set(np.unique(np.array(y)).tolist())
    if not values <= {0.0, 1.0} or len(values) < 2:
        raise InputError(f"labels must be 0/1 with both classes present; got the values {sorted(values)}.")
    return x, y
