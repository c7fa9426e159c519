"""The logit lens: read the residual stream of every layer through the final norm and the
unembedding, as if the model stopped there (nostalgebraist, 2020).

Written against standard names and the schema only: ``layers[i].output``, the family's final
norm and unembedding (tied or not, quantized or not, with its logit scaling and soft-capping).
All layers x positions go through one batched projection per chunk, never a loop over
positions. Top-k tokens and their probabilities come from the logits directly: the
softmax denominator per row, and the k largest logits, never a full softmax. On MLX's CPU backend, whose ``exp`` and ``argpartition`` are slow, that last step
runs in NumPy on the evaluated logits (see :func:`top_k_numpy`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import mlx.core as mx
import numpy as np

from mlxterp.plugin import on_cpu

from mlxterp.plugin import options

from .results import LogitLensResult, PromptCheck
from mlxterp.plugin import ids_text, token_text
from mlxterp.plugin import token_ids as prompt_ids

MEMORY_BUDGET = 512 * 2**20  # bytes of float32 logits per chunk of layers


def project(model, hidden: mx.array) -> mx.array:
    """Logits (..., V) of hidden states (..., D) through the final norm and the unembedding."""
    arch = model.architecture_or_raise("the logit lens")
    return arch.unembed(arch.final_norm(hidden))


def top_predictions(model, hidden: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k token ids and probabilities (..., k), best first, of hidden states (..., D)."""
    return top_of_logits(project(model, hidden).astype(mx.float32), top_k)


def top_of_logits(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k token ids and probabilities (..., k), best first, of float32 logits (..., V)."""
    if not on_cpu():
        return top_k_mlx(logits, top_k)
    ids, probs = top_k_numpy(np.asarray(logits).reshape(-1, logits.shape[-1]), top_k)
    k = ids.shape[-1]
    return mx.array(ids).reshape(*logits.shape[:-1], k), mx.array(probs).reshape(*logits.shape[:-1], k)


def top_k_mlx(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k ids and probabilities of float32 logits (..., V), best first, in MLX."""
    k = min(top_k, logits.shape[-1])
    peak = logits.max(axis=-1, keepdims=True)
    total = mx.exp(logits - peak).sum(axis=-1, keepdims=True)
    ids = mx.argpartition(-logits, k - 1, axis=-1)[..., :k]
    chosen = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-chosen, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.exp(mx.take_along_axis(chosen, order, axis=-1) - peak) / total


GROUPS = 64  # top-k candidates: the vocabulary as GROUPS rows of V // GROUPS columns
ROWS_PER_CHUNK = 16  # log-sum-exp over a few rows at a time, in cache


def top_k_numpy(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (R, k) and probabilities (R, k), best first, of float32 logits (R, V).

    The vocabulary is read as a (GROUPS, V // GROUPS) grid per row. The k largest logits lie in
    the k columns with the largest maxima (a column holding none of them has a maximum no
    larger than the k-th largest logit), so only those k columns are partitioned.
    """
    rows, vocab = logits.shape
    k = min(top_k, vocab)
    width = vocab // GROUPS
    if width <= 2 * k:  # a small vocabulary: every id is a candidate
        candidates = np.broadcast_to(np.arange(vocab), (rows, vocab))
    else:
        grid = logits[:, : GROUPS * width].reshape(rows, GROUPS, width)
        columns = np.argpartition(-grid.max(axis=1), k - 1, axis=-1)[:, :k]  # (R, k)
        candidates = (columns[:, None, :] + width * np.arange(GROUPS)[None, :, None]).reshape(rows, -1)
        rest = np.arange(GROUPS * width, vocab)  # the last V % GROUPS ids
        if rest.size:
            candidates = np.concatenate([candidates, np.broadcast_to(rest, (rows, rest.size))], axis=1)
    values = np.take_along_axis(logits, candidates, axis=-1)
    best = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, best, axis=-1)
    chosen = np.take_along_axis(values, best, axis=-1)
    peak = chosen[:, :1]  # the largest logit of each row
    return ids, np.exp(chosen - peak) / softmax_denominator(logits, peak[:, 0])[:, None]


def softmax_denominator(logits: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """sum(exp(row - peak)) per row of float32 logits (R, V), given each row's maximum; a
    probability is exp(logit - peak) / sum, as softmax computes it (subtracting the
    log-sum-exp instead loses digits when logits are large). Rows go a few at a time (in cache)
    and shared among threads (NumPy releases the GIL)."""
    totals = np.empty(logits.shape[0], dtype=np.float32)

    def chunks(first: int, stop: int) -> None:
        scratch = np.empty((min(ROWS_PER_CHUNK, stop - first), logits.shape[1]), dtype=np.float32)
        for start in range(first, stop, ROWS_PER_CHUNK):
            end = min(start + ROWS_PER_CHUNK, stop)
            buffer = scratch[: end - start]
            np.subtract(logits[start:end], peaks[start:end, None], out=buffer)
            np.exp(buffer, out=buffer)
            totals[start:end] = buffer.sum(axis=-1)

    workers = min(_threads(), max(1, logits.shape[0] // ROWS_PER_CHUNK))
    if workers == 1:
        chunks(0, logits.shape[0])
    else:
        bounds = [logits.shape[0] * i // workers for i in range(workers + 1)]
        list(_pool().map(chunks, bounds[:-1], bounds[1:]))
    return totals


@functools.cache
def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.cache
def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(_threads(), thread_name_prefix="mlxterp-lens")


def get_token_predictions(model, hidden: mx.array, top_k: int = 5, return_probs: bool = False,
                          return_scores: bool = False) -> list[Any]:
    """The top-k tokens a hidden state (D,) predicts: token ids, best first; with
    ``return_probs=True`` tuples ``(token_id, probability, token_text)``; with
    ``return_scores=True`` (upstream mlxterp's) pairs ``(token_id, logit)``."""
    top_k = options.top_k(top_k, model.embedding_vocab_size)
    hidden = options.vectors(hidden, _width(model), "hidden")
    logits = project(model, mx.array(hidden).reshape(-1, hidden.shape[-1])[-1]).astype(mx.float32)
    ids, probs = top_of_logits(logits, top_k)
    mx.eval(ids, probs)
    if return_scores:
        return [(i, logits[i].item()) for i in ids.tolist()]
    if not return_probs:
        return ids.tolist()
    return [(i, p, token_text(model, i)) for i, p in zip(ids.tolist(), probs.tolist())]


def test_prompt(model, prompt, answer: str, top_k: int = 10, prepend_space: bool = True) -> PromptCheck:
    """How the model ranks the tokens of ``answer`` after ``prompt`` (TransformerLens's
    ``utils.test_prompt``), from one forward pass over prompt + answer: per answer token its
    rank, probability and logit, and the top-k predictions at that position. A space is put
    before the answer unless it has one or ``prepend_space=False``."""
    top_k = options.top_k(top_k, model.embedding_vocab_size)
    if not isinstance(answer, str) or not answer.strip():
        raise options.OptionError(f"answer={answer!r}: give the expected continuation as a non-empty string.")
    if prepend_space and not answer.startswith(" "):
        answer = " " + answer
    prompt_part = prompt_ids(model, prompt)
    answer_part = [i for i in model.encode(answer) if i != getattr(model.tokenizer, "bos_token_id", None)]
    logits = model.run([prompt_part + answer_part], capture=["logits"]).activations["logits"][0]
    rows = logits[len(prompt_part) - 1 : len(prompt_part) - 1 + len(answer_part)].astype(mx.float32)
    logp = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    targets = mx.array(answer_part)
    chosen = mx.take_along_axis(rows, targets[:, None], axis=-1)[:, 0]
    ranks = (rows > chosen[:, None]).sum(axis=-1)
    top_ids, top_probs = top_of_logits(rows, top_k)
    mx.eval(logp, chosen, ranks, top_ids, top_probs)
    name = token_namer(model)
    return PromptCheck(
        prompt=prompt if isinstance(prompt, str) else ids_text(model, prompt_part),
        answer_tokens=[name(i) for i in answer_part],
        ranks=ranks.tolist(),
        probabilities=mx.exp(mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]).tolist(),
        logits=chosen.tolist(),
        top=[[(name(i), p) for i, p in zip(ids, probs)] for ids, probs in zip(top_ids.tolist(), top_probs.tolist())],
    )


def logit_lens(
    model,
    text,
    top_k: int = 5,
    layers: list[int] | None = None,
    position: int | None = None,
    plot: bool = False,
    max_display_tokens: int = 15,
    figsize=(16, 10),
    save_path=None,
) -> LogitLensResult:
    """What each layer predicts at each position of ``text`` (a string or token ids).

    Returns a LogitLensResult: ``result[layer][position]`` is the top-k list of
    ``(token_id, probability, token_text)``. ``position`` (negative counts from the end) keeps
    that position only: ``result[layer][0]``. ``plot=True`` draws the layers x positions heatmap
    (shown inline in a notebook; written to ``save_path`` when given). Positional arguments
    follow upstream mlxterp's order (text, top_k, layers, position, plot); a list in top_k's
    place is taken as ``layers``.
    """
    if isinstance(top_k, (list, tuple, range)) and layers is None:  # logit_lens(text, [0, 5])
        top_k, layers = 5, top_k
    arch = model.architecture_or_raise("the logit lens")
    layers = options.layers(layers, arch.n_layers)
    top_k = options.top_k(top_k, model.embedding_vocab_size)
    token_ids = shown = prompt_ids(model, text)
    if position is not None:  # the lens at a position depends on the tokens up to it only
        end = options.index(position, len(token_ids), "position", "position") + 1
        text = text if isinstance(text, str) else ids_text(model, token_ids)
        token_ids, shown = token_ids[:end], token_ids[end - 1 : end]
    first = len(token_ids) - len(shown)  # the first position shown
    if model.sharding is not None and model.sharding.mode == "pipeline":
        all_ids, all_probs = _staged_lens(model, token_ids, layers, top_k, first)
    else:  # tensor parallelism: the residual stream and the unembedding are on every rank
        resid = mx.stack([x[0][first:] for x in layer_outputs(model, token_ids, layers)])  # (L, T, D)
        chunk = layers_per_chunk(model, resid)
        ids_parts, probs_parts = [], []
        for start in range(0, len(layers), chunk):
            ids, probs = top_predictions(model, resid[start : start + chunk], top_k)
            ids_parts.append(np.array(ids))
            probs_parts.append(np.array(probs))
        all_ids, all_probs = np.concatenate(ids_parts), np.concatenate(probs_parts)
    name = token_namer(model)
    rows = prediction_rows(all_ids, all_probs, name)
    predictions = dict(zip(layers, rows))
    result = LogitLensResult(**lens_fields(model, text, shown, layers, predictions, top_k, name))
    if plot:
        result.plot(save_path, max_display_tokens=max_display_tokens, figsize=figsize)
    return result


def layers_per_chunk(model, hidden: mx.array) -> int:
    """How many layers of hidden states (L, T, D) to project at once: their float32 logits
    within MEMORY_BUDGET (the same chunks give the same numbers bit for bit)."""
    return max(1, MEMORY_BUDGET // max(hidden.shape[1] * _vocab_size(model, hidden) * 4, 1))


def token_namer(model):
    """``token_text`` of the model's tokenizer, remembered per token id."""
    return functools.lru_cache(maxsize=None)(lambda token: token_text(model, token))


def lens_fields(model, text, token_ids: list[int], layers: list[int], predictions: dict, top_k: int, name) -> dict:
    """The fields every lens result (LogitLensResult and its subclasses) takes, by keyword."""
    return dict(
        text=text if isinstance(text, str) else ids_text(model, token_ids),
        tokens=[name(t) for t in token_ids],
        token_ids=token_ids,
        layers=layers,
        predictions=predictions,
        top_k=top_k,
    )


def prediction_rows(ids, probs, name) -> list[list[list[tuple[int, float, str]]]]:
    """Top-k ids and probabilities (L, T, k) as, per layer and position, the lens results'
    lists of ``(token_id, probability, token_text)``."""
    ids, probs = np.asarray(ids).tolist(), np.asarray(probs).tolist()
    return [[[(t, p, name(t)) for t, p in zip(i, q)] for i, q in zip(layer_ids, layer_probs)]
            for layer_ids, layer_probs in zip(ids, probs)]


def layer_outputs(model, token_ids: list[int], layers: list[int]) -> list[mx.array]:
    """``layers[i].output`` (1, T, D) for each i in ``layers``, evaluated, from one forward
    pass stopped after the last of those layers (the model's own unembedding is not computed)."""
    from mlxterp.plugin import Activations, Hooks

    names = [f"layers.{i}.output" for i in layers]
    with Hooks(model, capture=names, stop_after="auto") as hooks:
        _, recorded = hooks(mx.array([token_ids]), evaluate=False)
        recorded = Activations(recorded, model)
    outputs = [recorded[name] for name in names]
    mx.eval(outputs)
    return outputs


def _staged_lens(model, token_ids: list[int], layers: list[int], top_k: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The lens of a pipeline-parallel model at positions ``first:``: each stage projects the
    layers it runs (every stage holds the final norm and the unembedding) and only the top-k
    ids and probabilities travel; (L, T - first, k) each, on every rank."""
    from mlxterp.plugin import Activations, Hooks

    names = [f"layers.{i}.output" for i in layers]
    with Hooks(model, capture=names, gather=False) as hooks:
        _, recorded = hooks(mx.array([token_ids]))
    found = Activations(recorded, model)
    parts = {}
    for name in names:
        if model.architecture.resolve(name)[0].site in recorded:
            ids, probs = top_predictions(model, found[name][0][first:], top_k)
            parts[name + ".ids"], parts[name + ".probs"] = ids, probs
    shared = model.sharding.combine(parts)
    return (np.stack([np.array(shared[n + ".ids"]) for n in names]),
            np.stack([np.array(shared[n + ".probs"]) for n in names]))


def _vocab_size(model, resid: mx.array) -> int:
    return project(model, resid[:1, :1]).shape[-1]


def _width(model) -> int | None:
    """The residual stream's width, from the final norm's weight (None where it has none)."""
    from mlxterp.plugin import read_attribute

    arch = model.architecture_or_raise("the logit lens")
    weight = getattr(read_attribute(arch.root, arch.schema.final_norm), "weight", None)
    return None if weight is None else weight.shape[-1]
