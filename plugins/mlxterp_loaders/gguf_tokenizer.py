"""A Hugging Face tokenizer rebuilt from a GGUF file's ``tokenizer.*`` metadata.

Byte-level BPE vocabularies (``tokenizer.ggml.model = "gpt2"``, as llama.cpp writes them for
SmolLM, Llama 3, Qwen, GPT-2 ...) are rebuilt with ``tokenizers``: the vocabulary and merges,
the pre-tokenizer that llama.cpp names in ``tokenizer.ggml.pre``, the control tokens as special
tokens, and the chat template. SentencePiece vocabularies are not supported yet.
"""

from __future__ import annotations

from typing import Any

from mlxterp.plugin import MlxterpError

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> (split each digit first, regex)
PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT),
    "gpt2": (False, GPT2_SPLIT),
    "gpt-2": (False, GPT2_SPLIT),
    "mpt": (False, GPT2_SPLIT),
    "olmo": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT),
    "starcoder": (True, GPT2_SPLIT),
    "refact": (True, GPT2_SPLIT),
    "command-r": (True, GPT2_SPLIT),
    "codeshell": (True, GPT2_SPLIT),
    "exaone": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT),
    "llama3": (False, LLAMA3_SPLIT),
    "dbrx": (False, LLAMA3_SPLIT),
    "smaug-bpe": (False, LLAMA3_SPLIT),
    "qwen2": (False, QWEN2_SPLIT),
    "stablelm2": (False, QWEN2_SPLIT),
}
CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
USER_DEFINED = 4


class TokenizerError(MlxterpError):
    """The GGUF file's tokenizer cannot be rebuilt."""


def build_tokenizer(meta: dict[str, Any]):
    """An mlx-lm TokenizerWrapper around a PreTrainedTokenizerFast built from GGUF metadata."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .gguf import scalar
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(
            f"tokenizer model {kind!r} in this GGUF file is not supported (only byte-level BPE, "
            "'gpt2'); pass tokenizer=... to mlxterp.load to supply one."
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"pre-tokenizer {pre!r} in this GGUF file is not supported; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Pass tokenizer=... to mlxterp.load to supply one."
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [1] * len(tokens)

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)

    def token(key: str) -> str | None:
        index = scalar(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = token("bos")
    if scalar(meta, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(wrapped)
