"""Turning what a user passes to ``trace`` into model inputs, and the tokenizer helpers.

Padding convention: a batch of prompts of different lengths is RIGHT-padded. Token position
``i`` is then the i-th token of every prompt, RoPE positions are those of a prompt run alone,
and because attention is causal no real position can see a pad. So at every real position a
padded batch computes the same activations as each prompt run alone (up to float rounding of
batched matmuls); the activations at pad positions are meaningless. ``Trace.lengths`` and
``Trace.mask`` tell which positions are real.

Tokenizers: mlx-lm's ``TokenizerWrapper``, a Hugging Face tokenizer, and a bare
``tokenizers.Tokenizer`` are all accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx

from .errors import InputError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``, with whatever special tokens the tokenizer adds by default."""
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))  # tokenizers.Tokenizer returns an Encoding


def decode(tokenizer: Any, ids: Sequence[int] | mx.array | int) -> str:
    if isinstance(ids, mx.array):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    return tokenizer.decode([int(i) for i in ids])


def vocab_size(tokenizer: Any) -> int:
    """Number of token ids the tokenizer can produce, added special tokens included."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper
    if hasattr(inner, "get_vocab_size"):  # tokenizers.Tokenizer
        return inner.get_vocab_size(with_added_tokens=True)
    try:
        return len(inner)
    except TypeError:
        return int(inner.vocab_size)


def pad_id(tokenizer: Any) -> int:
    """The id used to right-pad batches: pad token, else end-of-sequence, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


@attrs.frozen
class ModelInputs:
    """What the model is called with, and which positions are real.

    ``array`` is (B, T) token ids for text and id inputs, or the user's array as given.
    ``lengths`` holds the number of real tokens of each row (all T when nothing was padded).
    """

    array: mx.array
    lengths: tuple[int, ...]

    @property
    def mask(self) -> mx.array:
        """(B, T) boolean: True at real positions, False at padding."""
        length = self.array.shape[1]
        return mx.arange(length)[None, :] < mx.array(self.lengths)[:, None]


def prepare(inputs: Any, tokenizer: Any) -> ModelInputs:
    """Accept a string, a list of strings, token ids, a list of id lists, or an mx.array."""
    if isinstance(inputs, mx.array):
        if inputs.size == 0:
            raise InputError("empty input array: the model needs at least one token / element.")
        if inputs.ndim == 1 and mx.issubdtype(inputs.dtype, mx.integer):
            inputs = inputs[None]  # a single sequence of ids
        length = inputs.shape[1] if inputs.ndim > 1 else 1
        return ModelInputs(inputs, (length,) * inputs.shape[0])
    if isinstance(inputs, str):
        return _pad([_encode_checked(tokenizer, inputs)], tokenizer)
    if isinstance(inputs, Sequence) and not inputs:
        raise InputError("empty input: pass at least one prompt or token id.")
    if isinstance(inputs, Sequence):
        if all(isinstance(x, str) for x in inputs):
            return _pad([_encode_checked(tokenizer, text) for text in inputs], tokenizer)
        if all(isinstance(x, int) for x in inputs):
            return _pad([list(inputs)], tokenizer)
        if all(isinstance(x, Sequence) and not isinstance(x, str) for x in inputs):
            rows = [list(x) for x in inputs]
            if any(not row for row in rows):
                raise InputError("empty prompt in the batch: every row needs at least one token.")
            return _pad(rows, tokenizer)
    raise InputError(
        f"cannot run on {type(inputs).__name__} {inputs!r:.80}: pass a string, a list of "
        "strings, a list of token ids, a list of id lists, or an mx.array."
    )


def _encode_checked(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise InputError(
            "text input needs a tokenizer: InterpretableModel(module, tokenizer=...), "
            "or pass token ids / an mx.array instead of text."
        )
    ids = encode(tokenizer, text) if text else []
    if not ids:
        raise InputError(f"empty prompt {text!r}: it gives no tokens; pass some text.")
    return ids


def _pad(rows: list[list[int]], tokenizer: Any) -> ModelInputs:
    lengths = tuple(len(row) for row in rows)
    width = max(lengths)
    fill = pad_id(tokenizer) if tokenizer is not None else 0
    padded = [row + [fill] * (width - len(row)) for row in rows]
    return ModelInputs(mx.array(padded, dtype=mx.int32), lengths)
