"""SAE interop with SAELens 6.54: files SAELens itself wrote, and the numbers it computes on
them, must load and come out the same here (tests/fixtures/saelens/, made by generate.py there;
README.md there says what each file and array is)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxterp.plugin import FileFormatError
from mlxterp_saes import SAE, SAEConfig, SAEError, load_sae, train_sae

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
ATOL = 1e-5  # float32, MLX against torch


def reference(item: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / item / "reference.npz"))


def close(a, b, atol=ATOL) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=atol))


def saved_cfg(sae: SAE, folder: Path) -> dict:
    sae.save(folder)
    return json.loads((folder / "cfg.json").read_text())


# -- a. jumprelu_skip_transcoder ----------------------------------------------------------------


def test_a_jumprelu_skip_transcoder_loads_and_computes_what_saelens_does():
    ref = reference("a_jumprelu_skip_transcoder")
    sae = load_sae(FIXTURES / "a_jumprelu_skip_transcoder" / "sae")
    assert sae.cfg.architecture == "jumprelu_skip_transcoder" and sae.cfg.is_transcoder
    assert (sae.cfg.site, sae.cfg.site_out) == ("layers.1.ln2", "layers.1.mlp")
    assert sae.W_skip.shape == (12, 16)  # (d_out, d_in), as SAELens stores it
    x = mx.array(ref["x"])
    assert close(sae.pre_acts(x), ref["hidden_pre"])
    f = sae.encode(x)
    assert close(f, ref["encode"])
    # SAELens's decode is the dictionary alone: the skip is part of the forward
    assert close(sae.decode(f), ref["decode"])
    assert close(sae(x), ref["forward"])
    assert close(sae(mx.array(ref["x3"])), ref["forward_x3"]) and close(sae.encode(mx.array(ref["x3"])), ref["encode_x3"])


def test_a_saved_jumprelu_skip_transcoder_reads_back_with_the_same_fields(tmp_path):
    sae = load_sae(FIXTURES / "a_jumprelu_skip_transcoder" / "sae")
    cfg = saved_cfg(sae, tmp_path / "again")
    theirs = json.loads((FIXTURES / "a_jumprelu_skip_transcoder" / "sae" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "d_out", "apply_b_dec_to_input", "normalize_activations"):
        assert cfg[key] == theirs[key], key
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    again = load_sae(tmp_path / "again")
    for name in sae.tensor_names:
        assert mx.array_equal(sae[name], again[name]).item(), name


def test_a_skip_transcoders_decode_has_no_skip_and_their_splice_stays_exact(llama):
    D, F = 64, 96
    rng = np.random.default_rng(3)
    w = {"W_enc": rng.normal(0, 0.3, (D, F)), "b_enc": rng.normal(0, 0.1, F), "W_dec": rng.normal(0, 0.3, (F, D)),
         "b_dec": rng.normal(0, 0.1, D), "threshold": np.abs(rng.normal(0, 0.1, F)), "W_skip": rng.normal(0, 0.3, (D, D))}
    for arch in ("skip_transcoder", "jumprelu_skip_transcoder"):
        weights = {k: mx.array(v.astype(np.float32)) for k, v in w.items() if arch.startswith("jumprelu") or k != "threshold"}
        sae = SAE(SAEConfig(arch, D, F, d_out=D, apply_b_dec_to_input=False, site="layers.1.ln2",
                            site_out="layers.1.mlp"), weights)
        x = mx.random.normal((5, D), key=mx.random.key(0))
        f = sae.encode(x)
        assert mx.allclose(sae.decode(f), f @ sae.W_dec + sae.b_dec, atol=1e-5).item(), arch
        assert mx.allclose(sae(x), sae.decode(f) + x @ sae.W_skip.T, atol=1e-5).item(), arch
        names = ["layers.1.ln2", "layers.1.mlp", "layers.1.mlp.sae.recons", "layers.1.mlp.sae.error"]
        tr = llama.run("The capital of France", saes=[sae], capture=names)
        a = tr.activations
        # the splice's reconstruction is the transcoder's prediction, skip included
        assert mx.allclose(a["layers.1.mlp.sae.recons"], sae(a["layers.1.ln2"]), atol=1e-5).item(), arch
        assert mx.allclose(a["layers.1.mlp.sae.recons"] + a["layers.1.mlp.sae.error"], a["layers.1.mlp"], atol=1e-5).item()
        assert mx.array_equal(tr.output, llama.run("The capital of France").output).item(), arch


# -- b. normalize_activations = "covariance_whitening" -------------------------------------------


def test_b_covariance_whitening_loads_as_the_identity_and_is_written_back(tmp_path):
    ref = reference("b_covariance_whitening")
    sae = load_sae(FIXTURES / "b_covariance_whitening" / "sae")
    assert sae.cfg.normalize_activations == "covariance_whitening"
    x = mx.array(ref["x"])
    assert close(sae.encode(x), ref["sae_encode"]) and close(sae(x), ref["sae_forward"])
    assert saved_cfg(sae, tmp_path / "again")["normalize_activations"] == "covariance_whitening"


def test_b_a_checkpoint_with_a_whitening_file_loads_as_saelens_loads_it_and_says_what_it_ignores():
    ref = reference("b_covariance_whitening")
    with pytest.warns(UserWarning, match=r"activation_whitening\.safetensors.*ignore"):
        sae = load_sae(FIXTURES / "b_covariance_whitening" / "checkpoint")
    x = mx.array(ref["x"])
    assert close(sae.encode(x), ref["checkpoint_encode_as_saelens_loads_it"])
    assert close(sae(x), ref["checkpoint_decode_as_saelens_loads_it"])


# -- c. float64 files ----------------------------------------------------------------------------


def test_c_a_safetensors_file_of_float64_tensors_reads_as_float32():
    from safetensors.numpy import load_file

    from mlxterp.plugin import read_safetensors

    path = FIXTURES / "b_covariance_whitening" / "checkpoint" / "activation_whitening.safetensors"
    tensors = read_safetensors(path, "a whitening file")

    theirs = load_file(str(path))
    assert sorted(tensors) == sorted(theirs) == ["inverse_matrix", "matrix", "mean"]
    for name, value in theirs.items():
        assert value.dtype == np.float64 and tensors[name].dtype == mx.float32
        assert np.array_equal(np.array(tensors[name]), value.astype(np.float32)), name


def test_c_a_float64_sae_loads_and_computes_what_saelens_does_in_float32():
    ref = reference("c_float64")
    sae = load_sae(FIXTURES / "c_float64" / "sae_float64")
    assert sae.W_enc.dtype == mx.float32
    x = mx.array(ref["x64"].astype(np.float32))
    assert close(sae.encode(x), ref["f64_loaded_as_float32_encode"])
    assert close(sae(x), ref["f64_loaded_as_float32_decode"])
    assert close(sae(x), ref["f64_decode"], atol=1e-4)  # and the float64 SAE's own numbers, to float32


def test_c_a_batchtopk_checkpoint_is_converted_as_saelens_saves_it_for_inference():
    ref = reference("c_float64")
    sae = load_sae(FIXTURES / "c_float64" / "batchtopk_checkpoint")  # F64 0-d topk_threshold
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.rescale_acts_by_decoder_norm
    assert sae.cfg.metadata["training_architecture"] == "batchtopk"
    for name in ("threshold", "W_enc", "b_enc", "W_dec"):
        assert close(sae[name], ref[f"batchtopk_checkpoint_as_jumprelu_{name}"], atol=1e-6), name
    x = mx.array(ref["batchtopk_x"])
    assert close(sae.encode(x), ref["batchtopk_checkpoint_as_jumprelu_encode"])
    assert close(sae(x), ref["batchtopk_checkpoint_as_jumprelu_decode"])
    # SAELens's own conversion of the same run reads the same
    saved = load_sae(FIXTURES / "c_float64" / "batchtopk_inference")
    assert close(saved.encode(x), ref["batchtopk_inference_encode"]) and close(saved(x), ref["batchtopk_inference_decode"])


def test_c_a_truncated_or_foreign_file_is_still_called_that(tmp_path):
    from mlxterp.plugin import read_safetensors

    data = (FIXTURES / "c_float64" / "sae_float64" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match=r"cut\.safetensors.*truncated"):
        read_safetensors(tmp_path / "cut.safetensors", "SAE weights")
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FileFormatError, match=r"text\.safetensors.*not a safetensors file"):
        read_safetensors(tmp_path / "text.safetensors", "SAE weights")


# -- d. normalize_activations = "layer_norm" ------------------------------------------------------


def test_d_layer_norm_is_undone_with_the_std_as_saelens_does():
    ref = reference("d_layer_norm")
    sae = load_sae(FIXTURES / "d_layer_norm" / "sae")
    x = mx.array(ref["x"])
    assert close(sae.process_input(x) + sae.b_dec, ref["normalised_input"], atol=1e-4)
    f = sae.encode(x)
    assert close(f, ref["encode"], atol=1e-4)
    out = np.array(sae.decode(f, x))
    # the sharp check (README): undoing the normalisation with SAELens's statistics gives back
    # the reconstruction before it; std + 1e-5 misses by 3e-5 to 1.8
    assert close((out - ref["ln_mu"]) / ref["ln_std"], ref["recons_before_denorm"])
    assert close(sae(x), ref["forward"])


# -- e. hook_z SAEs -------------------------------------------------------------------------------


def test_e_a_hook_z_sae_takes_and_gives_heads_as_saelens_does():
    ref = reference("e_hook_z")
    sae = load_sae(FIXTURES / "e_hook_z" / "sae")
    f = sae.encode(mx.array(ref["x_nhd"]))
    assert close(f, ref["encode_nhd"])
    assert close(sae.decode(f), ref["decode_nhd"])  # (N, H, D), the split of the input encoded
    assert sae.cfg.reshape_activations == "hook_z" and sae.cfg.site == "layers.1.attn.z"
    assert close(sae(mx.array(ref["x_nhd"])), ref["forward_nhd"])
    f = sae.encode(mx.array(ref["x_bthd"]))
    assert close(f, ref["encode_bthd"]) and close(sae.decode(f), ref["decode_bthd"])
    assert close(sae.encode(mx.array(ref["x_flat"])), ref["encode_nhd"])  # flat input too (SAELens refuses it)
    flat = load_sae(FIXTURES / "e_hook_z" / "sae_flat")
    f = flat.encode(mx.array(ref["x_flat"]))
    assert close(f, ref["sae_flat_encode"]) and close(flat.decode(f), ref["sae_flat_decode"])
    assert flat.cfg.reshape_activations == "none"


def test_e_reshape_activations_survives_a_round_trip_and_follows_the_final_hook_name(tmp_path):
    for folder, value in (("sae_flat", "none"), ("sae", "hook_z")):  # sae_flat: hook_z site, "none" in its cfg
        sae = load_sae(FIXTURES / "e_hook_z" / folder)
        assert saved_cfg(sae, tmp_path / folder)["reshape_activations"] == value, folder
        assert load_sae(tmp_path / folder).cfg.reshape_activations == value, folder
    built = SAE(SAEConfig("standard", 16, 32, site="layers.6.attn.z"))
    cfg = saved_cfg(built, tmp_path / "built")
    assert cfg["metadata"]["hook_name"] == "blocks.6.attn.hook_z" and cfg["reshape_activations"] == "hook_z"
    resid = saved_cfg(SAE(SAEConfig("standard", 16, 32, site="layers.6.output")), tmp_path / "resid")
    assert resid["reshape_activations"] == "none"


# -- f. what train_sae writes, what load_sae checks -----------------------------------------------


@pytest.mark.parametrize(
    "report, name",
    [({"format": "gguf", "file": "/Users/someone/models/tiny.Q4_1.gguf", "name": "Tiny Llama 4L"}, "tiny.Q4_1"),
     ({"format": "hub", "repo": "someone/tiny-llama", "file": "/home/someone/.cache/x.safetensors"}, "someone/tiny-llama"),
     ({"format": "mlx-lm", "directory": "/home/someone/models/tiny-llama-4bit"}, "tiny-llama-4bit")],
)
def test_f_train_sae_writes_the_models_name_never_a_path(llama, tmp_path, report, name):
    llama.load_report = report
    x = mx.random.normal((64, 64), key=mx.random.key(0))
    sae = train_sae(llama, "layers.2.output", x, d_sae=16, k=4, n_tokens=64, batch_size=32, buffer_tokens=64,
                    progress=False)
    cfg = saved_cfg(sae, tmp_path / "sae")
    assert cfg["metadata"]["model_name"] == name
    assert "/someone/" not in (tmp_path / "sae" / "cfg.json").read_text()


def test_f_load_sae_with_a_model_checks_the_widths_at_once(llama, tmp_path):
    rng = np.random.default_rng(0)
    narrow = SAE(SAEConfig("standard", 32, 16, site="layers.2.output"),
                 {"W_enc": mx.array(rng.normal(size=(32, 16)).astype(np.float32))} | {
                     "b_enc": mx.zeros((16,)), "W_dec": mx.zeros((16, 32)), "b_dec": mx.zeros((32,))})
    narrow.save(tmp_path / "narrow")
    with pytest.raises(SAEError, match=r"d_in = 32.*layers\.2\.output.*width 64"):
        load_sae(tmp_path / "narrow", model=llama)
    load_sae(tmp_path / "narrow")  # without a model there is nothing to check against
    tc = SAE(SAEConfig("transcoder", 64, 16, d_out=48, apply_b_dec_to_input=False, site="layers.1.ln2",
                       site_out="layers.1.mlp"))
    tc.save(tmp_path / "tc")
    with pytest.raises(SAEError, match=r"d_out = 48.*layers\.1\.mlp.*width 64"):
        load_sae(tmp_path / "tc", model=llama)
    SAE(SAEConfig("standard", 64, 16, site="layers.2.output")).save(tmp_path / "fits")
    assert load_sae(tmp_path / "fits", model=llama).cfg.d_in == 64
