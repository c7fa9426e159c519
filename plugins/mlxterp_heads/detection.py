"""Head scores on attention probabilities, as TransformerLens's ``detect_head`` defines them,
and the induction-stripe score and induction loss on repeated random tokens (Olsson et al. 2022).

A detection pattern D (T, T) marks, for each query position i, the key positions j a head of
that kind attends to:

- ``previous_token``: j = i - 1;
- ``duplicate_token``: j < i with tok[j] == tok[i];
- ``induction``: 1 <= j <= i with tok[j - 1] == tok[i] (the token after an earlier copy);
- ``first_token``: j = 0 (BOS when the sequence starts with one);
- ``current_token``: j = i.

For a head's pattern A (T, T) over the real rows of a sequence of length T:

- ``"mul"``: sum(A * D) / sum(A), the share of the head's attention on D (sum(A) = T);
- ``"abs"``: 1 - sum|A - D| / T, in [-1, 1] (TransformerLens rounds the second term to 3
  decimals; we do not);
- ``exclude_bos`` / ``exclude_current_token`` zero column 0 / the diagonal of A (``"mul"``) or of
  |A - D| (``"abs"``) first, on a copy; a head whose remaining attention is 0 scores NaN.

Scores are per query head (grouped-query attention shares keys, not patterns), computed per
sequence over its real (non-padding) rows and averaged over sequences.

The stripe score on ``[X; X]`` (period n) is the mean of A[i, i - n + 1] over the rows of the
repeats, TransformerLens's ``pattern.diagonal(offset=1 - n)``: a perfect induction head scores
n / (n + 1) with two repeats (the last row of the first copy counts, and has nothing to copy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp.plugin import Activations, Hooks, InputError

from .results import HeadScores, InductionLoss

KINDS = ("previous_token", "duplicate_token", "induction", "first_token", "current_token")
MEASURES = ("mul", "abs", "stripe")
MEMORY_BUDGET = 512 * 2**20  # bytes of float32 attention probabilities per forward pass


def detection_pattern(kind: str, tokens: mx.array) -> mx.array:
    """The 0/1 detection pattern (B, T, T) float32 of ``kind`` for token ids (B, T)."""
    _check_kind(kind)
    length = tokens.shape[-1]
    i = mx.arange(length)[:, None]
    j = mx.arange(length)[None, :]
    if kind == "previous_token":
        marked = mx.broadcast_to(j == i - 1, (tokens.shape[0], length, length))
    elif kind == "first_token":
        marked = mx.broadcast_to(j == 0, (tokens.shape[0], length, length))
    elif kind == "current_token":
        marked = mx.broadcast_to(j == i, (tokens.shape[0], length, length))
    elif kind == "duplicate_token":
        marked = (tokens[:, :, None] == tokens[:, None, :]) & (j < i)
    else:  # induction: column j marks tok[j - 1] == tok[i]
        after = tokens[:, :, None] == tokens[:, None, :-1]  # (B, T, T - 1): columns 1..T-1
        after = mx.concatenate([mx.zeros((tokens.shape[0], length, 1), dtype=mx.bool_), after], axis=-1)
        marked = after & (j <= i)
    return marked.astype(mx.float32)


def score_patterns(
    patterns: mx.array,
    tokens: mx.array,
    kind: str,
    error_measure: str = "mul",
    lengths: Sequence[int] | None = None,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> mx.array:
    """Per-sequence scores (B, H) of attention probabilities ``patterns`` (B, H, T, T) of
    token ids ``tokens`` (B, T) whose real lengths are ``lengths`` (default all T)."""
    if error_measure not in ("mul", "abs"):
        raise InputError(f"error_measure={error_measure!r}: score_patterns takes 'mul' or 'abs'.")
    if kind == "first_token" and exclude_bos:
        raise InputError("first_token with exclude_bos=True removes everything it measures; drop exclude_bos.")
    if kind == "current_token" and exclude_current_token:
        raise InputError("current_token with exclude_current_token=True removes everything it measures; drop it.")
    if patterns.ndim == 3:
        patterns = patterns[None]
    if tokens.ndim == 1:
        tokens = tokens[None]
    batch, _, length, span = patterns.shape
    if span != length or tokens.shape != (batch, length):
        raise InputError(
            f"patterns {tuple(patterns.shape)} and tokens {tuple(tokens.shape)} do not match: "
            "expected patterns (B, H, T, T) and tokens (B, T)."
        )
    lengths = mx.array(list(lengths) if lengths is not None else [length] * batch)
    real_rows = (mx.arange(length)[None, :] < lengths[:, None]).astype(mx.float32)[:, None, :, None]
    keep = mx.ones((length, length), dtype=mx.float32)
    if exclude_bos:
        keep = keep * (mx.arange(length)[None, :] != 0)
    if exclude_current_token:
        keep = keep * (1 - mx.eye(length, dtype=mx.float32))
    wanted = detection_pattern(kind, tokens)[:, None]  # (B, 1, T, T)
    attention = patterns.astype(mx.float32) * real_rows
    if error_measure == "mul":
        attention = attention * keep
        return (attention * wanted).sum(axis=(-2, -1)) / attention.sum(axis=(-2, -1))
    error = mx.abs(attention - wanted * real_rows) * keep
    return 1 - error.sum(axis=(-2, -1)) / lengths[:, None].astype(mx.float32)


def stripe_scores(patterns: mx.array, period: int, offset: int = 0) -> mx.array:
    """Per-sequence induction-stripe scores (B, H): the mean of A[i, i - period + 1] over the
    rows i of the repeats, which start at position ``offset`` (1 after a BOS)."""
    if patterns.ndim == 3:
        patterns = patterns[None]
    length = patterns.shape[-1]
    if period < 2 or offset + 2 * period > length:
        raise InputError(f"period {period} with offset {offset} needs at least two repeats in {length} positions.")
    rows = mx.arange(offset + period - 1, length)
    cols = rows - (period - 1)
    picked = mx.take(patterns.astype(mx.float32), rows, axis=2)  # (B, H, K, T)
    stripe = mx.take_along_axis(picked, cols[None, None, :, None], axis=-1)[..., 0]
    return stripe.mean(axis=-1)


# -- the analyses ------------------------------------------------------------------------------


def ordinary_token_ids(model) -> np.ndarray:
    """Every token id that is not a special or added token, ascending."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        embedding = _embedding(model)
        return np.arange(int(getattr(embedding, "num_embeddings", 0) or embedding.weight.shape[0]))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    special |= set(getattr(inner, "added_tokens_decoder", {}) or {})
    return np.array([i for i in range(model.vocab_size) if i not in special], dtype=np.int32)


def repeated_random_tokens(
    model, n_tokens: int = 50, n_sequences: int = 10, repeats: int = 2, seed: int = 0, bos: bool = False
) -> mx.array:
    """(n_sequences, repeats * n_tokens [+ 1]) int32: n_tokens distinct ordinary (non-special)
    ids drawn with ``seed``, repeated ``repeats`` times; a BOS prepended when ``bos``."""
    if n_tokens < 2 or repeats < 2 or n_sequences < 1:
        raise InputError("repeated random tokens need n_tokens >= 2, repeats >= 2 and n_sequences >= 1.")
    ids = ordinary_token_ids(model)
    if len(ids) < n_tokens:
        raise InputError(f"n_tokens={n_tokens} exceeds the {len(ids)} ordinary token ids of this tokenizer.")
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.choice(ids, size=n_tokens, replace=False) for _ in range(n_sequences)])
    rows = np.tile(rows, (1, repeats))
    if bos:
        bos_id = getattr(model.tokenizer, "bos_token_id", None)
        if not isinstance(bos_id, int):
            raise InputError("bos=True: this tokenizer has no BOS token.")
        rows = np.concatenate([np.full((n_sequences, 1), bos_id), rows], axis=1)
    return mx.array(rows.astype(np.int32))


def head_scores(
    model,
    kind: str,
    text=None,
    *,
    error_measure: str = "mul",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    layers: list[int] | None = None,
    n_tokens: int = 50,
    n_sequences: int = 10,
    repeats: int = 2,
    seed: int = 0,
    bos: bool = False,
    interventions: Mapping[str, Callable] | None = None,
    plot: bool = False,
    save_path=None,
) -> HeadScores:
    """How much each query head of each layer behaves as a ``kind`` head (see the module doc).

    Args:
        kind: "previous_token", "duplicate_token", "induction", "first_token" or "current_token".
        text: a prompt, a list of prompts (right-padded; padding is never scored) or token id
            lists; None scores repeated random tokens (``n_sequences`` of ``n_tokens`` ids x
            ``repeats``, ``seed``, BOS only with ``bos=True``).
        error_measure: "mul", "abs" (TransformerLens) or "stripe" (induction on repeated random
            tokens only).
        layers: the layers to score (default all).
        interventions: passed to the trace (e.g. ablations), applied while scoring.

    Returns:
        HeadScores: ``result[layer][head]``, ``result.top(5)``, ``result.plot()``.
    """
    arch = model.architecture_or_raise("head scores")
    _check_kind(kind)
    if error_measure not in MEASURES:
        raise InputError(f"error_measure={error_measure!r}: use one of {', '.join(MEASURES)}.")
    if error_measure == "stripe" and (kind != "induction" or text is not None):
        raise InputError("error_measure='stripe' scores induction heads on repeated random tokens: use kind='induction' and leave text=None.")
    layers = list(range(arch.n_layers)) if layers is None else [int(i) for i in layers]
    if text is None:
        tokens = repeated_random_tokens(model, n_tokens, n_sequences, repeats, seed, bos)
        lengths = [tokens.shape[1]] * tokens.shape[0]
        source = f"{n_sequences} sequences of {n_tokens} random ordinary tokens x {repeats} (seed {seed}{', BOS first' if bos else ', no BOS'})"
    else:
        prepared = model.prepare_inputs([text] if isinstance(text, str) else text)
        tokens, lengths = prepared.array, list(prepared.lengths)
        source = text if isinstance(text, str) else f"{len(lengths)} prompts"
    names = [f"layers.{i}.attn.pattern" for i in layers]
    length = tokens.shape[1]
    rows_per_pass = max(1, MEMORY_BUDGET // (len(layers) * arch.n_heads * length * length * 4))
    # On a sharded model each rank scores the heads (tensor) or the layers (pipeline) it holds,
    # and only the (L, H) scores travel, never the patterns.
    sharding = model.sharding
    totals: dict[str, mx.array] = {}
    for start in range(0, tokens.shape[0], rows_per_pass):
        chunk, chunk_lengths = tokens[start : start + rows_per_pass], lengths[start : start + rows_per_pass]
        with Hooks(model, interventions, capture=names, gather=sharding is None) as hooks:
            _, recorded = hooks(chunk)
            hooks.check_reached()
        found = Activations(recorded, model)
        for name in names:
            if arch.resolve(name)[0].site not in recorded:  # a layer another pipeline stage runs
                continue
            if error_measure == "stripe":
                scores = stripe_scores(found[name], n_tokens, offset=int(bos))
            else:
                scores = score_patterns(found[name], chunk, kind, error_measure, chunk_lengths,
                                        exclude_bos, exclude_current_token)
            totals[name] = totals[name] + scores.sum(axis=0) if name in totals else scores.sum(axis=0)
        mx.eval(list(totals.values()))
    if sharding is not None:
        totals = sharding.combine(totals, axis=-1 if sharding.mode == "tensor" else None)
    scores = (mx.stack([totals[name] for name in names]) / tokens.shape[0]).tolist()
    result = HeadScores(kind=kind, error_measure=error_measure, layers=layers, n_heads=arch.n_heads,
                        scores=scores, source=source, n_sequences=int(tokens.shape[0]))
    if plot:
        result.plot(save_path)
    return result


def induction_loss(
    model,
    ablate: Sequence[tuple[int, int]] | None = None,
    *,
    n_tokens: int = 50,
    n_sequences: int = 10,
    repeats: int = 2,
    seed: int = 0,
    bos: bool = False,
) -> InductionLoss:
    """Next-token cross-entropy on repeated random tokens, in the first copy and in the repeats,
    with the (layer, head) pairs in ``ablate`` zero-ablated (their ``layers[i].attn.z`` set to
    0). Induction heads make the repeats predictable: ablating them raises the second number."""
    from mlxterp.plugin import interventions as iv

    arch = model.architecture_or_raise("the induction loss")
    ablate = [(int(layer), int(head)) for layer, head in (ablate or [])]
    by_layer: dict[int, list[int]] = {}
    for layer, head in ablate:
        if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads):
            raise InputError(f"head ({layer}, {head}) does not exist: layers 0..{arch.n_layers - 1}, heads 0..{arch.n_heads - 1}.")
        by_layer.setdefault(layer, []).append(head)
    edits = {f"layers.{layer}.attn.z": iv.zero_out.at(heads=heads) for layer, heads in by_layer.items()}
    tokens = repeated_random_tokens(model, n_tokens, n_sequences, repeats, seed, bos)
    logits = model.run(tokens, interventions=edits, capture=["logits"]).output.astype(mx.float32)
    losses = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:]).mean(axis=0)  # (T - 1,): target p + 1
    offset = int(bos)
    targets = np.arange(1, tokens.shape[1])
    first = (targets > offset) & (targets < offset + n_tokens)
    later = targets > offset + n_tokens  # the first repeated token follows random text: skip it
    per_position = losses.tolist()
    array = np.array(per_position)
    return InductionLoss(
        first_half=float(array[first].mean()),
        second_half=float(array[later].mean()),
        per_position=per_position,
        ablated=ablate,
        n_tokens=n_tokens,
        repeats=repeats,
        n_sequences=n_sequences,
        seed=seed,
        bos=bos,
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown head kind {kind!r}: use one of {', '.join(KINDS)}.")


def _embedding(model):
    from mlxterp.plugin import read_attribute

    arch = model.architecture_or_raise("random tokens without a tokenizer")
    return read_attribute(model.model, arch.schema.embed)
