"""Training SAEs: each architecture learns, the exported SAE reads raw activations, several
sites from one forward equal separate runs, checkpoints resume, BOS is never trained on."""

from __future__ import annotations

import itertools

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import CORPUS

from mlxterp_saes import SAEError, load_sae, train_sae
from mlxterp_saes.training import _source, _Trainer

TEXTS = CORPUS * 12
SMALL = dict(d_sae=128, n_tokens=2048, batch_size=128, buffer_tokens=512, log_every=2, progress=False)


def fvu(sae, x):
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    err = ((x - sae(x)) ** 2).sum(-1).mean()
    return (err / ((x - x.mean(0)) ** 2).sum(-1).mean()).item()


def rows(model, site, texts=CORPUS):
    tr = model.run(list(texts), capture=[site])
    a = tr.activations[site]
    keep = np.array(tr.mask).reshape(-1)
    keep[:: a.shape[1]] = False  # without the first token of each row
    return a.reshape(-1, a.shape[-1])[mx.array(np.flatnonzero(keep))]


def test_topk_keeps_exactly_k_and_learns_and_its_export_reads_raw_activations(llama):
    sae = train_sae(llama, "layers[2].output", TEXTS, architecture="topk", k=6, **SMALL)
    log = sae.training_log
    assert set(log.l0) == {6.0}
    assert log.fvu[-1] < 0.8 * log.fvu[0]
    assert sae.cfg.architecture == "topk" and sae.cfg.site == "layers.2.output"
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post"
    x = next(iter(_source(llama, ["layers.2.output"], TEXTS, 128, 8, 0)))["layers.2.output"]
    assert ((sae.encode(x) > 0).sum(-1) == 6).all().item()
    # the input scale is folded in: on raw activations like the training ones it does what it did in training
    assert abs(fvu(sae, x) - log.fvu[-1]) < 0.15


def test_batchtopk_is_exported_as_jumprelu_with_about_k_features_per_token(llama):
    sae = train_sae(llama, "layers.2.output", TEXTS, architecture="batchtopk", k=6, **SMALL)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.metadata["training_architecture"] == "batchtopk"
    assert set(sae.training_log.l0) == {6.0}  # k per token on average over each batch, exactly
    l0 = (sae.encode(rows(llama, "layers.2.output")) > 0).sum(-1).astype(mx.float32).mean().item()
    assert 2 <= l0 <= 15
    # batched and single-token encodes agree after export (a threshold, not a batch statistic)
    x = rows(llama, "layers.2.output")[:5]
    assert mx.allclose(sae.encode(x)[2], sae.encode(x[2:3])[0], atol=1e-5).item()


@pytest.mark.parametrize("architecture", ["jumprelu", "relu"])
def test_jumprelu_and_relu_learn_and_export_with_unit_norm_decoders(llama, architecture):
    sae = train_sae(llama, "layers.2.output", TEXTS, architecture=architecture, l1_coefficient=0.5,
                    l0_coefficient=0.05, **SMALL)
    log = sae.training_log
    assert log.fvu[-1] < log.fvu[0]
    assert mx.allclose(mx.linalg.norm(sae.W_dec, axis=-1), mx.array(1.0), atol=1e-4).item()
    assert sae.cfg.architecture == {"relu": "standard"}.get(architecture, architecture)


def test_several_sites_from_one_forward_equal_separate_runs(llama):
    both = train_sae(llama, ["layers.1.output", "layers.2.mlp"], TEXTS, architecture="topk", k=4, **SMALL)
    alone = [train_sae(llama, s, TEXTS, architecture="topk", k=4, **SMALL) for s in ("layers.1.output", "layers.2.mlp")]
    for a, b in zip(both, alone):
        assert a.cfg.site == b.cfg.site
        for name in a.tensor_names:
            assert mx.allclose(a[name], b[name], atol=1e-6).item(), (a.cfg.site, name)


def test_bos_padding_and_window_starts_are_never_trained_on(llama_module, hf_tokenizer):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from mlxterp import InterpretableModel
    from mlxterp_core.corpus import token_windows

    hf = hf_tokenizer.__class__(tokenizer_object=hf_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>")
    model = InterpretableModel(llama_module, tokenizer=TokenizerWrapper(hf))
    for context in range(9, 30):  # one whose last batch has a short (padded) window
        windows = list(token_windows(model, CORPUS, context, batch_size=4))
        if (~windows[-1].mask).any():
            break
    assert any(w.bos.any() for w in windows) and any((~w.mask).any() for w in windows)
    expected = []
    for w in windows:
        full = model.run(w.inputs, capture=["layers.2.output"]).activations["layers.2.output"]
        keep = (w.mask & ~w.bos).reshape(-1)
        keep[:: w.tokens.shape[1]] = False  # nor the first position of a window
        expected.append(full.reshape(-1, full.shape[-1])[mx.array(np.flatnonzero(keep))])
    source = _source(model, ["layers.2.output"], CORPUS, context, 4, 0)
    got = []
    for chunk in source:
        got.append(chunk["layers.2.output"])
        if source.position["batches"] >= len(windows):
            break
    got, expected = mx.concatenate(got), mx.concatenate(expected)
    assert got.shape == expected.shape
    assert mx.allclose(got, expected, atol=1e-5).item()
    # skip_first=False keeps the window starts that are not BOS (never BOS, never padding)
    source = _source(model, ["layers.2.output"], CORPUS, context, 4, 0, skip_first=False)
    kept = sum(next(iter(source))["layers.2.output"].shape[0] for _ in range(1))
    first = windows[0]
    assert kept == int((first.mask & ~first.bos).sum()) > int((first.mask & ~first.bos)[:, 1:].sum())


def sorted_rows(x) -> list[tuple]:
    return sorted(map(tuple, np.round(np.array(x.astype(mx.float32)), 5).tolist()))


def test_training_from_a_cache_leaves_out_bos_and_window_starts(llama, tmp_path):
    """An ActivationDataset feeds the trainer the rows the text path trains on: no BOS and no
    first position of a window (here the windows start mid-document, so those are not BOS)."""
    ds = llama.cache_activations(CORPUS, ["layers.2.output"], tmp_path / "ds", context_size=16, batch_size=3,
                                 shard_tokens=40, progress=False)
    rows = np.array(ds["layers.2.output"][:])
    starts = ds.offset == 0
    assert (starts & ~ds.bos).any()
    chunk = mx.concatenate([c["layers.2.output"] for c in itertools.islice(_source(llama, ["layers.2.output"], ds, 16, 3, 0), len(ds.shards))])
    assert sorted_rows(chunk) == sorted_rows(mx.array(rows[~ds.bos & ~starts]))
    chunk = mx.concatenate([c["layers.2.output"] for c in itertools.islice(_source(llama, ["layers.2.output"], ds, 16, 3, 0, skip_first=False), len(ds.shards))])
    assert sorted_rows(chunk) == sorted_rows(mx.array(rows[~ds.bos]))
    sae = train_sae(llama, "layers.2.output", ds, architecture="topk", k=4, **SMALL)
    assert sae.training_log.fvu[-1] < sae.training_log.fvu[0]


def test_auxk_decodes_dead_latents_without_b_dec():
    x = mx.random.normal((32, 8), key=mx.random.key(1)) + 3.0
    settings = dict(architecture="topk", d_sae=16, k=2, expansion=2, lr=None, l1=0, l0=0, aux=1.0, k_aux=3,
                    dead_tokens=0, steps=10, bandwidth=0.05, init_threshold=0.01, seed=0, batch_size=32, context_size=8)
    trainer = _Trainer("layers.0.output", x, settings)
    p = trainer.params
    assert mx.abs(p["b_dec"]).max().item() > 1  # b_dec is far from zero: a double count would show
    dead = mx.ones((16,), dtype=mx.bool_)
    loss, (f, mse, _) = trainer._loss(p, x, dead)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    from mlxterp_saes import topk_relu

    e = x - (topk_relu(h, 2) @ p["W_dec"] + p["b_dec"])
    e_hat = topk_relu(h, 3) @ p["W_dec"]
    aux = ((e_hat - e) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean()
    assert loss.item() == pytest.approx((mse + min(16 / 3, 1.0) * aux).item(), rel=1e-5)


def test_checkpoints_resume_where_they_stopped(llama, tmp_path, monkeypatch):
    settings = dict(SMALL, architecture="topk", k=4, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=4)
    calls = {"n": 0}
    real_step = _Trainer.step

    def interrupted(self, x):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        real_step(self, x)

    monkeypatch.setattr(_Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(llama, "layers.2.output", TEXTS, **settings)
    state = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert state["step"] == 8
    monkeypatch.setattr(_Trainer, "step", real_step)
    sae = train_sae(llama, "layers.2.output", TEXTS, **settings)
    log = sae.training_log
    assert log.steps == sorted(log.steps) and log.steps[-1] == 16 and 2 in log.steps
    assert log.n_tokens == 16 * 128
    again = train_sae(llama, "layers.2.output", TEXTS, **settings)  # finished: nothing to train
    assert mx.array_equal(again.W_dec, sae.W_dec).item()
    with pytest.raises(SAEError, match="other settings"):
        train_sae(llama, "layers.2.output", TEXTS, **dict(settings, k=5))


def test_save_dir_writes_saelens_folders_that_load_back(llama, tmp_path):
    sae = train_sae(llama, "layers.2.output", TEXTS, architecture="topk", k=4, save_dir=tmp_path, **SMALL)
    again = load_sae(tmp_path / "layers.2.output")
    for name in sae.tensor_names:
        assert mx.array_equal(sae[name], again[name]).item()
    assert again.log_sparsity.shape == (128,) and (again.log_sparsity <= 0).all().item()


def test_an_activation_dataset_or_arrays_feed_training_too(llama):
    x = rows(llama, "layers.2.output", CORPUS * 3)

    class Dataset:  # the ActivationDataset interface the trainer uses (skip_first when not the default)
        def batches(self, site, batch_size, shuffle=True, seed=0):
            order = np.random.default_rng(seed).permutation(x.shape[0])
            for start in range(0, len(order), batch_size):
                yield x[mx.array(order[start : start + batch_size])]

    for data in (Dataset(), x, {"layers.2.output": np.array(x)}):
        sae = train_sae(llama, "layers.2.output", data, architecture="topk", k=4, **SMALL)
        assert sae.training_log.fvu[-1] < sae.training_log.fvu[0]


def test_bad_training_input_fails_clearly(llama):
    with pytest.raises(SAEError, match="cannot train architecture 'gated'"):
        train_sae(llama, "layers.2.output", TEXTS, architecture="gated")
    with pytest.raises(SAEError, match="needs k > 0"):
        train_sae(llama, "layers.2.output", TEXTS, k=None)
    with pytest.raises(SAEError, match="named twice"):
        train_sae(llama, ["layers.2.output", "layers[2]"], TEXTS)
    with pytest.raises(SAEError, match="not a file or folder"):
        train_sae(llama, "layers.2.output", "The capital of France")
    for empty in (mx.zeros((0, 64)), mx.zeros((0,)), mx.array(1.0), {"layers.2.output": np.zeros((0, 64))}):
        with pytest.raises(SAEError, match=r"activations given for layers.2.output have shape .*: give an array of \(N, d\) rows"):
            train_sae(llama, "layers.2.output", empty)
    from mlxterp import UnknownNameError

    with pytest.raises(UnknownNameError, match="layer 9"):
        train_sae(llama, "layers.9.output", TEXTS)


def test_the_bench_rows_are_registered_and_measure_the_shared_forward(llama):
    from mlxterp_tools import bench
    from mlxterp_tools.sae_rows import training_speed

    assert "saes" in bench.all_rows()
    speed = training_speed(llama, TEXTS, n_tokens=128, d_sae=64, k=4, batch_size=128, context_size=16,
                           site="layers.1.output", four=[f"layers.{i}.output" for i in range(4)])
    assert set(speed) >= {"plain_tokens_per_s", "one_sae_tokens_per_s", "speedup_four_from_one_forward"}
    assert all(v > 0 for v in speed.values())


def test_tracing_sites_stops_the_forward_after_the_last_layer_needed(llama, monkeypatch):
    from mlxterp.plugin import resolve_sites, site_batches

    def trace_sites(model, ids, sites):
        """One batch through the activation stream, the sites resolved beforehand (their
        probe passes are not the batch's: the calls are counted from the batch's pass)."""
        resolved = resolve_sites(model, sites, ids[:, :2])
        calls.clear()
        _, acts, _ = next(site_batches(model, [ids], resolved))
        return {site: acts[site] for site in sites}

    ids = mx.array([[5, 17, 3, 42, 9]])
    full = llama.run(ids, capture=["layers.1.output", "layers.0.mlp"]).activations
    mlps = [layer.mlp for layer in llama.model.model.layers]
    calls = []
    original = type(mlps[3]).__call__

    def counted(self, *args, **kwargs):  # the MLPs that no probe swapped
        calls.append(next(i for i, mlp in enumerate(mlps) if mlp is self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(mlps[3]), "__call__", counted)
    got = trace_sites(llama, ids, ["layers.1.output", "layers.0.mlp"])
    assert calls == [1]  # stopped at the input of block 2
    for site in got:
        assert mx.array_equal(got[site], full[site]).item()
    calls.clear()
    trace_sites(llama, ids, ["ln_final"])
    assert calls == [0, 1, 2, 3]  # a site after the blocks: the whole forward


@pytest.mark.parametrize("source", ["texts", "dataset"])
@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(llama, tmp_path, monkeypatch, source, architecture):
    """Killed after a checkpoint and resumed, training ends with exactly the weights of a run
    that never stopped: the checkpoint holds Adam's state, the shuffle buffer's rows and
    generator, and the position in the data (texts traced on the fly, or a cached dataset)."""
    data = TEXTS
    if source == "dataset":
        data = llama.cache_activations(TEXTS, ["layers.1.output", "layers.2.output"], tmp_path / "ds",
                                       context_size=32, batch_size=4, shard_tokens=300, progress=False)
    settings = dict(SMALL, architecture=architecture, k=4, l0_coefficient=0.05, context_size=32, buffer_tokens=384,
                    checkpoint_every=3)
    sites = ["layers.1.output", "layers.2.output"]
    straight = train_sae(llama, sites, data, **settings, checkpoint_dir=tmp_path / "straight")
    calls = {"n": 0}
    real_step = _Trainer.step

    def killed(self, x):
        calls["n"] += 1
        if calls["n"] > 2 * 7:  # two SAEs a step: dies during step 8, after the step-6 checkpoint
            raise KeyboardInterrupt
        real_step(self, x)

    monkeypatch.setattr(_Trainer, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sae(llama, sites, data, **settings, checkpoint_dir=tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["step"] == 6
    monkeypatch.setattr(_Trainer, "step", real_step)
    resumed = train_sae(llama, sites, data, **settings, checkpoint_dir=tmp_path / "killed")
    for a, b in zip(straight, resumed):
        for name in a.tensor_names:
            assert mx.array_equal(a[name], b[name]).item(), (a.cfg.site, name)
        assert a.training_log.l0 == b.training_log.l0 and a.training_log.fvu == b.training_log.fvu


def test_a_short_run_logs_a_curve_and_plots_its_points(llama):
    """The guide's tiny run (4 steps, logging every 10): the first and last steps are logged, so
    the plot has two points per panel, drawn with markers (one point and no marker was empty)."""
    sae = train_sae(llama, "layers.2.output", TEXTS, architecture="topk", k=4, d_sae=64, n_tokens=4 * 128,
                    batch_size=128, buffer_tokens=512, progress=False)
    log = sae.training_log
    assert log.steps == [1, 4] and log.tokens == [128, 512]
    figure = log.plot()
    for ax in figure.axes:
        (line,) = ax.get_lines()
        assert line.get_marker() == "o" and len(line.get_xdata()) == 2
