"""Sparse autoencoders: the field's file formats, the maths of each architecture, and the
splice into a trace (unedited = unchanged, a feature edit moves the site by delta * W_dec[i])."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import mlxterp
from mlxterp import interventions as iv
from mlxterp_saes import SAE, SAEConfig, SAEError, load_sae, topk_relu

D, F = 64, 96  # the tiny Llama's width, SAE features


def weights(arch: str, d_in=D, d_sae=F, d_out=None, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    w = {
        "W_enc": rng.normal(0, 0.3, (d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(0, 0.3, (d_sae, d_out)).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, (d_out,)).astype(np.float32),
    }
    if arch == "gated":
        w.update(b_gate=rng.normal(0, 0.1, d_sae), b_mag=rng.normal(0, 0.1, d_sae), r_mag=rng.normal(0, 0.1, d_sae))
    else:
        w["b_enc"] = rng.normal(0, 0.1, d_sae)
    if "jumprelu" in arch:
        w["threshold"] = np.abs(rng.normal(0, 0.3, d_sae))
    return {k: v.astype(np.float32) for k, v in w.items()}


def saelens_folder(path, arch="standard", hook="blocks.2.hook_resid_post", v6=True, **extra):
    """A SAELens folder as SAELens writes it (cfg.json + sae_weights.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    d_out = extra.pop("d_out", None)
    w = weights(arch, d_out=d_out)
    save_file(w, str(path / "sae_weights.safetensors"))
    if v6:
        cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": "transcoder" not in arch, "normalize_activations": "none",
               "metadata": {"model_name": "tiny", "hook_name": hook, "hook_head_index": None,
                            "context_size": 128, "prepend_bos": True, "sae_lens_version": "6.18.0"}}
        if d_out:
            cfg["d_out"] = d_out
        cfg.update({k: v for k, v in extra.items() if k != "hook_name_out"})
        if "hook_name_out" in extra:
            cfg["metadata"]["hook_name_out"] = extra["hook_name_out"]
    else:  # pre-6.0: flat, hook_point, activation_fn_str
        cfg = {"d_in": D, "d_sae": F, "hook_point": hook, "hook_point_layer": 2, "hook_point_head_index": None,
               "activation_fn_str": extra.pop("activation_fn_str", "relu"), "model_name": "tiny",
               "context_size": 128, "normalize_activations": False, "dtype": "torch.float32",
               "sae_lens_training_version": "3.0.0", **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path, w


# -- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_a_saelens_v6_folder_loads_with_its_tensors_and_site(tmp_path, arch):
    folder, w = saelens_folder(tmp_path / arch, arch, **({"k": 5} if arch == "topk" else {}))
    sae = load_sae(folder)
    assert sae.cfg.architecture == arch and sae.cfg.site == "layers.2.output"
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post"
    for name, value in w.items():
        assert np.array_equal(np.array(sae[name]), value), name


def test_a_pre_6_saelens_config_is_migrated(tmp_path):
    folder, w = saelens_folder(tmp_path / "old", v6=False, hook="blocks.1.hook_resid_pre",
                               activation_fn_str="topk", activation_fn_kwargs={"k": 7})
    sae = load_sae(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 7
    assert sae.cfg.site == "layers.1.input" and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata["sae_lens_training_version"] == "3.0.0"


def test_saving_writes_saelens_v6_that_loads_back_identically(tmp_path):
    sae = load_sae(saelens_folder(tmp_path / "a", "jumprelu")[0])
    out = sae.save(tmp_path / "b", sparsity=mx.full((F,), -2.0))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["mlxterp_name"] == "layers.2.output"
    assert cfg["metadata"]["sae_lens_version"].startswith("6")
    again = load_sae(out)
    for name in sae.tensor_names:
        assert mx.array_equal(sae[name], again[name]).item(), name
    assert again.log_sparsity.shape == (F,)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_gemma_scope_params_load_as_jumprelu_without_b_dec_on_the_input(tmp_path, suffix):
    w = {("w_enc" if k == "W_enc" else "w_dec" if k == "W_dec" else k): v for k, v in weights("jumprelu").items()}
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    if suffix == "npz":
        np.savez(folder / "params.npz", **w)
    else:
        save_file(w, str(folder / "params.safetensors"))
    sae = load_sae(folder)
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.site == "layers.3.output" and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert np.array_equal(np.array(sae.W_enc), w["w_enc"])


def test_a_gemma_scope_file_whose_path_names_no_site_needs_site(tmp_path):
    w = {("w_enc" if k == "W_enc" else "w_dec" if k == "W_dec" else k): v for k, v in weights("jumprelu").items()}
    np.savez(tmp_path / "params.npz", **w)
    with pytest.raises(SAEError, match="site="):
        load_sae(tmp_path / "params.npz")
    assert load_sae(tmp_path / "params.npz", site="layers[1].mlp").cfg.site == "layers.1.mlp"


def test_bad_files_fail_clearly_naming_file_and_field(tmp_path):
    folder, _ = saelens_folder(tmp_path / "bad")
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="sae_weights.safetensors.*corrupt or truncated"):
        load_sae(folder)
    folder, _ = saelens_folder(tmp_path / "arch", architecture="mystery")
    with pytest.raises(SAEError, match="unknown SAE architecture 'mystery'"):
        load_sae(folder)
    folder, _ = saelens_folder(tmp_path / "hook", hook="blocks.2.hook_nonsense")
    with pytest.raises(SAEError, match="metadata.hook_name = 'blocks.2.hook_nonsense'"):
        load_sae(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="no SAE files found"):
        load_sae(tmp_path / "empty")


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEError, match="Hugging Face hub.*local path"):
        load_sae("some-org/some-saes/layer_3")


# -- maths ----------------------------------------------------------------------------------------


def make(arch="standard", **cfg) -> SAE:
    d_out = cfg.get("d_out")
    w = {k: mx.array(v) for k, v in weights(arch, d_out=d_out).items()}
    cfg.setdefault("site", "layers.2.output")
    return SAE(SAEConfig(architecture=arch, d_in=D, d_sae=F, **cfg), w)


def test_jumprelu_is_strict_at_the_threshold_and_relu_at_threshold_zero():
    sae = make("jumprelu")
    h = mx.array([[0.5, 0.2, -1.0] + [0.0] * (F - 3)])
    sae.threshold = mx.array([0.5, 0.1, 0.0] + [0.0] * (F - 3))
    assert sae.activation(h)[0, :3].tolist() == pytest.approx([0.0, 0.2, 0.0])
    sae.threshold = mx.zeros((F,))
    x = mx.random.normal((5, D))
    assert mx.allclose(sae.activation(sae.pre_acts(x)), mx.maximum(sae.pre_acts(x), 0)).item()


def test_topk_keeps_exactly_k_even_on_ties_and_fewer_when_few_are_positive():
    h = mx.ones((3, 10))  # all tied
    assert (topk_relu(h, 4) > 0).sum(axis=-1).tolist() == [4, 4, 4]
    h = mx.array([[1.0, 2.0, -1.0, -2.0, -3.0]])
    f = topk_relu(h, 3)
    assert f.tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0]]
    sae = make("topk", k=6)
    f = sae.encode(mx.random.normal((2, 7, D)))
    assert ((f > 0).sum(axis=-1) <= 6).all().item() and f.shape == (2, 7, F)


def test_topk_rescaled_by_decoder_norm_is_folded_on_load_without_changing_anything():
    w = {k: mx.array(v) for k, v in weights("topk").items()}
    x = mx.random.normal((4, D))
    norms = mx.linalg.norm(w["W_dec"], axis=-1)
    h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = (topk_relu(h * norms, 5) / norms) @ w["W_dec"] + w["b_dec"]
    sae = SAE(SAEConfig("topk", D, F, k=5, rescale_acts_by_decoder_norm=True, site="layers.0.output"), w)
    assert mx.allclose(sae(x), expected, atol=1e-5).item()
    assert mx.allclose(mx.linalg.norm(sae.W_dec, axis=-1), mx.array(1.0), atol=1e-5).item()


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_folding_decoder_norms_leaves_reconstructions_unchanged(arch):
    sae = make(arch)
    x = mx.random.normal((6, D))
    before = sae(x)
    sae.fold_W_dec_norm()
    assert mx.allclose(sae(x), before, rtol=1e-5, atol=1e-5).item()
    assert mx.allclose(mx.linalg.norm(sae.W_dec, axis=-1), mx.array(1.0), atol=1e-5).item()
    with pytest.raises(SAEError, match="TopK"):
        make("topk", k=3).fold_W_dec_norm()


def test_gated_encoding_follows_its_gate_and_magnitude_paths():
    sae = make("gated")
    x = mx.random.normal((3, D))
    xt = x - sae.b_dec
    gate = (xt @ sae.W_enc + sae.b_gate) > 0
    mag = mx.maximum(xt @ (sae.W_enc * mx.exp(sae.r_mag)) + sae.b_mag, 0)
    assert mx.allclose(sae.encode(x), mx.where(gate, mag, 0)).item()


def test_weights_of_the_wrong_shape_fail_naming_the_tensor():
    w = {k: mx.array(v) for k, v in weights("standard").items()}
    w["W_dec"] = w["W_dec"][:, :10]
    with pytest.raises(SAEError, match="W_dec has shape"):
        SAE(SAEConfig("standard", D, F, site="layers.0.output"), w)


# -- splicing -------------------------------------------------------------------------------------


@pytest.fixture
def f32_llama(llama):
    return llama  # the tiny Llama runs in float32


def test_an_unedited_splice_leaves_the_output_unchanged(f32_llama):
    sae = make("topk", k=8)
    plain = f32_llama.run("The capital of France").output
    spliced = f32_llama.run("The capital of France", saes=[sae])
    assert mx.array_equal(plain, spliced.output).item()
    # through the full decode(f) + error path (a no-op edit on the features forces it)
    forced = f32_llama.run("The capital of France", saes=[sae],
                           interventions={"layers[2].output.sae.features": lambda f: f + 0.0})
    assert mx.abs(forced.output - plain).max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_sub_sites_are_readable_and_consistent(f32_llama, arch):
    sae = make(arch, **({"k": 8} if arch == "topk" else {}))
    names = [f"layers.2.output.sae.{s}" for s in ("pre", "features", "recons", "error")]
    tr = f32_llama.run("The capital of France", saes=[sae], capture=["layers.2.output", *names])
    x = tr.activations["layers.2.output"]
    f = tr.activations["layers[2].output.sae.features"]
    assert f.shape == (1, x.shape[1], F) and f.dtype == mx.float32
    assert mx.allclose(f, sae.encode(x), atol=1e-6).item()
    recons, error = tr.activations["layers.2.sae.recons"], tr.activations["blocks.2.hook_resid_post.sae.error"]
    assert mx.allclose(recons + error, x, atol=1e-5).item()
    assert mx.allclose(recons, sae.decode(f), atol=1e-5).item()


def test_editing_feature_i_by_delta_moves_the_site_by_delta_times_its_decoder_row(f32_llama):
    sae = make("jumprelu")
    text = "The capital of France"
    base = f32_llama.run(text, saes=[sae], capture=["layers.2.output"]).activations["layers.2.output"]
    delta, i = 2.5, 7

    def bump(f):
        return f + delta * (mx.arange(F) == i)

    tr = f32_llama.run(text, saes=[sae], capture=["layers.2.output"],
                       interventions={"layers.2.output.sae.features": bump})
    moved = tr.activations["layers.2.output"] - base
    assert mx.allclose(moved, mx.broadcast_to(delta * sae.W_dec[i], moved.shape), atol=1e-5).item()


def test_iv_on_features_restricts_to_positions(f32_llama):
    sae = make("standard")
    tr = f32_llama.run("The capital of France", saes=[sae], capture=["layers.2.output.sae.features", "layers.2.output"],
                       interventions={"layers.2.output.sae.features": iv.zero_out.at(positions=1)})
    f = tr.activations["layers.2.output.sae.features"]
    assert (f[0, 1] == 0).all().item() and (f[0, 0] != 0).any().item()
    clean = f32_llama.run("The capital of France", capture=["layers.2.output"]).activations["layers.2.output"]
    changed = mx.abs(tr.activations["layers.2.output"] - clean).max(axis=-1)[0]
    assert changed[1].item() > 1e-3 and changed[0].item() == 0 and changed[2].item() == 0
    # zero-ablating through the splice = subtracting f @ W_dec at that position
    f_clean = sae.encode(clean)
    expected = clean[0, 1] - f_clean[0, 1] @ sae.W_dec
    assert mx.allclose(tr.activations["layers.2.output"][0, 1], expected, atol=1e-4).item()


def test_without_the_error_term_the_site_is_the_reconstruction(f32_llama):
    sae = make("standard").with_error_term(False)
    tr = f32_llama.run("The capital of France", saes=[sae], capture=["layers.2.output", "layers.2.output.sae.recons"])
    assert mx.allclose(tr.activations["layers.2.output"], tr.activations["layers.2.output.sae.recons"]).item()
    plain = f32_llama.run("The capital of France").output
    assert mx.abs(tr.output - plain).max().item() > 1e-3


def test_a_transcoder_reads_its_input_site_and_replaces_its_output_site(f32_llama):
    sae = make("transcoder", apply_b_dec_to_input=False, site="layers.1.ln2", site_out="layers.1.mlp")
    tr = f32_llama.run("The capital of France", saes=[sae],
                       capture=["layers.1.ln2", "layers.1.mlp", "layers.1.mlp.sae.recons", "layers.1.mlp.sae.error"])
    a = tr.activations
    assert mx.allclose(a["layers.1.mlp.sae.recons"], sae(a["layers.1.ln2"]), atol=1e-5).item()
    assert mx.allclose(a["layers.1.mlp.sae.recons"] + a["layers.1.mlp.sae.error"], a["layers.1.mlp"], atol=1e-5).item()
    assert mx.array_equal(tr.output, f32_llama.run("The capital of France").output).item()


def test_a_width_mismatch_or_a_missing_site_fails_clearly_and_leaves_the_model_as_it_was(f32_llama, tmp_path):
    w = {k: mx.array(v) for k, v in weights("standard", d_in=32).items()}
    narrow = SAE(SAEConfig("standard", 32, F, site="layers.2.output"), w)
    with pytest.raises(SAEError, match="width 32 does not match the site layers.2.output"):
        f32_llama.run("The capital", saes=[narrow])
    folder, _ = saelens_folder(tmp_path / "far", hook="blocks.9.hook_resid_post")
    with pytest.raises(SAEError, match=r"metadata.hook_name = 'blocks.9.hook_resid_post'.*layer 9 does not exist"):
        load_sae(folder, model=f32_llama)
    far = load_sae(folder)
    with pytest.raises(mlxterp.UnknownNameError, match="layer 9"):
        f32_llama.run("The capital", saes=[far])
    # the model is unprobed and unchanged
    assert type(f32_llama.model).__name__ == "Model"
    plain = f32_llama("The capital")
    assert mx.array_equal(plain, f32_llama.run("The capital").output).item()


def test_attached_saes_apply_to_runs_generation_and_patching(f32_llama):
    sae = make("standard").with_error_term(False)
    plain = f32_llama.generate("The capital of", max_tokens=4).tokens
    with f32_llama.saes(sae):
        spliced = f32_llama.generate("The capital of", max_tokens=4,
                                     capture=["layers.2.output.sae.features"])
        tr = f32_llama.run("The capital of", capture=["layers.2.output.sae.features"])
    assert tr.activations["layers.2.output.sae.features"].shape[-1] == F
    assert spliced.activations[0]["layers.2.output.sae.features"].shape[-1] == F
    assert f32_llama.attached_saes == ()
    assert f32_llama.generate("The capital of", max_tokens=4).tokens == plain
    with pytest.raises(mlxterp.UnknownNameError):
        f32_llama.run("The capital of", capture=["layers.2.output.sae.features"])


# -- evaluation -----------------------------------------------------------------------------------


def test_explained_variance_predicting_the_mean_is_zero_and_perfect_is_one():
    from mlxterp_saes import explained_variance

    x = mx.random.normal((200, 16), key=mx.random.key(0)) * 3 + 1
    mean = mx.broadcast_to(x.mean(axis=0), x.shape)
    assert explained_variance(x, mean) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(x, x) == pytest.approx(1.0, abs=1e-12)


def test_a_constant_offset_does_not_inflate_explained_variance():
    from mlxterp_saes import explained_variance

    x = np.random.default_rng(0).normal(size=(300, 8))
    x_hat = x + np.random.default_rng(1).normal(scale=0.5, size=x.shape)
    expected = 1 - ((x - x_hat) ** 2).sum() / (x.var(axis=0, ddof=0).sum() * len(x))
    for offset in (0.0, 1e4):
        got = explained_variance(mx.array(x + offset), mx.array(x_hat + offset))
        assert got == pytest.approx(expected, abs=1e-3 if offset else 1e-6)


def test_mse_does_not_depend_on_the_batch_size():
    from mlxterp_saes.evaluate import Accumulator

    x = mx.random.normal((90, 8), key=mx.random.key(2))
    x_hat = x * 0.7
    whole, parts = Accumulator(1), Accumulator(1)
    whole.add(x, x_hat)
    for start in range(0, 90, 7):
        parts.add(x[start : start + 7], x_hat[start : start + 7])
    assert parts.mse() == pytest.approx(whole.mse(), rel=1e-9)
    assert parts.explained_variance() == pytest.approx(whole.explained_variance(), rel=1e-9)
    assert whole.mse() == pytest.approx(((x - x_hat) ** 2).sum(-1).mean().item(), rel=1e-5)


def exact_sae(site="layers.2.output") -> SAE:
    """ReLU(x) - ReLU(-x) = x: a standard SAE that reconstructs every input exactly."""
    eye = mx.eye(D)
    w = {"W_enc": mx.concatenate([eye, -eye], axis=1), "b_enc": mx.zeros((2 * D,)),
         "W_dec": mx.concatenate([eye, -eye], axis=0), "b_dec": mx.zeros((D,))}
    return SAE(SAEConfig("standard", D, 2 * D, site=site, apply_b_dec_to_input=False), w)


def test_an_exact_sae_recovers_all_the_loss_and_a_null_one_none(f32_llama):
    from helpers import CORPUS

    result = exact_sae().evaluate(f32_llama, CORPUS, progress=False)
    assert result.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert result.ce_spliced == pytest.approx(result.ce_clean, abs=1e-4)
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert result.kl_spliced == pytest.approx(0.0, abs=1e-5) and result.kl_zero_ablated > 0
    assert result.l0 == pytest.approx(D)  # one of each +/- pair fires per dimension
    assert sum(result.l0_histogram) == result.n_tokens
    null = exact_sae()
    null.W_dec = mx.zeros_like(null.W_dec)
    zero = null.evaluate(f32_llama, CORPUS, progress=False)
    assert zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert zero.explained_variance < 0.05
    assert "CE recovered" in repr(result)
    result.plot()
