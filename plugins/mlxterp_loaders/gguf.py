"""GGUF files (llama.cpp's format) as mlx-lm models.

``mx.load(path, return_metadata=True)`` reads the tensors (Q4_0, Q4_1 and Q8_0 blocks stay
quantized, as MLX affine quantization with group size 32; other types arrive dequantized) and
the metadata. This module maps llama.cpp's tensor names onto the mlx-lm model of the file's
architecture, quantizes exactly the layers that arrive quantized with their own bit width
(SmolLM2's embedding is 8-bit, the rest 4-bit), and undoes llama.cpp's query/key row order.

Query/key rows: llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of LLAMA
architectures per head from the Hugging Face "rotate half" layout (pairs i, i + D/2) to the
interleaved one its RoPE uses (pairs 2i, 2i + 1). mlx-lm's llama uses the rotate-half RoPE, so
the permutation is undone here. Qwen 2/3 files use the rotate-half layout as stored. The tests
check both directions: the real SmolLM2 file predicts " Paris", and a round trip through a GGUF
file written in llama.cpp's layout reproduces a model's logits exactly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxterp.plugin import MlxterpError

GROUP_SIZE = 32  # llama.cpp's block size for Q4_0 / Q4_1 / Q8_0

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF architecture -> (mlx-lm model_type, rows of q/k permuted by llama.cpp's converter)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}


class GGUFError(MlxterpError):
    """A GGUF file that cannot be loaded, with what to do about it."""


def read(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    if not path.is_file():
        raise GGUFError(f"no such GGUF file: {path}")
    check_structure(path)  # MLX's parser trusts the file: a corrupt one can crash the process
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX reports what it finds wrong as RuntimeError / ValueError
        raise GGUFError(f"{path} could not be read as GGUF (truncated or corrupt?): {e}") from None


# GGUF metadata value types: fixed sizes; 8 is a string, 9 an array
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# ggml tensor types: (elements per block, bytes per block)
_TENSOR_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}


def check_structure(path: Path) -> None:
    """Walk the GGUF header, metadata and tensor table, checking every length against the file
    (so that a truncated or corrupt file is an error here, not a crash inside MLX)."""
    import mmap
    import struct

    def fail(why: str):
        raise GGUFError(f"{path} is not a valid GGUF file (truncated or corrupt?): {why}.")

    with path.open("rb") as f:
        if path.stat().st_size < 24:
            fail("it is too short for a GGUF header")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        size, pos = len(data), 0

        def take(fmt: str):
            nonlocal pos
            width = struct.calcsize(fmt)
            if pos + width > size:
                fail(f"it ends at byte {size} inside a field that needs {pos + width}")
            value = struct.unpack_from(fmt, data, pos)
            pos += width
            return value[0] if len(value) == 1 else value

        def string() -> bytes:
            nonlocal pos
            length = take("<Q")
            if pos + length > size:
                fail(f"a string of {length} bytes at byte {pos} runs past the end")
            pos += length
            return bytes(data[pos - length : pos])

        def skip_value(kind: int, depth: int = 0) -> None:
            nonlocal pos
            if kind in _VALUE_SIZES:
                pos += _VALUE_SIZES[kind]
            elif kind == _STRING:
                string()
            elif kind == _ARRAY and depth == 0:
                inner, count = take("<I"), take("<Q")
                if inner in _VALUE_SIZES:
                    pos += count * _VALUE_SIZES[inner]
                else:
                    for _ in range(count):
                        skip_value(inner, depth + 1)
                        if pos > size:
                            break
            else:
                fail(f"unknown metadata value type {kind}")
            if pos > size:
                fail("a metadata value runs past the end")

        if data[:4] != b"GGUF":
            fail("it does not start with the GGUF magic bytes")
        pos = 4
        version, n_tensors, n_values = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            fail(f"unknown GGUF version {version}")
        if n_tensors > 1_000_000 or n_values > 1_000_000:
            fail(f"implausible counts ({n_tensors} tensors, {n_values} metadata values)")
        alignment = 32
        for _ in range(n_values):
            key = string()
            kind = take("<I")
            if key == b"general.alignment" and kind == 4:
                alignment = take("<I")
            else:
                skip_value(kind)
        tensors = []
        for _ in range(n_tensors):
            name = string().decode("utf-8", "replace")
            n_dims = take("<I")
            if not 1 <= n_dims <= 4:
                fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [take("<Q") for _ in range(n_dims)]
            kind, offset = take("<I"), take("<Q")
            if kind not in _TENSOR_TYPES:
                fail(f"tensor {name!r} has unknown type {kind}")
            tensors.append((name, dims, kind, offset))
        start = pos + (-pos % alignment)
        for name, dims, kind, offset in tensors:
            block, width = _TENSOR_TYPES[kind]
            count = 1
            for d in dims:
                count *= d
            if dims[0] % block:
                fail(f"tensor {name!r} has {dims[0]} columns, not a multiple of its block size {block}")
            end = start + offset + count // block * width
            if end > size:
                fail(f"tensor {name!r} ends at byte {end}, past the end of the file ({size} bytes)")
    finally:
        data.close()


def scalar(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") else value


def model_args(meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """mlx-lm ModelArgs fields from the GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    model_type, _ = ARCHITECTURES[arch]

    def get(key, default=None):
        return scalar(meta, f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // n_heads)
    args = dict(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=int(get("block_count")),
        intermediate_size=int(get("feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        vocab_size=int(get("vocab_size", 0) or weights["token_embd.weight"].shape[0]),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in weights,
        head_dim=head_dim,
    )
    if model_type == "qwen2":
        args.pop("head_dim")
    return args


def rename(name: str) -> str:
    """llama.cpp tensor name -> mlx-lm parameter path (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if match:
        layer, part, leaf = match.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{leaf}"
    else:
        part, _, leaf = name.partition(".")
        if part in _TOP_NAMES:
            return f"{_TOP_NAMES[part]}.{leaf}"
    raise GGUFError(f"tensor {name!r} has no counterpart in mlx-lm's model; this GGUF variant is not supported.")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head interleaving of q/k rows (works on packed quantized rows too)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's converter's permutation (the inverse of :func:`unpermute_rows`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bits_of(weights: dict[str, mx.array], prefix: str) -> int | None:
    """Bits per weight of a quantized tensor (None if it is not quantized)."""
    scales = weights.get(f"{prefix}.scales")
    if scales is None:
        return None
    in_features = scales.shape[-1] * GROUP_SIZE
    return weights[f"{prefix}.weight"].shape[-1] * 32 // in_features


def build(path: Path, rope_layout: str = "rotate_half") -> tuple[nn.Module, Any, dict[str, Any]]:
    """The mlx-lm model (quantized as stored), its tokenizer, and a report of what was loaded.

    ``rope_layout="interleaved"`` keeps llama.cpp's q/k row order and uses the interleaved
    (traditional) RoPE instead: the same model, used by the tests to verify the permutation.
    """
    from mlx_lm.utils import _get_classes

    from .gguf_tokenizer import build_tokenizer

    raw, meta = read(path)
    args = model_args(meta, raw)
    _, permuted = ARCHITECTURES[meta["general.architecture"]]
    weights = {rename(k): v for k, v in raw.items()}
    if permuted and rope_layout == "interleaved":
        args["rope_traditional"] = True
    elif permuted:
        for layer in range(args["num_hidden_layers"]):
            for proj, heads in (("q_proj", args["num_attention_heads"]), ("k_proj", args["num_key_value_heads"])):
                prefix = f"model.layers.{layer}.self_attn.{proj}"
                for leaf in ("weight", "scales", "biases", "bias"):
                    if f"{prefix}.{leaf}" in weights:
                        weights[f"{prefix}.{leaf}"] = unpermute_rows(weights[f"{prefix}.{leaf}"], heads)

    model_class, args_class = _get_classes({"model_type": args["model_type"]})
    model = model_class(args_class.from_dict(args))
    bits = {}
    for prefix in {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}:
        bits[prefix] = bits_of(weights, prefix)

    def quantized_here(module_path: str, module: nn.Module):
        b = bits.get(module_path)
        return False if b is None else {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}

    nn.quantize(model, class_predicate=quantized_here)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    report = {
        "format": "gguf",
        "file": str(path),
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "quantization": _describe_bits(bits),
    }
    return model, build_tokenizer(meta), report


def _describe_bits(bits: dict[str, int]) -> str:
    if not bits:
        return "none"
    counts: dict[int, int] = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    parts = [f"{n} tensors {b}-bit" for b, n in sorted(counts.items())]
    embed = bits.get("model.embed_tokens")
    return ", ".join(parts) + (f" (embedding {embed}-bit)" if embed else "") + f", group size {GROUP_SIZE}"
