"""Linear probes in MLX: L2-regularised logistic regression and mass-mean probes, AUROC, and
group splits (one prompt, document or template never on both sides of the split).

Logistic regression is fitted full-batch by Newton's method on standardised features (training
statistics), the intercept unpenalised; the direction is returned in the raw activation space
(``w / std``), so ``x @ direction + bias`` is the probe's logit on a raw activation. With fewer
examples than dimensions (a sweep over a few dozen prompts of a 576-wide model) it is solved in
the dual: the L2 optimum's weights are a combination of the training rows (``w = Z^T a``), so
each Newton step solves an (N+1)-square system instead of a (D+1)-square one, to the same
optimum. Steps stop at convergence, and the probes of every site of a sweep are fitted together,
one batched solve per step. The
mass-mean probe's direction is the difference of the class means (Marks & Tegmark's
``MMProbe``), the same vector a steering vector is made of.
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Display, InputError, options

NEWTON_STEPS = 30


@attrs.frozen(repr=False)
class LinearProbe(Display):
    """``logit = x @ direction + bias`` on raw activations x (..., D)."""

    direction: mx.array  # (D,)
    bias: float
    method: str

    def logits(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.direction + self.bias

    def predict(self, x: mx.array) -> mx.array:
        return self.logits(x) > 0

    def _summary(self) -> str:
        norm = float(mx.linalg.norm(self.direction.astype(mx.float32)).item())
        return f"{self.method}, {self.direction.shape[-1]} dims, |direction| {norm:.3g}, bias {self.bias:+.3g}"


def fit_logistic(x: mx.array, y, l2: float = 1e-2, steps: int = NEWTON_STEPS) -> LinearProbe:
    """Logistic regression on (N, D) activations and 0/1 labels (N,), with L2 penalty
    ``l2 / 2 * |w|^2`` on the standardised weights (mean log-loss + penalty)."""
    x, y = _checked(x, y)
    return fit_logistic_sites(x[None], y, l2, steps)[0]


def fit_logistic_sites(x: mx.array, y, l2: float = 1e-2, steps: int = NEWTON_STEPS,
                       tolerance: float = 1e-6) -> list[LinearProbe]:
    """One logistic probe per site for (S, N, D) activations and 0/1 labels (N,), fitted
    together (see the module doc); Newton stops once no parameter of any site moves by more
    than ``tolerance`` (relative), or after ``steps``."""
    x = mx.array(x).astype(mx.float32)
    y = mx.array(np.asarray(y, dtype=np.float32))
    mean, std = x.mean(axis=1, keepdims=True), mx.sqrt(x.var(axis=1, keepdims=True)) + 1e-6
    z = (x - mean) / std  # (S, N, D)
    n, d = z.shape[1], z.shape[2]
    if n <= d:
        a, b = _newton_dual(z, y, l2, steps, tolerance)
        w = (z.transpose(0, 2, 1) @ a[..., None])[..., 0]  # (S, D) = Z^T a
    else:
        w, b = _newton_primal(z, y, l2, steps, tolerance)
    direction = w / std[:, 0]
    bias = b - (direction * mean[:, 0]).sum(axis=-1)
    mx.eval(direction, bias)
    return [LinearProbe(direction=direction[i], bias=float(bias[i].item()), method="logistic") for i in range(x.shape[0])]


def _newton_primal(z: mx.array, y: mx.array, l2: float, steps: int, tolerance: float) -> tuple[mx.array, mx.array]:
    """Newton on theta = (w, b) with the (D+1)-square Hessian of each site."""
    s, n, d = z.shape
    zi = mx.concatenate([z, mx.ones((s, n, 1))], axis=2)  # (S, N, D + 1)
    penalty = mx.concatenate([mx.full((d,), l2), mx.array([1e-8])])
    theta = mx.zeros((s, d + 1))
    for _ in range(steps):
        p = mx.sigmoid((zi @ theta[..., None])[..., 0])  # (S, N)
        grad = (zi.transpose(0, 2, 1) @ (p - y)[..., None])[..., 0] / n + penalty * theta
        hessian = (zi.transpose(0, 2, 1) * (p * (1 - p))[:, None, :]) @ zi / n + mx.diag(penalty)
        step = mx.linalg.solve(hessian, grad[..., None], stream=mx.cpu)[..., 0]
        theta = theta - step
        if _converged(step, theta, tolerance):
            break
    return theta[:, :-1], theta[:, -1]


def _newton_dual(z: mx.array, y: mx.array, l2: float, steps: int, tolerance: float) -> tuple[mx.array, mx.array]:
    """Newton on (a, b), w = Z^T a, scores = K a + b with K = Z Z^T: the primal Newton step,
    restricted to the span of the rows where the iterates (from 0) and the optimum lie, is the
    solution of ``[W K / n + l2 I, W 1 / n; 1^T W K / n, 1^T W 1 / n + eps] [da; db] = [u; g_b]``
    with ``u = (p - y) / n + l2 a`` and ``g_b = 1^T (p - y) / n + eps b``."""
    s, n, _ = z.shape
    kernel = z @ z.transpose(0, 2, 1)  # (S, N, N)
    eps = 1e-8
    a, b = mx.zeros((s, n)), mx.zeros((s,))
    eye = mx.eye(n)
    for _ in range(steps):
        scores = (kernel @ a[..., None])[..., 0] + b[:, None]
        p = mx.sigmoid(scores)
        weight = p * (1 - p)  # (S, N)
        u = (p - y) / n + l2 * a
        g_b = (p - y).sum(axis=1) / n + eps * b
        top_left = weight[:, :, None] * kernel / n + l2 * eye  # W K / n + l2 I
        top_right = weight[:, :, None] / n  # W 1 / n
        bottom_left = (weight[:, None, :] @ kernel) / n  # 1^T W K / n
        bottom_right = weight.sum(axis=1)[:, None, None] / n + eps
        system = mx.concatenate([mx.concatenate([top_left, top_right], axis=2),
                                 mx.concatenate([bottom_left, bottom_right], axis=2)], axis=1)
        rhs = mx.concatenate([u, g_b[:, None]], axis=1)[..., None]
        step = mx.linalg.solve(system, rhs, stream=mx.cpu)[..., 0]  # (S, N + 1)
        a, b = a - step[:, :-1], b - step[:, -1]
        if _converged(step, mx.concatenate([a, b[:, None]], axis=1), tolerance):
            break
    return a, b


def _converged(step: mx.array, theta: mx.array, tolerance: float) -> bool:
    """Whether the last Newton step moved no parameter by more than ``tolerance`` relative to
    the parameters' size (one sync a step for every site together)."""
    return bool((mx.abs(step).max() <= tolerance * mx.maximum(mx.abs(theta).max(), 1.0)).item())


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
