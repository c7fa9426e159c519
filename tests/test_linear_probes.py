"""Linear probes: a planted direction is recovered, shuffled labels give chance, group splits
never leak, mass-mean is the difference of means, and on the default model a sentiment probe
peaks in the middle layers, far above the embedding baseline."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxterp
from mlxterp import InputError, probes  # noqa: F401  (mlxterp.probes comes from the plugin)

probes = mlxterp.probes


def planted(n: int = 10000, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x @ w > 0).astype(int), w


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["logistic", "mass_mean"])
def test_a_planted_direction_is_recovered(method):
    x, y, w = planted()
    result = probes.sweep(mx.array(x)[None], y, ["layers.0.output"], method=method, l2=1e-4)
    # the mass-mean direction carries the sampling noise of two means (cosine ~0.99 -> ~4% errors)
    assert result.accuracy[0] >= (0.99 if method == "logistic" else 0.95)
    assert cosine(result.directions[0], w) >= 0.99
    assert result.auroc[0] >= 0.99


def test_shuffled_labels_give_chance_auroc():
    x, y, _ = planted()
    shuffled = np.random.default_rng(1).permutation(y)
    result = probes.sweep(mx.array(x)[None], shuffled, ["layers.0.output"])
    assert abs(result.auroc[0] - 0.5) <= 0.02


def test_mass_mean_is_the_difference_of_class_means():
    x, y, _ = planted(n=500, d=8)
    direction = np.array(probes.fit_mass_mean(mx.array(x), y).direction)
    np.testing.assert_allclose(direction, x[y == 1].mean(0) - x[y == 0].mean(0), atol=1e-5)


def test_auroc_matches_pairwise_counting_with_ties():
    scores, labels = [0.1, 0.4, 0.4, 0.8, 0.2, 0.4], [0, 1, 0, 1, 0, 1]
    pairs = [(s1 > s0) + 0.5 * (s1 == s0) for s1, l1 in zip(scores, labels) if l1 for s0, l0 in zip(scores, labels) if not l0]
    assert probes.auroc(scores, labels) == pytest.approx(np.mean(pairs))


def test_group_splits_never_put_a_group_on_both_sides():
    groups = np.repeat(np.arange(20), 3)
    train, test = probes.split_groups(groups, 0.3, seed=4)
    assert not set(groups[train]) & set(groups[test]) and (train | test).all()
    assert len(set(groups[test])) == 6


def test_bad_probe_inputs_are_clear_errors():
    with pytest.raises(InputError, match="0/1"):
        probes.fit_logistic(mx.zeros((4, 2)), [0, 1, 2, 1])
    with pytest.raises(InputError, match="two groups"):
        probes.split_groups([1, 1, 1])


POSITIVE = ["wonderful", "delightful", "excellent", "fantastic", "lovely", "brilliant", "superb", "great", "charming", "amazing"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "miserable", "bad", "painful", "ugly"]
TEMPLATES = [
    "The movie we watched last night was {}.",
    "I thought the food at that restaurant was {}.",
    "Honestly, the concert yesterday was {}.",
    "My holiday by the sea this summer was {}.",
    "Everyone agreed that the new book was {}.",
    "The service at the hotel was {}.",
]


def sentiment_statements():
    texts, labels, groups = [], [], []
    for t, template in enumerate(TEMPLATES):
        for k, (good, bad) in enumerate(zip(POSITIVE, NEGATIVE)):
            texts += [template.format(good), template.format(bad)]
            labels += [1, 0]
            groups += [t * 100 + k] * 2  # a good/bad pair never straddles the split
    return texts, labels, groups


def test_a_sentiment_probe_beats_the_embedding_baseline(smollm):
    """Measured: held-out accuracy and AUROC 1.0 at every layer output from layer 0 on, 0.5 for
    the embeddings (the last token is the same full stop everywhere). This task is decodable
    from layer 0 on, so it shows no middle-layer peak."""
    texts, labels, groups = sentiment_statements()
    result = smollm.probe(texts, labels, groups=groups, position="last", seed=0)
    embed_accuracy, embed_auroc = result["embed"]
    middle_accuracy, middle_auroc = result[15]
    print(f"best {result.best()}; embed {embed_accuracy:.2f} / {embed_auroc:.2f}; "
          f"per layer accuracy {[round(a, 2) for a in result.accuracy]}")
    assert abs(embed_auroc - 0.5) < 0.1
    assert middle_accuracy >= 0.9 and middle_accuracy >= embed_accuracy + 0.3
    vector = result.steering_vector(15)
    assert vector.name == "layers.15.output" and len(vector.vector) == 576 and len(vector.positive) == 60


def _newton_float64(x, y, l2, steps=60):
    """Logistic regression by plain Newton in float64 numpy (the reference for the fits)."""
    mean, std = x.mean(0), np.sqrt(x.var(0)) + 1e-6
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    penalty = np.r_[np.full(x.shape[1], l2), 1e-8]
    theta = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ theta))
        grad = z.T @ (p - y) / len(x) + penalty * theta
        hessian = (z.T * (p * (1 - p))) @ z / len(x) + np.diag(penalty)
        theta -= np.linalg.solve(hessian, grad)
    w = theta[:-1] / std
    return w, theta[-1] - w @ mean


@pytest.mark.parametrize("n, d", [(24, 300), (400, 20)])  # fewer examples than dimensions: the dual
def test_the_batched_fit_reaches_the_newton_optimum(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n, d)).astype(np.float32) * rng.uniform(0.5, 3, size=d).astype(np.float32) + 2.0
    y = (x[0, :, 0] + 0.5 * rng.normal(size=n) > 2.0).astype(np.float32)
    fitted = probes.fit_logistic_sites(mx.array(x), y, l2=1e-2)
    for site, probe in enumerate(fitted):
        w, b = _newton_float64(x[site].astype(np.float64), y, 1e-2)
        assert cosine(probe.direction, w) >= 1 - 1e-6
        np.testing.assert_allclose(np.array(probe.direction), w, rtol=1e-3, atol=1e-4 * np.abs(w).max())
        assert probe.bias == pytest.approx(b, rel=1e-3, abs=1e-3)
        single = probes.fit_logistic(mx.array(x[site]), y, l2=1e-2)
        np.testing.assert_allclose(np.array(single.direction), np.array(probe.direction), rtol=1e-4, atol=1e-6)


def test_a_sweep_scores_as_one_fit_per_site_does(llama):
    texts = [f"the {a} cat sat on the {b} mat" for a in ("big", "small", "red", "old") for b in ("new", "wet", "hot")]
    labels = [i % 2 for i in range(len(texts))]
    groups = [i // 2 for i in range(len(texts))]
    sweep = llama.probe(texts, labels, groups=groups, progress=False)
    features = probes.collect(llama, texts, sweep.sites)
    train, test = probes.split_groups(np.array(groups), 0.3, 0)
    for s, site in enumerate(sweep.sites):
        probe = probes.fit_logistic(features[s][mx.array(np.flatnonzero(train))], np.array(labels)[train])
        logits = np.array(probe.logits(features[s]))
        assert sweep.auroc[s] == pytest.approx(probes.auroc(logits[test], np.array(labels)[test]), abs=1e-9)
        assert sweep.accuracy[s] == pytest.approx(float(((logits > 0)[test] == np.array(labels, bool)[test]).mean()))
