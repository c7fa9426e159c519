"""``model.tuned_lens(text, lens)``: the logit lens read through a tuned lens.

Row ``layer`` reads the stream leaving block ``layer`` (``layers[layer].output``, the logit
lens's convention), which enters block ``layer + 1``: translator ``layer + 1`` maps it. The
last layer's output is the model's own final stream and has no translator.
"""

from __future__ import annotations

import mlx.core as mx

from mlxterp_analyses.lens import project, top_predictions
from mlxterp_analyses.text import ids_text, token_text
from mlxterp_core.errors import InputError

from .lens import TunedLens, log_softmax
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
    layers = list(range(arch.n_layers)) if layers is None else [int(i) for i in layers]
    trace = model.run([text] if isinstance(text, str) else [list(text)], capture=[f"layers.{i}.output" for i in layers])
    token_ids = trace.inputs[0].tolist()
    final = log_softmax(trace.output[0].astype(mx.float32), axis=-1)  # (T, V)
    final_top = mx.argmax(final, axis=-1)
    names: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in names:
            names[token] = token_text(model, token)
        return names[token]

    predictions, kl, entropy, rank = {}, {}, {}, {}
    for layer in layers:
        hidden = trace.activations[f"layers.{layer}.output"][0]
        if layer + 1 < arch.n_layers:
            hidden = lens.transform_hidden(hidden, layer + 1)
        ids, probs = top_predictions(model, hidden, top_k)
        logq = log_softmax(project(model, hidden).astype(mx.float32), axis=-1)
        layer_kl = (mx.exp(final) * (final - logq)).sum(axis=-1)
        layer_entropy = -(mx.exp(logq) * logq).sum(axis=-1)
        top_logq = mx.take_along_axis(logq, final_top[:, None], axis=-1)
        layer_rank = (logq > top_logq).sum(axis=-1)
        mx.eval(ids, probs, layer_kl, layer_entropy, layer_rank)
        ids, probs = ids.tolist(), probs.tolist()
        predictions[layer] = [[(t, p, name(t)) for t, p in zip(ids[pos], probs[pos])] for pos in range(len(token_ids))]
        kl[layer], entropy[layer], rank[layer] = layer_kl.tolist(), layer_entropy.tolist(), layer_rank.tolist()
    result = TunedLensResult(
        text=text if isinstance(text, str) else ids_text(model, token_ids),
        tokens=[name(t) for t in token_ids],
        token_ids=token_ids,
        layers=layers,
        predictions=predictions,
        top_k=top_k,
        kl=kl,
        entropy=entropy,
        final_rank=rank,
    )
    if plot:
        result.plot(save_path, max_display_tokens=max_display_tokens, figsize=figsize)
    return result
