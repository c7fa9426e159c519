"""The logit lens: read the residual stream of every layer through the final norm and the
unembedding, as if the model stopped there (nostalgebraist, 2020).

Written against standard names and the schema only: ``layers[i].output``, the family's final
norm and unembedding (tied or not, quantized or not, with its logit scaling and soft-capping).
All layers x positions go through one batched projection per chunk, never a loop over
positions.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .results import LogitLensResult
from .text import ids_text, token_text

MEMORY_BUDGET = 512 * 2**20  # bytes of float32 logits per chunk of layers


def project(model, hidden: mx.array) -> mx.array:
    """Logits (..., V) of hidden states (..., D) through the final norm and the unembedding."""
    arch = model.architecture_or_raise("the logit lens")
    return arch.unembed(arch.final_norm(hidden))


def top_predictions(model, hidden: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k token ids and probabilities (..., k), best first, of hidden states (..., D)."""
    logits = project(model, hidden).astype(mx.float32)
    probs = mx.softmax(logits, axis=-1)
    k = min(top_k, probs.shape[-1])
    ids = mx.argpartition(-probs, k - 1, axis=-1)[..., :k]
    chosen = mx.take_along_axis(probs, ids, axis=-1)
    order = mx.argsort(-chosen, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(chosen, order, axis=-1)


def get_token_predictions(model, hidden: mx.array, top_k: int = 5, return_probs: bool = False) -> list[Any]:
    """The top-k tokens a hidden state (D,) predicts: token ids, best first, or with
    ``return_probs=True`` tuples ``(token_id, probability, token_text)``."""
    ids, probs = top_predictions(model, mx.array(hidden).reshape(-1, hidden.shape[-1])[-1], top_k)
    mx.eval(ids, probs)
    if not return_probs:
        return ids.tolist()
    return [(i, p, token_text(model, i)) for i, p in zip(ids.tolist(), probs.tolist())]


def logit_lens(
    model,
    text,
    layers: list[int] | None = None,
    plot: bool = False,
    max_display_tokens: int = 15,
    figsize=(16, 10),
    top_k: int = 5,
    save_path=None,
) -> LogitLensResult:
    """What each layer predicts at each position of ``text`` (a string or token ids).

    Returns a LogitLensResult: ``result[layer][position]`` is the top-k list of
    ``(token_id, probability, token_text)``. ``plot=True`` draws the layers x positions heatmap
    (shown inline in a notebook; written to ``save_path`` when given).
    """
    arch = model.architecture_or_raise("the logit lens")
    layers = list(range(arch.n_layers)) if layers is None else [int(i) for i in layers]
    trace = model.run([text] if isinstance(text, str) else [list(text)], capture=[f"layers.{i}.output" for i in layers])
    token_ids = trace.inputs[0].tolist()
    resid = mx.stack([trace.activations[f"layers.{i}.output"][0] for i in layers])  # (L, T, D)
    vocab_bytes = resid.shape[1] * _vocab_size(model, resid) * 4
    chunk = max(1, MEMORY_BUDGET // max(vocab_bytes, 1))
    ids_parts, probs_parts = [], []
    for start in range(0, len(layers), chunk):
        ids, probs = top_predictions(model, resid[start : start + chunk], top_k)
        mx.eval(ids, probs)
        ids_parts.append(ids)
        probs_parts.append(probs)
    ids = mx.concatenate(ids_parts).tolist()
    probs = mx.concatenate(probs_parts).tolist()
    names: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in names:
            names[token] = token_text(model, token)
        return names[token]

    predictions = {
        layer: [
            [(t, p, name(t)) for t, p in zip(ids[li][pos], probs[li][pos])]
            for pos in range(len(token_ids))
        ]
        for li, layer in enumerate(layers)
    }
    result = LogitLensResult(
        text=text if isinstance(text, str) else ids_text(model, token_ids),
        tokens=[name(t) for t in token_ids],
        token_ids=token_ids,
        layers=layers,
        predictions=predictions,
        top_k=top_k,
    )
    if plot:
        result.plot(save_path, max_display_tokens=max_display_tokens, figsize=figsize)
    return result


def _vocab_size(model, resid: mx.array) -> int:
    return project(model, resid[:1, :1]).shape[-1]
