"""``model.tuned_lens(text, lens)``: the logit lens read through a tuned lens.

Row ``layer`` reads the stream leaving block ``layer`` (``layers[layer].output``, the logit
lens's convention), which enters block ``layer + 1``: translator ``layer + 1`` maps it. The
last layer's output is the model's own final stream and has no translator.
"""

from __future__ import annotations

import mlx.core as mx

from mlxterp_analyses import layers_per_chunk, lens_fields, prediction_rows, project, token_namer, top_of_logits
from mlxterp.plugin import InputError, options
from mlxterp.plugin import token_ids as prompt_ids

from .tuned_lens import TunedLens, log_softmax
from .results import TunedLensResult


def tuned_lens(
    model,
    text,
    lens: TunedLens,
    layers: list[int] | None = None,
    plot: bool = False,
    max_display_tokens: int = 15,
    figsize=(16, 10),
    top_k: int = 5,
    save_path=None,
) -> TunedLensResult:
    """What each layer predicts at each position of ``text`` through ``lens``, with KL to the
    final distribution, entropy and the rank of the final top-1 token (see TunedLensResult)."""
    arch = model.architecture_or_raise("the tuned lens")
    if not isinstance(lens, TunedLens):
        raise InputError(f"lens must be a TunedLens (model.train_tuned_lens or TunedLens.load), got {type(lens).__name__}.")
    if lens.num_hidden_layers != arch.n_layers:
        raise InputError(f"this lens has {lens.num_hidden_layers} translators; the model has {arch.n_layers} layers.")
    layers = options.layers(layers, arch.n_layers)
    top_k = options.top_k(top_k, model.embedding_vocab_size)
    trace = model.run([prompt_ids(model, text)], capture=[f"layers.{i}.output" for i in layers])
    token_ids = trace.inputs[0].tolist()
    final = log_softmax(trace.output[0].astype(mx.float32), axis=-1)  # (T, V)
    final_top = mx.argmax(final, axis=-1)
    name = token_namer(model)
    hidden = []
    for layer in layers:
        h = trace.activations[f"layers.{layer}.output"][0]
        hidden.append(lens.transform_hidden(h, layer + 1) if layer + 1 < arch.n_layers else h)
    hidden = mx.stack(hidden)  # (L, T, D)
    # the logit lens's chunks of layers, so that an untrained lens gives its numbers bit for bit
    chunk = layers_per_chunk(model, hidden)
    predictions, kl, entropy, rank = {}, {}, {}, {}
    for start in range(0, len(layers), chunk):
        logits = project(model, hidden[start : start + chunk]).astype(mx.float32)  # (l, T, V)
        ids, probs = top_of_logits(logits, top_k)
        logq = log_softmax(logits, axis=-1)
        part_kl = (mx.exp(final) * (final - logq)).sum(axis=-1)
        part_entropy = -(mx.exp(logq) * logq).sum(axis=-1)
        top_logq = mx.take_along_axis(logq, mx.broadcast_to(final_top[None, :, None], (*logq.shape[:2], 1)), axis=-1)
        part_rank = (logq > top_logq).sum(axis=-1)
        mx.eval(ids, probs, part_kl, part_entropy, part_rank)
        part_layers = layers[start : start + chunk]
        predictions.update(zip(part_layers, prediction_rows(ids, probs, name)))
        for k, layer in enumerate(part_layers):
            kl[layer], entropy[layer], rank[layer] = part_kl[k].tolist(), part_entropy[k].tolist(), part_rank[k].tolist()
    result = TunedLensResult(**lens_fields(model, text, token_ids, layers, predictions, top_k, name),
                             kl=kl, entropy=entropy, final_rank=rank)
    if plot:
        result.plot(save_path, max_display_tokens=max_display_tokens, figsize=figsize)
    return result
