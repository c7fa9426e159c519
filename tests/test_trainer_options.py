"""The tuned-lens trainer and the probes check every option at the boundary, before any forward
pass: an option out of its range is an error naming the option, the value and what is allowed."""

from __future__ import annotations

import pytest
from helpers import CORPUS, tiny_llama, train_tokenizer

from mlxterp import InterpretableModel, MlxterpError, OptionError, UnknownNameError
from mlxterp_lenses import TunedLens

TEXTS = ["I loved it", "I hated it", "A fine day", "A sad day", "Good food", "Bad food", "Nice", "Awful"]
LABELS = [1, 0] * 4


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(), tokenizer=train_tokenizer(bos=True))


@pytest.fixture(scope="module")
def dataset(model, tmp_path_factory):
    return model.cache_activations(CORPUS * 2, ["layers[1]"], tmp_path_factory.mktemp("ds") / "ds", context_size=16,
                                   progress=False)


@pytest.fixture
def no_forward(monkeypatch):
    """Any forward pass through the model fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before the options were checked")

    monkeypatch.setattr(InterpretableModel, "run", forbidden)
    monkeypatch.setattr(InterpretableModel, "trace", forbidden)


def train(model, **options):
    return model.train_tuned_lens(CORPUS, **{"num_steps": 1, "tokens_per_step": 8, "context_size": 8, "progress": False, **options})


def evaluate(model, lens=TunedLens(64, 4), **options):
    return model.evaluate_tuned_lens(lens, CORPUS, **options)


def probe(model, **options):
    return model.probe(**{"texts": TEXTS, "labels": LABELS, "test_fraction": 0.5, **options})


CASES = [  # (call, option, value, what the message says)
    (train, "num_steps", 0, r"num_steps=0 is out of range: it must be >= 1"),
    (train, "num_steps", 2.5, r"num_steps=2.5: expected an integer"),
    (train, "tokens_per_step", -1, r"tokens_per_step=-1 is out of range"),
    (train, "context_size", 0, r"context_size=0 is out of range"),
    (train, "batch_size", "8", r"batch_size='8': expected an integer"),
    (train, "checkpoint_every", 0, r"checkpoint_every=0 is out of range"),
    (train, "lr", 0, r"lr=0.0 is out of range: it must be > 0"),
    (train, "lr", float("nan"), r"lr=nan is out of range"),
    (train, "lr", float("inf"), r"lr=inf is out of range"),
    (train, "momentum", 0.0, r"momentum=0.0 is out of range: it must be in \(0.0, 1.0\)"),
    (train, "momentum", 1.0, r"momentum=1.0 is out of range"),
    (train, "weight_decay", -0.1, r"weight_decay=-0.1 is out of range: it must be >= 0"),
    (train, "grad_clip", -1, r"grad_clip=-1.0 is out of range"),
    (train, "checkpoint_dir", 3, r"checkpoint_dir=3: expected a folder path"),
    (train, "lens", "lens", r"lens='lens': expected a TunedLens"),
    (train, "lens", TunedLens(64, 3), r"lens: this lens has 3 translators; the model has 4 layers"),
    (evaluate, "lens", None, r"lens=None: expected a TunedLens"),
    (evaluate, "lens", TunedLens(64, 2), r"this lens has 2 translators"),
    (evaluate, "context_size", 0, r"context_size=0 is out of range"),
    (evaluate, "batch_size", -2, r"batch_size=-2 is out of range"),
    (evaluate, "max_tokens", 0, r"max_tokens=0 is out of range"),
    (probe, "method", "svm", r"method='svm': choose one of 'logistic', 'mass_mean'"),
    (probe, "l2", 0, r"l2=0.0 is out of range: it must be > 0"),
    (probe, "test_fraction", 1.0, r"test_fraction=1.0 is out of range: it must be in \(0.0, 1.0\)"),
    (probe, "seed", -1, r"seed=-1 is out of range: it must be >= 0"),
    (probe, "batch_size", 0, r"batch_size=0 is out of range"),
    (probe, "labels", [1, 0, 2, 0] * 2, r"labels must be 0/1 with both classes present"),
    (probe, "labels", [1] * 8, r"labels must be 0/1 with both classes present"),
    (probe, "labels", [1, 0], r"labels: 2 for 8 examples"),
    (probe, "groups", [0, 1], r"groups: 2 for 8 examples"),
    (probe, "groups", [0] * 8, r"a group split needs at least two groups"),
    (probe, "layers", [9], r"layers=\[9\]: layer 9 does not exist"),
    (probe, "component", "nope", r"layers.0.nope"),
    (probe, "position", "first", r"position='first': use 'last', 'mean' or an int"),
    (probe, "position", 9, r"position=9: the shortest prompt has \d tokens"),
    (probe, "texts", [], r"texts=\[\]: give at least one prompt"),
]


@pytest.mark.parametrize("call, option, value, message", CASES,
                         ids=[f"{c.__name__}-{o}={v!r:.20}" for c, o, v, _ in CASES])
def test_an_option_out_of_range_is_refused_before_any_forward_pass(model, no_forward, call, option, value, message):
    with pytest.raises(MlxterpError, match=message) as raised:
        call(model, **{option: value})
    assert isinstance(raised.value, (OptionError, UnknownNameError)) or "group" in message


DATASET_CASES = [
    ("position", "first", r"position='first': choose one of 'last', 'mean', 'all'"),
    ("method", "tree", r"method='tree'"),
    ("l2", -1, r"l2=-1.0 is out of range"),
    ("test_fraction", 0, r"test_fraction=0.0 is out of range"),
    ("seed", 0.5, r"seed=0.5: expected an integer"),
    ("labels", [[0, 1]], r"labels must be one 0/1 label per document"),
    ("labels", ["a", "b"], r"labels must be one 0/1 label per document"),
]


@pytest.mark.parametrize("option, value, message", DATASET_CASES, ids=[f"{o}={v!r:.20}" for o, v, _ in DATASET_CASES])
def test_probe_dataset_options_are_refused_before_reading(model, dataset, option, value, message):
    from mlxterp import probes

    labels = [i % 2 for i in range(len(CORPUS) * 2)]
    with pytest.raises(OptionError, match=message):
        probes.probe_dataset(dataset, **{"labels": labels, option: value})


def test_good_options_still_run(model, dataset):
    from mlxterp import probes

    assert len(probe(model, position=-1).accuracy) == 5
    assert len(probes.probe_dataset(dataset, [i % 2 for i in range(len(CORPUS) * 2)], position="mean").accuracy) == 1
    assert train(model, momentum=0.5, grad_clip=0).num_hidden_layers == 4
