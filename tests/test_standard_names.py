"""Standard names, their aliases, and their errors, wherever raw names are accepted."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import bitwise_equal, tiny_family

from mlxterp import InterpretableModel, UnknownNameError, interventions as iv

IDS = [[5, 17, 3, 42, 9, 77]]
L1 = "model.model.layers.1"


@pytest.fixture(scope="module")
def llama():
    return InterpretableModel(tiny_family("llama"))


@pytest.fixture(scope="module")
def full(llama):
    return llama.run(IDS).activations


def test_both_spellings_and_raw_agree(llama, full):
    tr = llama.run(IDS, capture=["layers[1].attn.q", "layers.1.mlp.act", "layers[1]"])
    acts = tr.activations
    assert bitwise_equal(acts["layers[1].attn.q"], full[f"{L1}.self_attn.q_proj"])
    assert bitwise_equal(acts["layers.1.attn.q"], full[f"{L1}.self_attn.q_proj"])
    assert bitwise_equal(acts["layers[1].mlp.act"], full[f"{L1}.mlp.down_proj:input"])
    assert bitwise_equal(acts["layers[1]"], full[L1])
    assert bitwise_equal(acts["layers[1].output"], full[L1])
    assert sorted(acts) == sorted([f"{L1}.self_attn.q_proj", f"{L1}.mlp.down_proj:input", L1])


def test_model_level_names(llama, full):
    acts = full
    assert bitwise_equal(acts["embed"], acts["model.model.embed_tokens"])
    assert bitwise_equal(acts["ln_final"], acts["model.model.norm"])
    assert bitwise_equal(acts["logits"], acts["__model_output__"])
    assert acts["layers[*].output"].shape == (3, 1, 6, 64)


def test_per_head_views(llama, full):
    q = full[f"{L1}.self_attn.q_proj"]
    q_heads = full["layers[1].attn.q_heads"]
    assert q_heads.shape == (1, 4, 6, 16)
    assert bitwise_equal(q_heads[:, 2], q[..., 32:48])
    assert full["layers[1].attn.k_heads"].shape == (1, 2, 6, 16)
    assert full["layers[1].attn.q_rot"].shape == (1, 4, 6, 16)


def test_transformerlens_and_nnterp_aliases(llama, full):
    assert bitwise_equal(full["blocks.1.hook_resid_pre"], full[f"{L1}:input"])
    assert bitwise_equal(full["blocks.1.hook_resid_mid"], full[f"{L1}.post_attention_layernorm:input"])
    assert bitwise_equal(full["blocks.1.hook_resid_post"], full[L1])
    assert bitwise_equal(full["blocks.1.hook_attn_out"], full[f"{L1}.self_attn"])
    assert bitwise_equal(full["blocks.1.hook_mlp_out"], full[f"{L1}.mlp"])
    assert bitwise_equal(full["blocks.1.mlp.hook_pre"], full[f"{L1}.mlp.gate_proj"])
    assert bitwise_equal(full["blocks.1.mlp.hook_pre_linear"], full[f"{L1}.mlp.up_proj"])
    assert bitwise_equal(full["blocks.1.mlp.hook_post"], full[f"{L1}.mlp.down_proj:input"])
    assert bitwise_equal(full["hook_embed"], full["embed"])
    assert bitwise_equal(full["ln_final.hook_normalized"], full["ln_final"])
    # TransformerLens's per-head layout is (B, T, H, D)
    assert full["blocks.1.attn.hook_q"].shape == (1, 6, 4, 16)
    assert bitwise_equal(full["blocks.1.attn.hook_z"].reshape(1, 6, 64), full[f"{L1}.self_attn.o_proj:input"])
    assert bitwise_equal(full["blocks.1.attn.hook_rot_k"], full["layers.1.attn.k_rot"].swapaxes(1, 2))
    tr = llama.run(IDS, capture=["layers_output[2]", "attentions_output[0]"])
    assert bitwise_equal(tr.layers_output[2], full["model.model.layers.2"])
    assert bitwise_equal(tr.attentions_output[0], full["model.model.layers.0.self_attn"])
    assert bitwise_equal(full["mlps_output[1]"], full[f"{L1}.mlp"])
    assert bitwise_equal(full["layers_input[1]"], full[f"{L1}:input"])


def test_pattern_is_opt_in_and_exact(llama, full):
    assert "layers[1].attn.pattern" not in full
    tr = llama.run(IDS, capture=["blocks.1.attn.hook_pattern", "layers.1.attn.v_heads", "layers.1.attn.z_heads"])
    pattern = tr.activations["layers[1].attn.pattern"]
    assert pattern.shape == (1, 4, 6, 6)
    assert mx.allclose(pattern.sum(-1), mx.ones((1, 4, 6)), atol=1e-6).item()
    assert not mx.any(mx.triu(pattern[0, 0], k=1)).item()  # causal
    v = mx.repeat(tr.activations["layers.1.attn.v_heads"], 2, axis=1)
    assert mx.allclose(pattern @ v, tr.activations["layers.1.attn.z_heads"], atol=1e-5).item()
    assert bitwise_equal(tr.attention_probabilities[1], pattern)


def test_interventions_on_standard_names(llama, full):
    # same edit by standard and raw name: same result, bit for bit
    by_standard = llama.run(IDS, interventions={"layers[1].attn.q": iv.scale(0.5)}).output
    by_raw = llama.run(IDS, interventions={f"{L1}.self_attn.q_proj": iv.scale(0.5)}).output
    assert bitwise_equal(by_standard, by_raw)
    # heads= needs no head count on a standard name
    tr = llama.run(IDS, interventions={"layers[1].attn.z": iv.zero_out.at(heads=[1])})
    z = tr.activations["layers[1].attn.z_heads"]
    assert not mx.any(z[:, 1]).item()
    assert bitwise_equal(z[:, 0], full["layers[1].attn.z_heads"][:, 0])
    # every layer at once
    tr = llama.run(IDS, interventions={"layers[*].mlp": iv.zero_out})
    assert all(not mx.any(tr.activations[f"layers.{i}.mlp"]).item() for i in range(3))


def test_derived_names_can_be_written(llama, full):
    tr = llama.run(IDS, interventions={"layers[1].resid_mid": iv.zero_out.at(positions=3)})
    mid = tr.activations["layers[1].resid_mid"]
    assert mx.allclose(mid[:, 3], mx.zeros_like(mid[:, 3]), atol=1e-6).item()
    assert bitwise_equal(mid[:, :3], full["layers[1].resid_mid"][:, :3])
    tr = llama.run(IDS, capture=["layers[1].attn.pattern", "layers.1.attn.z_heads"],
                   interventions={"layers[1].attn.pattern": iv.zero_out.at(heads=[0])})
    assert not mx.any(tr.activations["layers[1].attn.z_heads"][:, 0]).item()
    tr = llama.run(IDS, interventions={"layers[1].attn.q_heads": iv.zero_out.at(heads=[2])})
    assert not mx.any(tr.activations[f"{L1}.self_attn.q_proj"][..., 32:48]).item()
    assert bitwise_equal(tr.activations[f"{L1}.self_attn.q_proj"][..., :32], full[f"{L1}.self_attn.q_proj"][..., :32])


def test_errors_explain(llama):
    with pytest.raises(UnknownNameError, match=r"layers\.0\.attn\.q_norm: schema 'llama' maps no 'attn.q_norm'\. Families that have it: .*qwen3"):
        llama.run(IDS, capture=["layers[0].attn.q_norm"])
    with pytest.raises(UnknownNameError, match="standard names are 'embed'.*'layers\\[i\\]'"):
        llama.run(IDS, capture=["layer[0].attn"])
    with pytest.raises(UnknownNameError, match="'atn' is not a standard block name"):
        llama.run(IDS, capture=["layers[0].atn"])
    with pytest.raises(UnknownNameError, match="layer 7 does not exist; this llama model has layers 0..2"):
        llama.run(IDS, interventions={"layers[7].mlp": iv.zero_out})
    tr = llama.run(IDS, capture=["layers[0].mlp"])
    with pytest.raises(UnknownNameError, match=r"layers\.0\.attn \(model\.model\.layers\.0\.self_attn\) was not recorded.*capture="):
        tr.activations["layers[0].attn"]


def test_every_block_name_has_a_place_in_forward_order():
    from mlxterp_core.names import DERIVED_BLOCK_NAMES, FORWARD_ORDER
    from mlxterp_core.schema import BLOCK_NAMES

    assert sorted(FORWARD_ORDER) == sorted({*BLOCK_NAMES, *DERIVED_BLOCK_NAMES})
