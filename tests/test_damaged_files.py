"""Every file mlxterp reads, damaged: missing, empty, cut short or overwritten with bytes of
another kind. The reader must raise an MlxterpError that names the file (or, where the file is
optional, go on without it): never a raw JSONDecodeError, KeyError or MLX RuntimeError."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import CORPUS, tiny_llama, train_tokenizer

from mlxterp import ActivationDataset, InterpretableModel, MlxterpError
from mlxterp_lenses import TunedLens
from mlxterp_saes import load_sae, train_sae

LENS_TRAINING = dict(num_steps=1, tokens_per_step=16, context_size=16, batch_size=2, progress=False)
SAE_TRAINING = dict(architecture="topk", k=4, d_sae=32, n_tokens=256, batch_size=128, buffer_tokens=256,
                    checkpoint_every=1, progress=False)
SITE = "layers.2.output"


@pytest.fixture(scope="module")
def model():
    return InterpretableModel(tiny_llama(), tokenizer=train_tokenizer(bos=True))


@pytest.fixture(scope="module")
def made(model, tmp_path_factory):
    """One folder of each kind mlxterp writes, made once."""
    root = tmp_path_factory.mktemp("made")
    TunedLens.for_model(model).save(root / "lens")
    model.train_tuned_lens(CORPUS * 4, **LENS_TRAINING, checkpoint_dir=root / "lens-checkpoint")
    train_sae(model, SITE, CORPUS * 4, **SAE_TRAINING, checkpoint_dir=root / "sae-checkpoint", save_dir=root / "sae")
    model.cache_activations(CORPUS * 4, ["layers[1]"], root / "dataset", context_size=16, batch_size=2,
                            shard_tokens=40, progress=False)
    return root


def read_dataset(folder):
    ds = ActivationDataset(folder)
    ds["layers[1]"][:]
    ds.tokens
    list(ds.batches("layers[1]", 8))
    ds.load_shard(0)


READERS = {  # folder -> how it is read
    "lens": lambda model, folder: TunedLens.load(folder),
    "sae": lambda model, folder: load_sae(folder / SITE),
    # a finished run's checkpoint is read, and nothing is left to train
    "lens-checkpoint": lambda model, folder: model.train_tuned_lens(CORPUS * 4, **LENS_TRAINING, checkpoint_dir=folder),
    "sae-checkpoint": lambda model, folder: train_sae(model, SITE, CORPUS * 4, **SAE_TRAINING, checkpoint_dir=folder),
    "dataset": lambda model, folder: read_dataset(folder),
}
FILES = [  # (folder, file, whether the reader may go on without it)
    ("lens", "config.json", False),
    ("lens", "params.safetensors", False),
    ("sae", f"{SITE}/cfg.json", False),
    ("sae", f"{SITE}/sae_weights.safetensors", False),
    ("sae", f"{SITE}/sparsity.safetensors", True),
    ("lens-checkpoint", "checkpoint.json", True),  # no state: no checkpoint, training starts afresh
    ("lens-checkpoint", "checkpoint-00000001.safetensors", False),  # the tensors of step 1
    ("sae-checkpoint", "checkpoint.json", True),
    ("sae-checkpoint", "checkpoint-00000002.safetensors", False),  # the tensors of step 2
    ("dataset", "manifest.json", False),
    ("dataset", "shard-000000.safetensors", False),
    ("dataset", "shard-000002.safetensors", False),
]


def damage(path, how):
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "cut-tail":  # only the last bytes: a header that still parses
        path.write_bytes(data[:-3])
    else:  # bytes of another kind, as long as the file was
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())


@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "cut-tail", "garbage"])
@pytest.mark.parametrize("folder, name, optional", FILES, ids=[f"{f}/{n}" for f, n, _ in FILES])
def test_a_damaged_file_is_an_error_naming_it(model, made, tmp_path, folder, name, optional, how):
    copy = tmp_path / folder
    shutil.copytree(made / folder, copy)
    damage(copy / name, how)
    try:
        READERS[folder](model, copy)
    except MlxterpError as e:
        assert name.rsplit("/", 1)[-1] in str(e), str(e)
    else:
        assert optional and how == "missing", f"a {how} {name} was read without an error"


def test_every_entry_point_reading_a_corpus_path_names_a_file_that_is_not_utf8(model, made, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\n".join(f"{text} caf\u00e9" for text in CORPUS * 2).encode("latin-1"))
    sae = load_sae(made / "sae" / SITE)
    lens = TunedLens.for_model(model)
    calls = {
        "cache_activations": lambda **o: model.cache_activations(latin, ["layers[1]"], tmp_path / f"ds-{len(o)}",
                                                                 context_size=16, progress=False, **o),
        "train_tuned_lens": lambda **o: model.train_tuned_lens(latin, **LENS_TRAINING, **o),
        "evaluate_tuned_lens": lambda **o: model.evaluate_tuned_lens(lens, latin, context_size=16, **o),
        "train_sae": lambda **o: train_sae(model, SITE, latin, **{**SAE_TRAINING, "checkpoint_every": 500}, **o),
        "sae.evaluate": lambda **o: sae.evaluate(model, latin, context_size=16, progress=False, **o),
        "sae.top_activations": lambda **o: sae.top_activations(model, latin, [0], context_size=16, progress=False, **o),
    }
    for name, call in calls.items():
        with pytest.raises(MlxterpError, match=rf"{latin} is not utf-8 text at line 1, byte 35"):
            call()
        call(encoding="latin-1")
