"""SAE architectures are modules in a registry: a third party adds one by registering one module
(trained, saved in the SAELens layout and loaded back without touching mlxterp_saes)."""

from __future__ import annotations

import importlib
import json

import mlx.core as mx
import pytest
from helpers import CORPUS

import mlxterp_saes
from mlxterp_saes import SAEError, get_architecture, load_sae, register_architecture, train_sae
from mlxterp_saes.architectures import architectures

TEXTS = CORPUS * 4

# A third party's architecture: one module, written as its package would ship it.
SHIFTED_RELU = '''
"""ReLU with a fixed per-feature shift: f = ReLU(h - shift), shift (d_sae,) a ramp from 0 to
0.1 set when training starts and never trained."""

import mlx.core as mx

from mlxterp_saes.architectures import base

name = "shifted_relu"


def tensors(cfg):
    return {**base.tensors(cfg), "shift": (cfg.d_sae,)}


def activation(sae, h, x):
    return mx.maximum(h - sae.shift, 0)


def fold_decoder_norm(sae, norms):
    base.fold_decoder_norm(sae, norms)
    sae.shift = sae.shift * norms  # h scales with the feature's norm: so does its shift


def init_params(t, x):
    return {**base.init_params(t, x), "shift": mx.linspace(0, 0.1, t.d_sae)}


def train_activation(t, params, h):
    return mx.maximum(h - mx.stop_gradient(params["shift"]), 0)


def loss(t, params, h, f, error, dead):
    return t.settings["l1"] * f.sum(axis=-1).mean()


def export(t):
    weights, config = base.export(t)
    return {**weights, "shift": t.params["shift"]}, config
'''


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    from mlxterp_saes import architectures as module

    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))
    return module


@pytest.fixture
def shifted_relu(tmp_path, monkeypatch, registry):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "shifted_relu_sae.py").write_text(SHIFTED_RELU)
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    return importlib.import_module("shifted_relu_sae")


def test_a_registered_module_trains_saves_and_loads_back_with_the_same_numbers(llama, tmp_path, shifted_relu):
    options = dict(d_sae=32, n_tokens=256, batch_size=64, buffer_tokens=128, progress=False, l1_coefficient=0.1)
    with pytest.raises(SAEError, match="cannot train architecture 'shifted_relu'"):
        train_sae(llama, "layers.2.output", TEXTS, architecture="shifted_relu", **options)
    register_architecture(shifted_relu)
    sae = train_sae(llama, "layers.2.output", TEXTS, architecture="shifted_relu", save_dir=tmp_path / "out", **options)
    assert sae.training_log.steps[-1] == 4 and sae.cfg.architecture == "shifted_relu"
    cfg = json.loads((tmp_path / "out" / "layers.2.output" / "cfg.json").read_text())
    assert cfg["architecture"] == "shifted_relu" and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"

    again = load_sae(tmp_path / "out" / "layers.2.output", model=llama)
    assert again.tensor_names == sae.tensor_names and "shift" in again.tensor_names
    for name in sae.tensor_names:
        assert mx.array_equal(again[name], sae[name]).item(), name
    with llama.trace(CORPUS[0], saes=[again.with_error_term(False)], capture=["layers.2.output.sae.features"]) as tr:
        features = tr.activations["layers.2.output.sae.features"]
    x = llama.run(CORPUS[0], capture=["layers.2.output"]).activations["layers.2.output"]
    assert mx.array_equal(features, sae.encode(x)).item()
    assert mx.array_equal(again(x), sae(x)).item()
    # the features are the module's rule on the pre-activations, and its decoder rows unit norm
    assert mx.array_equal(features, mx.maximum(again.pre_acts(x) - again.shift, 0)).item()
    assert mx.allclose(mx.linalg.norm(again.W_dec, axis=-1), mx.ones((32,)), atol=1e-5).item()


def test_a_file_of_an_unregistered_architecture_says_how_to_read_it(llama, tmp_path, registry, shifted_relu):
    register_architecture(shifted_relu)
    x = mx.random.normal((6, 64), key=mx.random.key(0))
    sae = train_sae(llama, "layers.2.output", x, architecture="shifted_relu", d_sae=16, n_tokens=12, batch_size=6,
                    buffer_tokens=6, progress=False)
    sae.save(tmp_path / "sae")
    registry._REGISTRY.pop("shifted_relu")
    with pytest.raises(SAEError, match="unknown SAE architecture 'shifted_relu'.*register_architecture"):
        load_sae(tmp_path / "sae")


def test_every_saelens_architecture_is_a_registered_module():
    for name in ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder"):
        arch = get_architecture(name)
        assert arch.name == name and arch.module.__name__ == f"mlxterp_saes.architectures.{name}"
    assert get_architecture("relu") is get_architecture("standard")
    assert {a.training_name for a in architectures() if a.trains} == {"relu", "topk", "batchtopk", "jumprelu"}
    assert [a.name for a in architectures() if a.transcoder] == ["transcoder", "skip_transcoder", "jumprelu_transcoder"]
    with pytest.raises(SAEError, match="batchtopk SAEs are saved as 'jumprelu'"):
        get_architecture("batchtopk")
    assert get_architecture("batchtopk", training=True).saved_as == "jumprelu"
    with pytest.raises(SAEError, match="cannot train architecture 'gated'"):
        get_architecture("gated", training=True)


def test_registering_refuses_a_taken_name_and_a_module_that_does_nothing(registry):
    class Mine:  # any object with the module's names will do
        name = "topk"

        @staticmethod
        def activation(sae, h, x):
            return h

    with pytest.raises(SAEError, match="'topk' is taken.*replace=True"):
        register_architecture(Mine)
    assert register_architecture(Mine, replace=True) is get_architecture("topk")

    class Nothing:
        name = "nothing"

    with pytest.raises(SAEError, match="neither activation.*nor train_activation"):
        register_architecture(Nothing)
    with pytest.raises(SAEError, match="needs a name"):
        register_architecture(type("Nameless", (), {"activation": staticmethod(lambda sae, h, x: h)}))


def test_the_public_names_are_exported():
    for name in ("register_architecture", "get_architecture", "Architecture"):
        assert name in mlxterp_saes.__all__ and hasattr(mlxterp_saes, name)
