"""Exploring features: top-activating examples (independent of batching), steering, ablation
through the splice, and attribution whose parts add up to the site's gradient x activation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import CORPUS
from test_saes import D, F, make

from mlxterp_core.trace import Hooks
from mlxterp_saes import SAEError


def ranked_alike(a, b, tol: float = 1e-5) -> bool:
    """Two rankings of examples (largest first) name the same examples at every rank, except
    where near-ties (within ``tol``) swap: batches of another shape round the activations'
    last bits differently. (At the last rank the next example, not listed, may be the tie.)"""
    for i, (x, y) in enumerate(zip(a, b)):
        if (x.document, x.position) != (y.document, y.position):
            neighbours = [a[j].activation for j in (i - 1, i + 1) if 0 <= j < len(a)]
            if i < len(a) - 1 and not any(abs(v - x.activation) <= tol for v in neighbours):
                return False
    return len(a) == len(b)


def test_top_examples_do_not_depend_on_batching_and_are_what_the_sae_computes(llama):
    sae = make("jumprelu")
    one = sae.top_activations(llama, CORPUS, [3, 5, 7], batch_size=1, context_size=16, progress=False)
    four = sae.top_activations(llama, CORPUS, [3, 5, 7], batch_size=4, context_size=16, progress=False)
    for a, b in zip(one.top, four.top):
        assert ranked_alike(a, b)
        assert [e.activation for e in a] == pytest.approx([e.activation for e in b], abs=1e-5)
    assert one.density == pytest.approx(four.density)
    examples = one[5]
    assert [e.activation for e in examples] == sorted((e.activation for e in examples), reverse=True)
    best = examples[0]
    assert best.values[best.index] == pytest.approx(best.activation)
    # the density is the fraction of (non-BOS) tokens where the feature fires
    from mlxterp_core.corpus import token_windows

    fired = []
    for w in token_windows(llama, CORPUS, 16, batch_size=4):
        x = llama.run(w.inputs, capture=["layers.2.output"]).activations["layers.2.output"]
        keep = w.mask & ~w.bos
        keep[:, 0] = False
        fired.append(np.array(sae.encode(x)[..., 5])[keep])
    fired = np.concatenate(fired)
    assert one.n_tokens == fired.size
    assert one.density[1] == pytest.approx((fired > 0).mean())
    assert one.max_activation[1] == pytest.approx(fired.max(), abs=1e-5)
    assert "<div" in one._repr_html_() and "density" in repr(one)
    one.plot()
    with pytest.raises(SAEError, match="out of range"):
        sae.top_activations(llama, CORPUS, [F + 1])


def test_steering_at_scale_zero_is_a_no_op_and_otherwise_adds_the_direction(llama):
    sae = make("standard")
    plain = llama.generate("The capital of", max_tokens=5).tokens
    assert llama.generate("The capital of", max_tokens=5, interventions=sae.steer(4, 0.0)).tokens == plain
    clean = llama.run("The capital of", capture=["layers.2.output"]).activations["layers.2.output"]
    steered = llama.run("The capital of", interventions=sae.steer(4, 3.0, positions=1),
                        capture=["layers.2.output"]).activations["layers.2.output"]
    moved = steered - clean
    assert mx.allclose(moved[0, 1], 3.0 * sae.W_dec[4], atol=1e-5).item()
    assert mx.abs(moved[0, 0]).max().item() == 0


def test_ablating_a_feature_through_the_splice_subtracts_its_decoder_contribution(llama):
    sae = make("standard")
    clean = llama.run("The capital of", capture=["layers.2.output"]).activations["layers.2.output"]
    f = sae.encode(clean)
    i = int(mx.argmax(f[0].sum(axis=0)).item())
    ablated = llama.run("The capital of", saes=[sae], interventions=sae.ablate(i),
                        capture=["layers.2.output"]).activations["layers.2.output"]
    expected = clean - f[..., i : i + 1] * sae.W_dec[i]
    assert mx.allclose(ablated, expected, atol=1e-4).item()


def test_attribution_parts_add_up_to_the_sites_gradient_times_activation(llama):
    sae = make("topk", k=8)
    result = sae.attribution(llama, "The capital of France", top=5)
    ids = mx.array([llama.encode("The capital of France")])
    target = int(mx.argmax(llama.run(ids).output[0, -1]).item())

    def metric_at_site(delta):
        with Hooks(llama, {"layers.2.output": lambda x: x + delta}, capture=["layers.2.output", "logits"]) as hooks:
            logits, rec = hooks(ids, evaluate=False)
        last = logits[0, -1]
        return last[target] - mx.logsumexp(last)

    x = llama.run(ids, capture=["layers.2.output"]).activations["layers.2.output"]
    g = mx.grad(metric_at_site)(mx.zeros_like(x))
    expected = ((x - sae.b_dec) * g).sum(-1)[0]
    got = mx.array(result.all_features) + mx.array(result.error)
    assert mx.allclose(got, expected, atol=1e-4).item()
    assert len(result.top_features) == 5 and abs(result.total_effect[0]) >= abs(result.total_effect[-1])
    assert "error" in repr(result)
    result.plot()
