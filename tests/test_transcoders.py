"""Transcoders and cross-layer transcoders: circuit-tracer's files load and give circuit-tracer's
numbers (its own pre-activations and reconstructions on a tiny random Llama, from the fixtures in
tests/fixtures/circuit_tracer), splicing them changes nothing until a feature is edited, a CLT
feature moves every later MLP output by its decoder rows there, files round-trip in both
layouts, and bad files or models are clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_family

import mlxterp
from mlxterp import interventions as iv
from mlxterp_transcoders import TranscoderError, save_transcoders

FIXTURES = Path(__file__).parent / "fixtures" / "circuit_tracer"
SETS = ["plt_jumprelu", "plt_skip_relu", "clt_jumprelu"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny random HF Llama circuit-tracer ran on, loaded by mlx-lm from the same folder."""
    return mlxterp.load(FIXTURES / "model")


@pytest.fixture(scope="module")
def ids():
    return np.load(FIXTURES / "reference" / "model_io.npz")["input_ids"].tolist()


def load(name, model=None):
    return mlxterp.load_transcoders(FIXTURES / "transcoders" / name, model=model)


def test_the_model_is_circuit_tracers(tiny, ids):
    reference = np.load(FIXTURES / "reference" / "model_io.npz")
    tr = tiny.run([ids], capture=["layers[*].ln2", "layers[*].mlp", "logits"])
    np.testing.assert_allclose(np.array(tr.activations["logits"][0]), reference["hf_logits"], atol=2e-5)
    np.testing.assert_allclose(np.array(tr.activations["layers[*].ln2"][:, 0]), reference["mlp_in"], atol=1e-5)


@pytest.mark.parametrize("name", SETS)
def test_circuit_tracers_files_give_its_features_and_reconstructions(tiny, ids, name):
    tc = load(name, model=tiny)
    setup = np.load(FIXTURES / "reference" / f"{name}__setup.npz")
    tr = tiny.run([ids], capture=["layers[*].ln2"])
    x = {layer: tr.activations[f"layers.{layer}.ln2"][0] for layer in tc.layers}
    pre = np.stack([np.array(tc.pre_acts(x[layer], layer)) for layer in tc.layers])
    np.testing.assert_allclose(pre[:, 1:], setup["pre_acts"][:, 1:], atol=2e-5)  # circuit-tracer zeroes position 0
    features = {layer: tc.encode(x[layer], layer) for layer in tc.layers}
    features = {layer: mx.concatenate([mx.zeros_like(f[:1]), f[1:]]) for layer, f in features.items()}
    reconstruction = np.stack([np.array(tc.reconstruct(features, x[layer], layer)) for layer in tc.layers])
    np.testing.assert_allclose(reconstruction, setup["reconstruction"], atol=2e-5)
    assert tc.sites()[0] == ("layers.0.ln2", "layers.0.mlp") and tc.kind == ("clt" if "clt" in name else "plt")
    assert len(repr(tc)) < 300


@pytest.mark.parametrize("name", SETS)
def test_an_unedited_splice_changes_nothing_and_its_sub_sites_are_sites(tiny, ids, name):
    tc = load(name)
    plain = tiny.run([ids], capture=["logits", "layers[*].mlp"]).activations
    with tiny.transcoders(tc):
        spliced = tiny.run([ids], capture=["logits", "layers.1.mlp.transcoder.features",
                                           "layers.1.mlp.transcoder.recons", "layers.1.mlp.transcoder.error"]).activations
    assert mx.array_equal(spliced["logits"], plain["logits"]).item()
    recons, error = spliced["layers.1.mlp.transcoder.recons"], spliced["layers.1.mlp.transcoder.error"]
    assert mx.allclose(recons + error, plain["layers.1.mlp"], atol=1e-5).item()
    assert spliced["layers.1.mlp.transcoder.features"].shape == (1, len(ids), tc.d_features)
    again = tiny.run([ids], capture=["logits"], transcoders=tc).activations["logits"]
    assert mx.array_equal(again, plain["logits"]).item()


def test_a_clt_feature_moves_every_later_mlp_by_its_decoder_rows(tiny, ids):
    """Editing feature f at layer i by delta moves layers[j].mlp by delta * W_dec_i[f, j - i]
    for every j >= i, with the error terms and the other layers' features held at their clean
    values (their inputs move, and they would move with them)."""
    tc = load("clt_jumprelu")
    layer, feature, position, delta = 0, 68, 3, 1.75
    names = [f"layers.{j}.mlp.transcoder.{sub}" for j in tc.layers for sub in ("features", "error")]
    with tiny.transcoders(tc):
        clean = tiny.run([ids], capture=names + ["layers[*].mlp"]).activations
        held = {name: iv.replace_with(clean[name]) for name in names if not name.startswith(f"layers.{layer}.mlp.transcoder.features")}

        def bump(f):
            return f.at[0, position, feature].add(delta)

        edited = tiny.run([ids], capture=["layers[*].mlp"],
                          interventions={**held, f"layers.{layer}.mlp.transcoder.features": bump}).activations
    for j in tc.layers:
        change = np.array(edited[f"layers.{j}.mlp"] - clean[f"layers.{j}.mlp"])[0]
        expected = np.zeros_like(change)
        expected[position] = delta * np.array(tc.W_dec[layer][feature, j - layer])
        np.testing.assert_allclose(change, expected, atol=1e-5)


@pytest.mark.parametrize("name", SETS)
def test_files_round_trip_in_circuit_tracers_layout_and_saelens(tmp_path, name):
    tc = load(name)
    again = mlxterp.load_transcoders(save_transcoders(tc, tmp_path / "ct"))
    x = mx.random.normal((5, tc.d_model), key=mx.random.key(1))
    for layer in tc.layers:
        features = {q: tc.encode(x, q) for q in tc.layers}
        features_again = {q: again.encode(x, q) for q in tc.layers}
        assert mx.array_equal(tc.reconstruct(features, x, layer), again.reconstruct(features_again, x, layer)).item()
    if tc.kind == "plt":
        saelens = mlxterp.load_transcoders(save_transcoders(tc, tmp_path / "sl", layout="saelens"))
        assert saelens.activation == tc.activation and saelens.skip == tc.skip
        for layer in tc.layers:
            features = {q: saelens.encode(x, q) for q in tc.layers}
            assert mx.allclose(saelens.reconstruct(features, x, layer), tc.reconstruct({q: tc.encode(x, q) for q in tc.layers}, x, layer), atol=1e-6).item()


def test_bad_files_and_models_are_clear_errors(tmp_path, tiny):
    plt = tmp_path / "plt"
    shutil.copytree(FIXTURES / "transcoders" / "plt_jumprelu", plt)
    (plt / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match="layer_1.safetensors are missing"):
        mlxterp.load_transcoders(plt)
    clt = tmp_path / "clt"
    shutil.copytree(FIXTURES / "transcoders" / "clt_jumprelu", clt)
    mx.save_safetensors(str(clt / "W_dec_1.safetensors"), {"W_dec_1": mx.zeros((96, 3, 32))})
    with pytest.raises(TranscoderError, match=r"W_dec_1 has shape \(96, 3, 32\).*expected \(F, 2, d\)"):
        mlxterp.load_transcoders(clt)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_pre\nfeature_output_hook: mlp.hook_out\n")
    with pytest.raises(TranscoderError, match="feature_input_hook 'hook_resid_pre'"):
        mlxterp.load_transcoders(tmp_path / "broken")
    with pytest.raises(mlxterp.FileFormatError, match="no such folder"):
        mlxterp.load_transcoders(tmp_path / "nothing")
    wide = mlxterp.InterpretableModel(tiny_family("llama"))  # 64 wide
    with pytest.raises(TranscoderError, match="32 wide; this model's MLP outputs are 64"):
        load("plt_jumprelu", model=wide)
    post_norm = mlxterp.InterpretableModel(tiny_family("olmo2"))  # no ln2: its norms come after
    with pytest.raises(TranscoderError, match="has no 'ln2'"):
        load("plt_jumprelu", model=post_norm)
