"""Each intervention changes exactly what it claims, where it claims, and nothing else."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import bitwise_equal

from mlxterp import InterventionError, interventions as iv

IDS = [[3, 17, 42, 8, 99, 5, 61]]
MLP1 = "model.model.layers.1.mlp"


@pytest.fixture
def clean(llama):
    return llama.run(IDS).activations


def test_zero_out_gives_zeros_at_the_site_and_downstream(simple):
    x = mx.random.normal((2, 64))
    acts = simple.run(x, interventions={"model.layers.1": iv.zero_out}).activations
    assert bitwise_equal(acts["model.layers.1"], mx.zeros((2, 64)))
    assert bitwise_equal(acts["model.layers.2:input"], mx.zeros((2, 64)))
    bias = simple.model.layers[2].bias
    assert bitwise_equal(acts["model.layers.2"], mx.broadcast_to(bias, (2, 64)))


def test_zero_out_mlp_leaves_the_residual_untouched(llama, clean):
    acts = llama.run(IDS, interventions={MLP1: iv.zero_out}).activations
    assert not mx.any(acts[MLP1]).item()
    # out = h + mlp(...) with mlp = 0 is exactly h, the input of the MLP's norm
    h = acts["model.model.layers.1.post_attention_layernorm:input"]
    assert bitwise_equal(acts["model.model.layers.1"], h)
    # upstream of the site nothing changed
    assert bitwise_equal(acts["model.model.layers.1.self_attn"], clean["model.model.layers.1.self_attn"])


def test_scale_halves(llama, clean):
    acts = llama.run(IDS, interventions={MLP1: iv.scale(0.5)}).activations
    assert bitwise_equal(acts[MLP1], clean[MLP1] * 0.5)


def test_add_replace_clamp_and_custom(llama, clean):
    v = mx.arange(64, dtype=mx.float32) / 64
    assert bitwise_equal(
        llama.run(IDS, interventions={MLP1: iv.add_vector(v)}).activations[MLP1], clean[MLP1] + v
    )
    assert bitwise_equal(
        llama.run(IDS, interventions={MLP1: iv.replace_with(2.0)}).activations[MLP1],
        mx.full(clean[MLP1].shape, 2.0),
    )
    clamped = llama.run(IDS, interventions={MLP1: iv.clamp(-0.01, 0.01)}).activations[MLP1]
    assert bitwise_equal(clamped, mx.clip(clean[MLP1], -0.01, 0.01))
    custom = llama.run(IDS, interventions={MLP1: lambda x: -x}).activations[MLP1]
    assert bitwise_equal(custom, -clean[MLP1])


def test_noise_is_seedable_and_has_its_std(llama, clean):
    first = llama.run(IDS, interventions={MLP1: iv.noise(std=0.1, seed=7)}).activations[MLP1]
    again = llama.run(IDS, interventions={MLP1: iv.noise(std=0.1, seed=7)}).activations[MLP1]
    other = llama.run(IDS, interventions={MLP1: iv.noise(std=0.1, seed=8)}).activations[MLP1]
    assert bitwise_equal(first, again)
    assert not bitwise_equal(first, other)
    added = first - clean[MLP1]
    assert 0.08 < mx.std(added).item() < 0.12


def test_compose_applies_in_order(llama, clean):
    combined = iv.compose().add(iv.scale(0.5)).add(iv.add_vector(mx.ones((64,)))).build()
    acts = llama.run(IDS, interventions={MLP1: combined}).activations
    assert bitwise_equal(acts[MLP1], clean[MLP1] * 0.5 + 1)


def test_restricted_to_position_leaves_other_positions(llama, clean):
    acts = llama.run(IDS, interventions={MLP1: iv.scale(0.5).at(positions=2)}).activations
    after, before = acts[MLP1], clean[MLP1]
    others = [0, 1, 3, 4, 5, 6]
    assert bitwise_equal(after[:, others], before[:, others])
    assert bitwise_equal(after[:, 2], before[:, 2] * 0.5)
    # the positions before 2 cannot see position 2: the causal model is unchanged there
    final = "model.model.layers.3"
    assert bitwise_equal(acts[final][:, :2], clean[final][:, :2])
    assert not bitwise_equal(acts[final][:, 2:], clean[final][:, 2:])


def test_restricted_to_rows_and_heads(llama):
    batch = IDS + [[5, 5, 5, 5, 5, 5, 5]]
    clean = llama.run(batch).activations
    z = "model.model.layers.2.self_attn.o_proj:input"  # (B, T, H*D), 4 heads of 16
    acts = llama.run(batch, interventions={z: iv.zero_out.at(rows=1, heads=[3], n_heads=4)}).activations
    after, before = acts[z], clean[z]
    assert bitwise_equal(after[0], before[0])
    assert bitwise_equal(after[1, :, :48], before[1, :, :48])
    assert not mx.any(after[1, :, 48:]).item()
    # a per-head (B, H, T, D) site needs no head count
    q = "model.model.layers.2.self_attn.rope"
    acts = llama.run(batch, interventions={q: iv.zero_out.at(heads=[0, 2], positions=[-1])}).activations
    after, before = acts[q], clean[q]
    assert not mx.any(after[:, [0, 2], -1]).item()
    assert bitwise_equal(after[:, [1, 3]], before[:, [1, 3]])
    assert bitwise_equal(after[:, :, :-1], before[:, :, :-1])


def test_restrict_any_callable_and_errors(llama, clean):
    acts = llama.run(IDS, interventions={MLP1: iv.restrict(lambda x: x * 0, positions=slice(0, 2))}).activations
    assert not mx.any(acts[MLP1][:, :2]).item()
    assert bitwise_equal(acts[MLP1][:, 2:], clean[MLP1][:, 2:])
    with pytest.raises(InterventionError, match="needs n_heads"):
        llama.run(IDS, interventions={MLP1: iv.zero_out.at(heads=1)})
    with pytest.raises(InterventionError, match="position 9 is out of range"):
        llama.run(IDS, interventions={MLP1: iv.zero_out.at(positions=9)})


def test_input_port_and_repeated_call_interventions(llama, clean):
    rope = "model.model.layers.0.self_attn.rope"
    acts = llama.run(IDS, interventions={rope + "#1": iv.scale(2.0)}).activations
    assert bitwise_equal(acts[rope], clean[rope])  # queries untouched
    assert bitwise_equal(acts[rope + "#1"], clean[rope + "#1"] * 2)  # keys doubled
    down = "model.model.layers.1.mlp.down_proj"
    acts = llama.run(IDS, interventions={down + ":input": iv.zero_out}).activations
    assert not mx.any(acts[down + ":input"]).item()
    assert not mx.any(acts[down]).item()  # no bias in Llama's MLP


def test_glob_interventions_hit_every_match(llama):
    acts = llama.run(IDS, interventions={"model.model.layers.*.mlp": iv.zero_out}).activations
    for i in range(4):
        assert not mx.any(acts[f"model.model.layers.{i}.mlp"]).item()


def test_model_output_can_be_intervened(llama, clean):
    out = llama.run(IDS, interventions={"__model_output__": iv.scale(0.0)}).output
    assert not mx.any(out).item()
