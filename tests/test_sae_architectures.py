"""SAE architectures are modules in a registry: a third party adds one by registering one module
(trained, saved in the SAELens layout and loaded back without touching mlxterp_saes), and
train_sae checks every option at its boundary, before the model runs."""

from __future__ import annotations

import importlib
import json

import mlx.core as mx
import numpy as np
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
    """The registry of mlxterp's own architectures (whatever an earlier test or docs page
    registered is left out), restored after the test."""
    from mlxterp_saes import architectures as module

    own = {name: arch for name, arch in module._REGISTRY.items() if getattr(arch.module, "__name__", "").startswith("mlxterp_saes.")}
    monkeypatch.setattr(module, "_REGISTRY", own)
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


def test_every_saelens_architecture_is_a_registered_module(registry):
    for name in ("standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                 "jumprelu_skip_transcoder"):
        arch = get_architecture(name)
        assert arch.name == name and arch.module.__name__ == f"mlxterp_saes.architectures.{name}"
    assert get_architecture("relu") is get_architecture("standard")
    assert {a.training_name for a in architectures() if a.trains} == {"relu", "topk", "batchtopk", "jumprelu"}
    assert [a.name for a in architectures() if a.transcoder] == ["transcoder", "skip_transcoder", "jumprelu_transcoder",
                                                               "jumprelu_skip_transcoder"]
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
    orphan = register_architecture(type("Orphan", (), {"name": "orphan", "saved_as": "elsewhere",
                                                        "train_activation": staticmethod(lambda t, params, h: h)}))
    assert orphan.trains and not orphan.loads
    with pytest.raises(SAEError, match="orphan SAEs are saved as 'elsewhere', which is not a registered"):
        get_architecture("orphan", training=True)  # refused before training, not after it
    with pytest.raises(SAEError, match="needs a name"):
        register_architecture(type("Nameless", (), {"activation": staticmethod(lambda sae, h, x: h)}))


def test_the_public_names_are_exported():
    for name in ("register_architecture", "get_architecture", "Architecture"):
        assert name in mlxterp_saes.__all__ and hasattr(mlxterp_saes, name)


# -- train_sae's options, checked before the model runs -------------------------------------------

BAD = [
    (dict(architecture="topk", d_sae=16, k=64), r"k=64 is out of range: k must be a number in \[1, 16\]"),
    (dict(architecture="topk", d_sae=16, k=0), r"k=0 is out of range.*\[1, 16\]"),
    (dict(architecture="topk", d_sae=16, k=2.5), r"k=2.5 is out of range: k must be a whole number in \[1, 16\]"),
    (dict(architecture="batchtopk", d_sae=16, k=17), r"k=17 is out of range.*\[1, 16\]"),
    (dict(architecture="topk", d_sae=16, k=4, k_aux=0), r"k_aux=0 is out of range.*integer in \[1, 16\]"),
    (dict(architecture="topk", d_sae=16, k=4, k_aux=17), r"k_aux=17 is out of range.*integer in \[1, 16\]"),
    (dict(architecture="batchtopk", d_sae=16, k=4, aux_coefficient=-1.0), r"aux_coefficient=-1.0 .*>= 0"),
    (dict(d_sae=0), r"d_sae=0 is out of range: d_sae must be an integer >= 1"),
    (dict(d_sae=-4), r"d_sae=-4 is out of range"),
    (dict(d_sae=16.0), r"d_sae=16.0 is out of range: d_sae must be an integer"),
    (dict(d_sae=None, expansion=0), r"expansion=0 is out of range: expansion must be an integer >= 1"),
    (dict(lr=0.0), r"lr=0.0 is out of range: lr must be a number > 0"),
    (dict(lr=-1e-3), r"lr=-0.001 is out of range"),
    (dict(lr=float("nan")), r"lr=nan is out of range"),
    (dict(architecture="relu", l1_coefficient=-0.5), r"l1_coefficient=-0.5 is out of range.*>= 0"),
    (dict(architecture="jumprelu", l0_coefficient=-1), r"l0_coefficient=-1 is out of range.*>= 0"),
    (dict(architecture="jumprelu", jumprelu_bandwidth=0.0), r"jumprelu_bandwidth=0.0 is out of range.*> 0"),
    (dict(architecture="jumprelu", jumprelu_init_threshold=0), r"jumprelu_init_threshold=0 is out of range.*> 0"),
    (dict(dead_tokens=0), r"dead_tokens=0 is out of range.*integer >= 1"),
    (dict(checkpoint_every=0), r"checkpoint_every=0 is out of range.*integer >= 1"),
    (dict(log_every=0), r"log_every=0 is out of range.*integer >= 1"),
    (dict(context_size=0), r"context_size=0 is out of range.*integer >= 1"),
    (dict(forward_batch=0), r"forward_batch=0 is out of range.*integer >= 1"),
    (dict(n_tokens=0), r"n_tokens=0 is out of range"),
    (dict(batch_size=-1), r"batch_size=-1 is out of range"),
    (dict(buffer_tokens=0), r"buffer_tokens=0 is out of range"),
]


@pytest.fixture
def no_forward(monkeypatch):
    """Fail if training reaches the data: the options must be refused before."""
    from mlxterp_saes import training as train

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(train, "_source", reached)
    monkeypatch.setattr(train, "_Trainer", reached)
    return Reached


@pytest.mark.parametrize("options, message", BAD, ids=[", ".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD])
def test_an_option_out_of_range_is_refused_before_the_model_runs(llama, no_forward, options, message):
    options = {"architecture": "topk", "d_sae": 16, "k": 4, "progress": False, **options}
    with pytest.raises(SAEError, match=message):
        train_sae(llama, "layers.2.output", TEXTS, **options)


def test_options_in_range_pass_the_checks(llama, no_forward):
    for options in (dict(architecture="topk", d_sae=16, k=16, k_aux=16), dict(architecture="topk", d_sae=16, k=3.0),
                    dict(architecture="batchtopk", d_sae=16, k=2.5, aux_coefficient=0.0),
                    dict(architecture="jumprelu", l0_coefficient=0.0), dict(architecture="relu", l1_coefficient=0)):
        with pytest.raises(no_forward):
            train_sae(llama, "layers.2.output", TEXTS, progress=False, **options)


def test_k_is_checked_against_expansion_times_the_sites_width_without_a_forward_pass(llama, no_forward):
    # d_in is the site's width: 64 for the residual stream, 128 at the MLP's down-projection input
    for site, width in (("layers.2.output", 64), ("layers[1].mlp.act", 128)):
        with pytest.raises(SAEError, match=rf"k={2 * width + 1} is out of range.*\[1, {2 * width}\]"):
            train_sae(llama, site, TEXTS, architecture="topk", d_sae=None, expansion=2, k=2 * width + 1)
        with pytest.raises(no_forward):
            train_sae(llama, site, TEXTS, architecture="topk", d_sae=None, expansion=2, k=2 * width)
    # activations given as arrays, or a dataset's manifest, say their own width
    x = np.zeros((32, 8), dtype=np.float32)
    with pytest.raises(SAEError, match=r"k=17 is out of range.*\[1, 16\]"):
        train_sae(llama, "layers.2.output", x, architecture="topk", d_sae=None, expansion=2, k=17)


def test_a_datasets_manifest_gives_the_width(llama, tmp_path, no_forward, monkeypatch):
    ds = llama.cache_activations(CORPUS[:3], ["layers.1.mlp.act"], tmp_path / "ds", context_size=16, progress=False)
    monkeypatch.setattr("mlxterp.plugin.Hooks", None)  # the model is not asked
    with pytest.raises(SAEError, match=r"k=129 is out of range.*\[1, 128\]"):
        train_sae(llama, "layers.1.mlp.act", ds, architecture="topk", d_sae=None, expansion=1, k=129)
