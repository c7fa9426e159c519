"""The tuned lens: an untrained lens is the logit lens, files round-trip, training resumes
exactly, and on the default model a trained lens beats the logit lens at every layer."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest
from helpers import CORPUS

import mlxterp
from mlxterp import InputError
from mlxterp_lenses import TunedLens

# The default model's test lens: 768 training tokens (the reference trains 65M); each costs ~3.4
# GFLOP of unembedding work forward and backward over 30 layers.
DEFAULT_MODEL_TRAINING = dict(num_steps=6, tokens_per_step=128, context_size=32, batch_size=4, progress=False)
SMALL = dict(num_steps=4, tokens_per_step=64, context_size=16, batch_size=2, progress=False)


def randomised(lens: TunedLens, seed: int = 0) -> TunedLens:
    mx.random.seed(seed)
    for t in lens.layer_translators:
        t.weight = 0.01 * mx.random.normal(t.weight.shape)
        t.bias = 0.01 * mx.random.normal(t.bias.shape)
    return lens


def test_an_untrained_lens_is_the_logit_lens_exactly(llama):
    lens = TunedLens.for_model(llama)
    tuned = llama.tuned_lens("The capital of France is Paris.", lens)
    logit = llama.logit_lens("The capital of France is Paris.")
    assert tuned.predictions == logit.predictions and tuned.layers == logit.layers
    last = tuned.layers[-1]
    assert max(tuned.kl[last]) < 1e-5 and set(tuned.final_rank[last]) == {0}  # the final layer is the model


def test_the_default_model_untrained_lens_is_its_logit_lens(smollm):
    lens = TunedLens.for_model(smollm)
    assert smollm.tuned_lens("The capital of France is", lens).predictions == smollm.logit_lens("The capital of France is").predictions


def test_save_and_load_round_trip_gives_identical_logits(llama, tmp_path):
    lens = randomised(TunedLens.for_model(llama))
    lens.save(tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config["lens_type"] == "linear_tuned_lens" and config["num_hidden_layers"] == 4
    assert set(mx.load(str(tmp_path / "lens" / "params.safetensors"))) == {f"{i}.{k}" for i in range(4) for k in ("weight", "bias")}
    loaded = mlxterp.TunedLens.load(tmp_path / "lens", model=llama)
    h = mx.random.normal((3, 64))
    for i in range(4):
        assert mx.array_equal(lens.transform_hidden(h, i), loaded.transform_hidden(h, i)).item()
    a, b = llama.tuned_lens("Hello, how are you?", lens), llama.tuned_lens("Hello, how are you?", loaded)
    assert a.predictions == b.predictions and a.kl == b.kl


def test_bad_lens_files_are_clear_errors(tmp_path, llama):
    with pytest.raises(InputError, match="no tuned lens"):
        TunedLens.load(tmp_path)
    for empty in ("", " "):  # Path("") is "." (a ValueError from with_suffix before)
        with pytest.raises(InputError, match="empty"):
            TunedLens.load(empty)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not a tuned-lens config"):
        TunedLens.load(tmp_path)
    TunedLens(64, 4).save(tmp_path / "ok")
    with pytest.raises(InputError, match="translators"):
        llama.tuned_lens("Hello", TunedLens(64, 3))


def test_training_lowers_the_loss_and_resumes_exactly(llama, tmp_path):
    straight = llama.train_tuned_lens(CORPUS * 4, **SMALL)
    before = llama.evaluate_tuned_lens(TunedLens.for_model(llama), CORPUS, context_size=16)
    after = llama.evaluate_tuned_lens(straight, CORPUS, context_size=16)
    assert sum(after.tuned_kl) < sum(before.tuned_kl)
    assert before.tuned_kl == before.logit_kl  # an untrained lens is the logit lens
    # a run interrupted after its step-2 checkpoint and resumed ends with the same lens as one
    # that never stopped
    _train_steps(llama, tmp_path / "ck", stop_after=2, **SMALL)
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["step"] == 2
    resumed = llama.train_tuned_lens(CORPUS * 4, **SMALL, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["step"] == 4
    for a, b in zip(straight.state().values(), resumed.state().values()):
        assert mx.array_equal(a, b).item()  # bitwise: resume restores everything
    with pytest.raises(InputError, match="other settings"):
        llama.train_tuned_lens(CORPUS * 4, **{**SMALL, "lr": 0.5}, checkpoint_dir=tmp_path / "ck")


def _train_steps(model, folder, stop_after: int, **settings):
    """Run training with checkpoints and interrupt it after ``stop_after`` steps."""
    import mlxterp_core.training as training

    original = training.save_checkpoint

    def save_then_stop(folder_, step, *args):
        original(folder_, step, *args)
        if step >= stop_after:
            raise KeyboardInterrupt

    training.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            model.train_tuned_lens(CORPUS * 4, **settings, checkpoint_dir=folder, checkpoint_every=2)
    finally:
        training.save_checkpoint = original


@pytest.mark.skipif(not os.environ.get("MLXTERP_SLOW_TESTS"), reason="trains a lens on the default model (minutes); set MLXTERP_SLOW_TESTS=1")
def test_a_trained_lens_beats_the_logit_lens_at_every_layer(smollm):
    """Held-out KL(final || tuned) < KL(final || logit lens) for every translator of the
    default model, after a short training on an offline corpus (other paragraphs held out)."""
    from mlxterp_core.corpus import default_corpus

    documents = default_corpus()
    lens = smollm.train_tuned_lens(documents[:2500], **DEFAULT_MODEL_TRAINING)
    evaluation = smollm.evaluate_tuned_lens(lens, documents[-300:], context_size=32, batch_size=8, max_tokens=256)
    print(evaluation.table())
    assert len(evaluation.layers) == 30
    assert all(tuned < logit for tuned, logit in zip(evaluation.tuned_kl, evaluation.logit_kl))


def test_a_new_lens_names_its_model_never_a_local_path(llama):
    llama.load_report = {"format": "gguf", "file": "/Users/someone/models/tiny.Q4_1.gguf"}
    try:
        assert TunedLens.for_model(llama).config["base_model_name_or_path"] == "tiny.Q4_1"
    finally:
        llama.load_report = None
