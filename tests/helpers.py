"""Test helpers: tiny random-weight models and a tokenizer trained in the test, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CORPUS = [
    "The capital of France is Paris.",
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Hello, how are you? Analyze this text.",
    "I love this movie. I hate this movie. This movie is great.",
    "Test input, input text, and more test text.",
]


def environment(**extra) -> dict[str, str]:
    """This process's environment for a worker process: the tests folder on PYTHONPATH (workers
    import these helpers) and one BLAS thread (ranks and writers share the cores)."""
    from mlxterp_tools.ring import ONE_THREAD

    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": path, **extra}


class SimpleModel(nn.Module):
    """The original README's custom model."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(64, 64) for _ in range(4)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def train_tokenizer(vocab_size: int = 300, bos: bool = False):
    """A byte-level BPE trained on CORPUS, as a Hugging Face fast tokenizer (``bos``: with
    <|endoftext|> as its BOS token too, so that prepending and flagging BOS are exercised)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>" if bos else None)


def tiny_llama(**overrides):
    """A random-weight mlx-lm Llama small enough for unit tests."""
    from mlxterp_tools import random_llama

    shape = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320)
    return random_llama(**{**shape, **overrides})


def bitwise_equal(a: mx.array, b: mx.array) -> bool:
    """For the same computation only (same ops on the same shapes): BLAS reduction order depends
    on the shapes and the threads available, so other shapes agree to rounding, not bitwise."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(mx.array_equal(a, b).item())


def is_top_k(ids, logits, rtol: float = 1e-5) -> bool:
    """Whether ``ids`` are the ``len(ids)`` largest of ``logits`` (V,), best first, up to float32
    rounding (``rtol`` of the largest magnitude): logits computed by another computation (a
    batch of layers, another kernel) differ in the last bits, so a near-tie may be ordered
    either way."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top = np.sort(x)[::-1][: len(ids)]
    return len(set(ids)) == len(ids) and bool(np.all(np.abs(x[list(ids)] - top) <= rtol * np.abs(x).max()))


FAMILY_DIR = Path(__file__).parent / "families"


def family_names() -> list[str]:
    """Every family with a tiny-model config in tests/families/."""
    return sorted(p.stem for p in FAMILY_DIR.glob("*.toml"))


def family_config(name: str) -> dict:
    """tests/families/<name>.toml: the mlx-lm ``module``, its ``[args]``, and the ``family``
    (schema) it must be recognised as when that differs from the file name."""
    return tomllib.loads((FAMILY_DIR / f"{name}.toml").read_text())


def tiny_family(name: str, seed: int = 0, **overrides):
    """A random-weight model of mlx-lm's own classes, from tests/families/<name>.toml
    (``overrides`` replace fields of its ModelArgs)."""
    import importlib

    config = family_config(name)
    module = importlib.import_module(f"mlx_lm.models.{config['module']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict({**config["args"], **overrides}))
    # random init gives norms weight 1 and biases 0: perturb them so checks see them
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape).astype(p.dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def write_gguf(path, module, tokenizer, architecture: str) -> None:
    """Write an mlx-lm model and a byte-level BPE tokenizer as a GGUF file the way llama.cpp's
    converter lays it out (its tensor names; q/k rows permuted for the llama architecture)."""
    import json

    from mlx.utils import tree_flatten
    from mlxterp_loaders.gguf import _BLOCK_NAMES, _TOP_NAMES, permute_rows

    args = module.args
    to_gguf = {v: k for k, v in {**_BLOCK_NAMES, **_TOP_NAMES}.items()}
    tensors = {}
    for name, value in tree_flatten(module.parameters()):
        parent, leaf = name.rsplit(".", 1)
        if parent.startswith("model.layers."):
            _, _, layer, rest = parent.split(".", 3)
            if architecture == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = args.num_attention_heads if rest.endswith("q_proj") else args.num_key_value_heads
                value = permute_rows(value, heads)
            tensors[f"blk.{layer}.{to_gguf[rest]}.{leaf}"] = value
        else:
            tensors[f"{to_gguf[parent]}.{leaf}"] = value
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    scalar = lambda v, dtype=mx.uint32: mx.array(v, dtype=dtype)  # noqa: E731
    metadata = {
        "general.architecture": architecture,
        "general.name": f"tiny {architecture}",
        f"{architecture}.block_count": scalar(args.num_hidden_layers),
        f"{architecture}.embedding_length": scalar(args.hidden_size),
        f"{architecture}.feed_forward_length": scalar(args.intermediate_size),
        f"{architecture}.attention.head_count": scalar(args.num_attention_heads),
        f"{architecture}.attention.head_count_kv": scalar(args.num_key_value_heads),
        f"{architecture}.attention.layer_norm_rms_epsilon": scalar(args.rms_norm_eps, mx.float32),
        f"{architecture}.rope.freq_base": scalar(args.rope_theta, mx.float32),
        f"{architecture}.context_length": scalar(512),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": vocab,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t == "<|endoftext|>" else 1 for t in vocab], dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": scalar(vocab.index("<|endoftext|>")),
    }
    if getattr(args, "head_dim", None):
        metadata[f"{architecture}.attention.key_length"] = scalar(args.head_dim)
    mx.save_gguf(str(path), tensors, metadata)


def random_transcoders(model, kind: str = "plt", d_features: int = 32, skip: bool = False, seed: int = 0,
                       reads: str | None = None, bias: float = -0.8):
    """Random transcoders over every layer of ``model`` (ReLU, encoder rows of norm ~1, so
    a few features fire per token), in circuit-tracer's conventions."""
    import numpy as np
    from mlxterp_transcoders import Transcoders

    arch = model.architecture
    n, d = arch.n_layers, arch.d_model
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    reads = reads or ("ln2" if arch.has("ln2") else "resid_mid")
    return Transcoders(
        kind, list(range(n)),
        W_enc=[normal(d_features, d, scale=d ** -0.5) for _ in range(n)],
        b_enc=[normal(d_features, scale=0.1) + bias for _ in range(n)],
        W_dec=[normal(d_features, 1 if kind == "plt" else n - i, d, scale=0.3) for i in range(n)],
        b_dec=[normal(d, scale=0.1) for _ in range(n)],
        W_skip=[normal(d, d, scale=0.1) for _ in range(n)] if skip else None,
        activation="relu", reads=reads,
    )
