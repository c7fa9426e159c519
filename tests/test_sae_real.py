"""A TopK SAE on the default model: trained at the middle layer's residual stream on a real
offline corpus in a few minutes, it must explain more held-out variance than PCA with as many
components as it has active features, and recover most of the loss when spliced in."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp_saes import explained_variance, train_sae
from mlxterp_saes.training import _source

SITE = "layers.15.output"  # the middle of SmolLM2-135M's 30 layers
K = 32


def rows(model, texts, n):
    """The first ``n`` training rows of ``texts`` at SITE, exactly as train_sae reads them."""
    found, got = [], 0
    for chunk in _source(model, [SITE], texts, 128, 8, 0):
        found.append(chunk[SITE])
        got += found[-1].shape[0]
        if got >= n:
            return mx.concatenate(found)[:n]


def test_a_topk_sae_beats_pca_at_equal_sparsity_on_held_out_tokens(smollm, capsys):
    corpus = mlxterp.default_corpus()
    train, held_out = corpus[:400], corpus[-150:]
    x_train, x_test = rows(smollm, train, 2048), rows(smollm, held_out, 512)
    # traced once, then 6 passes over those 2048 tokens
    sae = train_sae(smollm, SITE, x_train, "topk", d_sae=1152, k=K, n_tokens=6 * 2048, batch_size=256,
                    buffer_tokens=2048, lr=1e-3, progress=False)
    train64, test64 = np.array(x_train, dtype=np.float64), np.array(x_test, dtype=np.float64)
    mean = train64.mean(axis=0)
    basis = np.linalg.svd(train64 - mean, full_matrices=False)[2][:K]
    pca = explained_variance(x_test, mx.array((test64 - mean) @ basis.T @ basis + mean))
    ours = explained_variance(x_test, sae(x_test))
    result = sae.evaluate(smollm, held_out, n_tokens=256, progress=False)
    with capsys.disabled():
        print(f"\n{SITE}: SAE EV {ours:.3f} vs PCA-{K} {pca:.3f} (held out); {result}; KL {result.kl_spliced:.3f}")
    assert ours > pca
    assert result.l0 == K
    assert result.ce_zero_ablated > result.ce_clean
    assert 0.5 < result.ce_loss_recovered <= 1.0 + 1e-6
