"""Training transcoders: every kind and activation learns from one forward per batch, the export
reads raw activations (the scales folded into every tensor, the CLT's cross-layer decoders and
the skip included), a resumed run equals an uninterrupted one bitwise, bad input is a clear error
with nothing written, evaluation measures the replacement model, and on the default model a
per-layer transcoder explains more held-out MLP-output variance than PCA at equal sparsity."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import CORPUS, tiny_family

import mlxterp
from mlxterp import OptionError
from mlxterp_saes import explained_variance
from mlxterp_transcoders import TranscoderError, Transcoders, training_memory
from mlxterp_transcoders.training import _Trainer

TEXTS = CORPUS * 12
SMALL = dict(d_features=96, k=6, n_tokens=2048, batch_size=128, buffer_tokens=512, log_every=2, progress=False,
             sparsity_coefficient=0.1, lr=3e-3)
SITES = [f"layers.{i}.{sub}" for sub in ("ln2", "mlp") for i in range(4)]
TRAINED = Path(__file__).parent / "fixtures" / "circuit_tracer" / "trained"


@pytest.mark.parametrize("kind", ["plt", "clt"])
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk", "batchtopk"])
def test_every_kind_and_activation_learns_all_layers_from_one_forward(llama, kind, activation):
    tc = mlxterp.train_transcoders(llama, TEXTS, kind=kind, activation=activation, **SMALL)
    log = tc.training_log
    assert tc.kind == kind and tc.layers == [0, 1, 2, 3] and tc.d_features == 96
    assert tc.activation == {"batchtopk": "jumprelu"}.get(activation, activation)
    assert log.fvu[-1] < 0.8 * log.fvu[0], log.fvu
    assert log.steps[-1] == 16 and len(log.layer_fvu) == 4
    if activation in ("topk", "batchtopk"):
        # k per token and layer (batchtopk: on average over each batch), fewer where a top pre-activation is < 0
        assert all(5 < l0 <= 6 for l0 in log.l0), log.l0
    if kind == "clt":
        assert [tuple(W.shape) for W in tc.W_dec] == [(96, 4 - i, 64) for i in range(4)]


def capture_trainer(monkeypatch) -> dict:
    """Keep the trainer of the next run (its parameters stay in the training space)."""
    kept = {}
    export = _Trainer.export

    def keep(self, name):
        kept["trainer"] = self
        return export(self, name)

    monkeypatch.setattr(_Trainer, "export", keep)
    return kept


@pytest.mark.parametrize("kind, activation, skip", [("plt", "jumprelu", True), ("clt", "relu", True),
                                                    ("clt", "topk", False), ("clt", "jumprelu", False)])
def test_the_export_reproduces_the_training_space_on_raw_activations(llama, monkeypatch, kind, activation, skip):
    """y^_m(raw x) = y^_m(training space, s_x * x) / s_y[m] for every layer, with per-layer scales
    that differ (so each tensor must carry the right one)."""
    kept = capture_trainer(monkeypatch)
    tc = mlxterp.train_transcoders(llama, TEXTS, kind=kind, activation=activation, skip=skip, **SMALL)
    trainer = kept["trainer"]
    assert len(set(trainer.input_scales)) == 4 and len(set(trainer.target_scales)) == 4
    raw = llama.run(CORPUS[:3], capture=SITES).activations
    x = [raw[f"layers.{i}.ln2"].reshape(-1, 64) for i in range(4)]
    _, features, recons = trainer.forward(trainer.params, [a * s for a, s in zip(x, trainer.input_scales)])
    exported = tc({i: x[i] for i in range(4)})
    for i in range(4):
        want = recons[i] / trainer.target_scales[i]
        assert mx.allclose(exported[i], want, rtol=1e-4, atol=1e-4 * mx.abs(want).max().item()).item(), (kind, i)
        assert mx.array_equal(tc.encode(x[i], i) > 0, features[i] > 0).item()


def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(llama, tmp_path, monkeypatch):
    """Killed after a checkpoint and resumed, a CLT ends with exactly the weights of a run that
    never stopped (Adam, the buffer's rows and generator, the data position, the dead counts,
    the sparsity ramp are all in the checkpoint), as does a PLT set from a dataset."""
    dataset = llama.cache_activations(TEXTS, SITES, tmp_path / "ds", context_size=32, batch_size=4, shard_tokens=300,
                                      progress=False)
    cases = [("clt", "jumprelu", TEXTS, True), ("plt", "topk", dataset, False)]
    for kind, activation, data, skip in cases:
        settings = dict(SMALL, kind=kind, activation=activation, skip=skip, context_size=32, buffer_tokens=384,
                        checkpoint_every=3, sparsity_warmup=1.0)
        straight = mlxterp.train_transcoders(llama, data, **settings, checkpoint_dir=tmp_path / f"{kind}-straight")
        calls = {"n": 0}
        real_step = _Trainer.step

        def killed(self, batch):
            calls["n"] += 1
            if calls["n"] > 7:  # dies in step 8, after the step-6 checkpoint
                raise KeyboardInterrupt
            real_step(self, batch)

        monkeypatch.setattr(_Trainer, "step", killed)
        with pytest.raises(KeyboardInterrupt):
            mlxterp.train_transcoders(llama, data, **settings, checkpoint_dir=tmp_path / f"{kind}-killed")
        assert json.loads((tmp_path / f"{kind}-killed" / "checkpoint.json").read_text())["step"] == 6
        monkeypatch.setattr(_Trainer, "step", real_step)
        resumed = mlxterp.train_transcoders(llama, data, **settings, checkpoint_dir=tmp_path / f"{kind}-killed")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            for a, b in zip(getattr(straight, name) or [], getattr(resumed, name) or []):
                assert mx.array_equal(a, b).item(), (kind, name)
        assert straight.training_log.fvu == resumed.training_log.fvu
        again = mlxterp.train_transcoders(llama, data, **settings, checkpoint_dir=tmp_path / f"{kind}-killed")
        assert mx.array_equal(again.W_dec[0], straight.W_dec[0]).item()  # finished: read back, not retrained


def test_save_dir_writes_circuit_tracers_layout(llama, tmp_path):
    tc = mlxterp.train_transcoders(llama, TEXTS, kind="clt", save_dir=tmp_path / "clt", **SMALL)
    assert tc.training_log.memory_estimate == training_memory("clt", 4, 64, 96, batch_size=128, buffer_tokens=512)
    again = mlxterp.load_transcoders(tmp_path / "clt", model=llama)
    assert again.kind == "clt" and again.metadata == tc.metadata
    for a, b in zip(tc.W_dec + tc.threshold, again.W_dec + again.threshold):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("name", ["plt_skip_jumprelu", "clt_jumprelu"])
def test_what_we_train_and_save_circuit_tracer_loads_and_computes_alike(name):
    """Transcoders trained and saved by mlxterp (tests/fixtures/circuit_tracer/trained, made by
    its make.py), loaded by circuit-tracer 0.5.0's own loader and run on the same MLP inputs:
    its pre-activations, features and reconstructions are ours (float32)."""
    tc = mlxterp.load_transcoders(TRAINED / name)
    assert tc.kind == name[:3] and tc.activation == "jumprelu" and tc.skip == ("skip" in name)
    x = np.load(TRAINED / "inputs.npz")["x"]
    theirs = np.load(TRAINED / f"{name}__ct.npz")
    assert str(theirs["meta_kind"]) == ("cross_layer_transcoder" if tc.kind == "clt" else "transcoder_set")
    inputs = {layer: mx.array(x[layer]) for layer in tc.layers}
    features = {layer: tc.encode(inputs[layer], layer) for layer in tc.layers}
    for layer in tc.layers:
        ours = {"pre": tc.pre_acts(inputs[layer], layer), "post": features[layer],
                "recon": tc.reconstruct(features, inputs[layer], layer)}
        for key, value in ours.items():
            expected = theirs[f"{key}_{layer}"]
            np.testing.assert_allclose(np.array(value), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert (np.array(features[tc.layers[-1]]) > 0).sum(-1).mean() > 5  # features fire: a real comparison


def bad(call, error, *texts):
    with pytest.raises(error) as caught:
        call()
    for text in texts:
        assert text in str(caught.value), (text, str(caught.value))


def test_bad_options_are_clear_errors_before_anything_runs_or_is_written(llama, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(type(llama), "run", never)
    written = dict(checkpoint_dir=tmp_path / "ckpt", save_dir=tmp_path / "saved")

    def train(**options):
        return lambda: mlxterp.train_transcoders(llama, TEXTS, **{**SMALL, **written, **options})

    bad(train(d_features=0), OptionError, "d_features=0", ">= 1")
    bad(train(activation="topk", k=97), OptionError, "k=97", "[1, 96]")
    bad(train(activation="topk", k=0), OptionError, "k=0")
    bad(train(activation="batchtopk", k_aux=500), OptionError, "k_aux=500", "[1, 96]")
    bad(train(sparsity_coefficient=-1.0), OptionError, "sparsity_coefficient=-1.0", ">= 0")
    bad(train(sparsity_warmup=1.5), OptionError, "sparsity_warmup=1.5", "[0, 1]")
    bad(train(tanh_scale=0), OptionError, "tanh_scale=0.0", "> 0")
    bad(train(jumprelu_bandwidth=float("nan")), OptionError, "jumprelu_bandwidth=nan")
    bad(train(kind="sae"), OptionError, "kind='sae'", "'plt', 'clt'")
    bad(train(activation="gated"), OptionError, "activation='gated'")
    bad(train(activation="relu", sparsity="l0"), OptionError, "sparsity='l0' is JumpReLU's")
    bad(train(layers=[9]), OptionError, "layer 9 does not exist")
    bad(train(memory_budget=2**20), TranscoderError, "needs about", "memory_budget is 0.0 GiB")
    bad(train(kind="clt", layers=[1, 2]), TranscoderError, "circuit-tracer's CLT layout covers layers 0..n-1")
    bad(lambda: mlxterp.train_transcoders(llama, "The capital of France", **SMALL, **written), TranscoderError,
        "not a file or folder")
    bad(lambda: mlxterp.train_transcoders(llama, {"layers.0.ln2": np.zeros((8, 64))}, **SMALL, **written),
        TranscoderError, "lack layers.1.ln2")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "saved").exists()


def test_a_site_the_family_lacks_or_data_without_the_sites_is_a_clear_error(llama, tmp_path):
    post_norm = mlxterp.InterpretableModel(tiny_family("olmo2"), tokenizer=llama.tokenizer)  # norms after the MLP
    bad(lambda: mlxterp.train_transcoders(post_norm, TEXTS, **SMALL), TranscoderError, "has no 'ln2'", "resid_mid")
    partial = llama.cache_activations(TEXTS, ["layers.0.ln2", "layers.0.mlp"], tmp_path / "ds", context_size=32,
                                      progress=False)
    bad(lambda: mlxterp.train_transcoders(llama, partial, checkpoint_dir=tmp_path / "ckpt", **SMALL), TranscoderError,
        "lacks layers.1.ln2", "it has layers.0.ln2", "cache_activations")
    assert not (tmp_path / "ckpt").exists()
    one = mlxterp.train_transcoders(llama, partial, layers=[0], reads="ln2", **SMALL)  # what it holds is enough
    assert one.layers == [0]


def test_the_memory_estimate_counts_a_clts_decoder_blocks():
    plt = training_memory("plt", 30, 576, 4608, batch_size=1024, buffer_tokens=8192)
    clt = training_memory("clt", 30, 576, 4608, batch_size=1024, buffer_tokens=8192)
    block = 4608 * 576
    assert (clt["parameters"] - plt["parameters"]) == 4 * (465 - 30) * block  # 30 x 31 / 2 blocks against 30
    assert clt["adam"] == 2 * clt["parameters"] == 2 * clt["gradients"]
    assert clt["total"] == sum(v for key, v in clt.items() if key != "total")
    assert clt["total"] > 8 * 2**30 > plt["parameters"] + plt["adam"] + plt["gradients"]


def test_evaluation_measures_the_replacement_model(llama, tmp_path):
    """A transcoder that writes nothing is the zero-ablation exactly (CE recovered 0, the same KL);
    a trained one recovers some of the loss; per-layer EV is the stream's rows' EV."""
    d, F = 64, 8
    zeros = Transcoders("plt", [1, 2], [mx.ones((F, d))] * 2, [mx.zeros((F,))] * 2, [mx.zeros((F, 1, d))] * 2,
                        [mx.zeros((d,))] * 2)
    nothing = mlxterp.evaluate_transcoders(llama, zeros, CORPUS, n_tokens=256, context_size=16, progress=False)
    assert nothing.layers == [1, 2] and len(nothing.explained_variance) == 2
    assert nothing.ce_replacement == pytest.approx(nothing.ce_zero_ablated, rel=1e-6)
    assert nothing.kl_replacement == pytest.approx(nothing.kl_zero_ablated, rel=1e-5)
    assert nothing.ce_loss_recovered == pytest.approx(0.0, abs=1e-5) and nothing.ce_zero_ablated > nothing.ce_clean
    assert nothing.dead_fraction == [0.0, 0.0] and nothing.dense_fraction == [1.0, 1.0]  # every feature fires (ReLU of >0)
    tc = mlxterp.train_transcoders(llama, TEXTS, kind="clt", **dict(SMALL, n_tokens=4096))
    result = tc.evaluate(llama, CORPUS * 3, n_tokens=None, progress=False)
    assert 0 < result.ce_loss_recovered <= 1 and result.kl_replacement < result.kl_zero_ablated
    assert len(repr(result)) < 300 and "CE recovered" in repr(result)
    assert type(result).load(result.save(tmp_path / "evaluation.json")) == result
    from mlxterp.plugin import TextRows

    chunks = list(TextRows(llama, CORPUS * 3, SITES, context_size=128, batch_size=8, repeat=False))
    rows = {s: mx.concatenate([c[s] for c in chunks]) for s in SITES}
    recons = tc({i: rows[f"layers.{i}.ln2"] for i in range(4)})
    for i in range(4):  # the stream's rows: no BOS, no window start
        assert result.explained_variance[i] == pytest.approx(explained_variance(rows[f"layers.{i}.mlp"], recons[i]), abs=1e-5)
    assert result.n_tokens == rows["layers.0.mlp"].shape[0]


def test_a_plt_beats_pca_at_equal_sparsity_on_held_out_mlp_outputs(smollm, capsys):
    """The sanity bar on the default model (about 2 minutes on 2 CPU cores, 3 when they are
    shared; most of it tracing 16,896 tokens to layer 15):
    a JumpReLU transcoder at the middle layer, trained on 16,384 tokens of the offline corpus
    (3 passes), explains more held-out variance of the MLP's output than PCA of that output with
    as many components as the transcoder has active features on those tokens."""
    from mlxterp.plugin import TextRows

    layer = 15
    sites = [f"layers.{layer}.ln2", f"layers.{layer}.mlp"]

    def rows(texts, n):
        chunks, got = [], 0
        for chunk in TextRows(smollm, texts, sites, context_size=128, batch_size=8, repeat=False):
            chunks.append(chunk)
            got += chunk[sites[0]].shape[0]
            if got >= n:
                return {s: mx.concatenate([c[s] for c in chunks])[:n] for s in sites}

    corpus = mlxterp.default_corpus()
    train, test = rows(corpus[:400], 16_384), rows(corpus[-150:], 512)
    tc = mlxterp.train_transcoders(smollm, train, layers=[layer], d_features=1152, n_tokens=3 * 16_384,
                                   batch_size=256, buffer_tokens=2048, lr=1e-3, sparsity_coefficient=5.0, progress=False)
    x, y = test[sites[0]], test[sites[1]]
    features = tc.encode(x, layer)
    l0 = (features > 0).sum(axis=-1).astype(mx.float32).mean().item()
    ours = explained_variance(y, tc.reconstruct({layer: features}, x, layer))
    k = max(1, round(l0))
    fitted = np.array(train[sites[1]], dtype=np.float64)
    mean = fitted.mean(axis=0)
    basis = np.linalg.svd(fitted - mean, full_matrices=False)[2][:k]
    pca = explained_variance(y, mx.array((np.array(y, dtype=np.float64) - mean) @ basis.T @ basis + mean))
    with capsys.disabled():
        print(f"\nlayers.{layer}.mlp: PLT EV {ours:.3f} at L0 {l0:.1f} vs PCA-{k} {pca:.3f} (held out); {tc.training_log}")
    assert 4 <= l0 <= 64
    assert ours > pca


def test_the_bench_rows_and_the_comparison_run_at_a_tiny_size(llama, tmp_path):
    from mlxterp_tools import bench
    from mlxterp_tools.transcoder_rows import training_speed
    from mlxterp_tools.transcoder_training import compare

    assert "transcoders" in bench.all_rows()
    speed = training_speed(llama, TEXTS, n_tokens=256, d_features=32, k=4, batch_size=128, context_size=32)
    assert set(speed) == {"plain_tokens_per_s", "plt_tokens_per_s", "clt_tokens_per_s", "plt_peak_memory_gib",
                          "clt_peak_memory_gib"}
    assert all(v > 0 for v in speed.values())
    assert speed["clt_peak_memory_gib"] > speed["plt_peak_memory_gib"]  # its decoder blocks and their Adam moments
    report = compare(llama, TEXTS, CORPUS * 2, features=32, k=4, tokens=512, batch_size=128, eval_tokens=256,
                     out=tmp_path, save=True, say=lambda *args, **kwargs: None)
    comparison = report["comparison"]
    assert comparison["total_features_each"] == 4 * 32 and set(comparison["kl"]) == {"plt", "clt"}
    assert report["plt"]["training_tokens"] == report["clt"]["training_tokens"] == 512
    assert all((tmp_path / name).is_file() for name in ("transcoder_comparison.png", "clt_evaluation.png", "plt_training.png"))
    assert mlxterp.load_transcoders(tmp_path / "clt").kind == "clt"
