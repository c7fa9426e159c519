"""Turning what a user passes to ``trace`` into model inputs, and the tokenizer helpers.

Padding convention: a batch of prompts of different lengths is RIGHT-padded. Token position
``i`` is then the i-th token of every prompt, RoPE positions are those of a prompt run alone,
and because attention is causal no real position can see a pad. So at every real position a
padded batch computes the same activations as each prompt run alone (up to float rounding of
batched matmuls); the activations at pad positions are meaningless. ``Trace.lengths`` and
``Trace.mask`` tell which positions are real.

Tokenizers: mlx-lm's ``TokenizerWrapper``, a Hugging Face tokenizer, and a bare
``tokenizers.Tokenizer`` are all accepted.

Token ids are checked before any kernel gathers with them: an id outside the model's embedding
reads whatever memory lies past the table (a wrong answer, or a crash of the interpreter), so
:func:`check_token_ids` rejects it with the id, its row and position. The vocabulary is the
embedding's row count (:func:`embedding_vocab_size`), not the tokenizer's: the two can differ.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    def inputs(self) -> mx.array:
        """The array the model runs on (as :attr:`Windows.inputs <mlxterp_core.corpus.Windows.inputs>`)."""
        return self.array

    @property
    def mask(self) -> mx.array:
        """(B, T) boolean: True at real positions, False at padding."""
        length = self.array.shape[1]
        return mx.arange(length)[None, :] < mx.array(self.lengths)[:, None]


def prepare(inputs: Any, tokenizer: Any, vocab_size: int | None = None) -> ModelInputs:
    """Accept a string, a list of strings, token ids, a list of id lists, or an mx.array
    (a NumPy array is taken as one).

    ``vocab_size``: the model's embedding rows (:func:`embedding_vocab_size`). When given, the
    inputs are token ids: integers, (T,) or (B, T), each in [0, vocab_size), else InputError.
    Without it (a model with no token embedding) arrays are passed to the model as they are.
    """
    if _is_numpy(inputs):
        inputs = mx.array(inputs)
    if isinstance(inputs, mx.array):
        if inputs.size == 0:
            raise InputError(f"empty input array of shape {tuple(inputs.shape)}: the model needs at least one token / element.")
        if inputs.ndim == 1 and (vocab_size is not None or mx.issubdtype(inputs.dtype, mx.integer)):
            inputs = inputs[None]  # a single sequence of ids
        if vocab_size is not None:
            if inputs.ndim != 2:
                raise InputError(
                    f"token ids of shape {tuple(inputs.shape)}: pass (T,) ids of one prompt or a "
                    "(B, T) batch."
                )
            check_token_ids(inputs, vocab_size)
        length = inputs.shape[1] if inputs.ndim > 1 else 1
        return ModelInputs(inputs, (length,) * inputs.shape[0])
    if isinstance(inputs, str):
        return _pad([_encode_checked(tokenizer, inputs)], tokenizer, vocab_size)
    if isinstance(inputs, Sequence) and not inputs:
        raise InputError("empty input: pass at least one prompt or token id.")
    if isinstance(inputs, Sequence):
        if all(isinstance(x, str) for x in inputs):
            return _pad([_encode_checked(tokenizer, text) for text in inputs], tokenizer, vocab_size)
        if all(_is_id(x) for x in inputs):
            return _pad([list(inputs)], tokenizer, vocab_size)
        if all(_is_row(x) for x in inputs):
            rows = [x.tolist() if isinstance(x, mx.array) else list(x) for x in inputs]
            empty = [b for b, row in enumerate(rows) if not row]
            if empty:
                raise InputError(f"empty prompt in the batch (row {empty[0]}): every row needs at least one token.")
            return _pad(rows, tokenizer, vocab_size)
    raise InputError(
        f"cannot run on {type(inputs).__name__} {inputs!r:.80}: pass a string, a list of "
        "strings, a list of token ids, a list of id lists, or an mx.array."
    )


_HOST_CHECK_SIZE = 1 << 16  # ids up to this many are checked with numpy on the host
# ids up to this many are first scanned by Python's max() over the buffer: inside a loop of
# traces a numpy reduction costs tens of microseconds of cold code, the scan a few
_HOST_SCAN_SIZE = 1024


def _host_max_unsigned(ids: mx.array) -> int:
    """The largest id read as an unsigned integer of the same width, so that a negative id
    reads as at least 2 ** (bits - 1): below a vocabulary no larger than that, it means every
    id is in range. A buffer that cannot be scanned so (not contiguous) gives a number that
    sends the check the long way."""
    try:
        view = memoryview(ids)
        return max(view.cast("B").cast(view.format.upper()))
    except (TypeError, ValueError):
        return 1 << 64


def _on_cuda() -> bool:
    """Whether MLX computes on a CUDA GPU. There, reading the ids on the host costs more than
    two reductions and a wait: measured on an H200 before a 1B forward (128 and 1024 ids),
    0.08-0.31 ms for a read against 0.10-0.12 ms for the reductions (their pages move to the
    host and back to the GPU for the embedding). Elsewhere (CPU, Apple's unified memory) the
    host read is the cheap way."""
    return mx.default_device().type == mx.gpu and _cuda_available()


@functools.cache
def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def check_token_ids(ids: mx.array, vocab_size: int | None) -> None:
    """Raise InputError unless ``ids`` (any shape) are integers in [0, vocab_size).

    Costs a scan of the ids on the host (CPU, Apple silicon) or, on a CUDA GPU, one min and
    one max reduction evaluated together (:func:`_on_cuda`); only a failing array is searched
    for the first bad id, whose batch row and position (of a (B, T) array) the error names.
    ``vocab_size=None`` (no token embedding) checks nothing.
    """
    if vocab_size is None:
        return
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise InputError(
            f"token ids must be integers, got an array of {_dtype(ids)} with shape "
            f"{tuple(ids.shape)}; convert with .astype(mx.int32) if the values are ids."
        )
    if ids.size == 0:
        return
    on_host = not _on_cuda()
    # read unsigned, a negative id is >= 2 ** (bits - 1): out of range if the vocabulary is smaller
    small = vocab_size <= 1 << (8 * ids.itemsize - 1)
    if on_host and ids.size <= _HOST_SCAN_SIZE and small and _host_max_unsigned(ids) < vocab_size:
        return  # the common case, at the cost of a few microseconds
    if on_host and ids.size <= _HOST_CHECK_SIZE:  # read on the host: no reduction kernels, no device sync
        host = np.asarray(ids)
        low, high = int(host.min()), int(host.max())
    else:
        low, high = mx.min(ids), mx.max(ids)
        mx.eval(low, high)
        low, high = low.item(), high.item()
    if low >= 0 and high < vocab_size:
        return
    wide = ids.astype(mx.int64)  # vocab_size may not fit the ids' own dtype (int8, uint8 ...)
    bad = ((wide < 0) | (wide >= vocab_size)).flatten()
    index = int(mx.argmax(bad).item())
    where = [int(i) for i in _unravel(index, ids.shape)]
    value = ids.flatten()[index].item()
    at = f"batch row {where[0]}, position {where[1]}" if len(where) == 2 else f"index {tuple(where)}"
    raise InputError(
        f"token id {value} at {at} is outside the vocabulary: this model's embedding has "
        f"{vocab_size} rows, so ids must be in [0, {vocab_size - 1}] (these ids run from "
        f"{low} to {high}). Ids from another model's tokenizer do not fit this one."
    )


def embedding_vocab_size(module: nn.Module, paths: Sequence[str | None] = ()) -> int | None:
    """Rows of ``module``'s token embedding, or None when it has none (see
    :func:`~mlxterp_core.architecture.token_embedding` for which embedding that is)."""
    from .architecture import token_embedding

    found = token_embedding(module, paths)
    return None if found is None else int(found.weight.shape[0])


def _unravel(index: int, shape: Sequence[int]) -> list[int]:
    where = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        where.append(rest)
    return where[::-1]


def _dtype(array: mx.array) -> str:
    return str(array.dtype).removeprefix("mlx.core.")


def _is_id(x: Any) -> bool:
    return isinstance(x, int) or (type(x).__module__ == "numpy" and hasattr(x, "dtype") and x.ndim == 0 and x.dtype.kind in "iu")


def _is_row(x: Any) -> bool:
    return (isinstance(x, Sequence) and not isinstance(x, str)) or (isinstance(x, mx.array) and x.ndim == 1) or _is_numpy(x)


def _is_numpy(x: Any) -> bool:
    return type(x).__name__ == "ndarray" and type(x).__module__ == "numpy"


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


def _pad(rows: list[list[int]], tokenizer: Any, vocab_size: int | None = None) -> ModelInputs:
    lengths = tuple(len(row) for row in rows)
    width = max(lengths)
    fill = pad_id(tokenizer) if tokenizer is not None else 0
    padded = [row + [fill] * (width - len(row)) for row in rows]
    try:
        # no dtype: MLX picks int64 for ids past int32, which the check then reports
        array = mx.array(padded)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(
            f"token ids must be integers that fit in 64 bits; could not read {rows!r:.80} "
            f"({type(e).__name__}: {e})."
        ) from None
    if array.ndim != 2:
        raise InputError(f"token ids nested too deep: {rows!r:.80} is not a list of id lists.")
    if vocab_size is not None:
        check_token_ids(array, vocab_size)
    elif not mx.issubdtype(array.dtype, mx.integer):
        raise InputError(f"token ids must be integers, got {_dtype(array)} values in {rows!r:.80}.")
    return ModelInputs(array.astype(mx.int32), lengths)
