"""Training and evaluating a tuned lens on a corpus, through the trace.

Each micro-batch of token windows (``mlxterp_core.corpus.token_windows``) runs once through the
model with a capture filter for the streams entering the blocks (``layers[i].input``); the
model's own final logits are the targets. Translator i is trained on KL(final || lens_i) at the
same position (the reference's default loss), summed over layers as the reference sums their
gradients. BOS and padding positions are never trained on. The optimiser and schedule are the
reference's: SGD with Nesterov momentum 0.9, learning rate 0.1 decaying linearly to 0, weight
decay 1e-3, gradient norm clipped at 1, 250 steps of 2^18 tokens (gradient accumulation).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp_analyses.lens import project
from mlxterp_core.corpus import default_corpus, token_windows
from mlxterp_core import options
from mlxterp_core.errors import InputError, OptionError
from mlxterp_core.files import read_json, read_tensors, write_tensors_atomic, write_text_atomic

from .lens import TunedLens, log_softmax
from .results import LensEvaluation

MEMORY_BUDGET = 256 * 2**20  # bytes of float32 logits per (layer, chunk of tokens) of the loss


def train_tuned_lens(
    model,
    corpus: str | Path | Iterable[str] | None = None,
    *,
    lens: TunedLens | None = None,
    num_steps: int = 250,
    tokens_per_step: int = 2**18,
    context_size: int = 512,
    batch_size: int = 8,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    grad_clip: float = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    progress: bool = True,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> TunedLens:
    """Train a tuned lens for ``model`` on ``corpus`` (default: ``default_corpus()``, read again
    from its start whenever it runs out) and return it.

    Args:
        lens: continue training this lens (default: a new, zero-initialised one).
        num_steps, tokens_per_step: optimiser steps, and real tokens (BOS excluded) per step.
        context_size, batch_size: the token windows of one micro-batch (one forward pass).
        lr, momentum, weight_decay, grad_clip: SGD-Nesterov as in the reference (lr > 0,
            momentum in (0, 1), weight_decay >= 0, grad_clip >= 0 where 0 does not clip).
        checkpoint_dir: save the lens, the optimiser state and the data position there every
            ``checkpoint_every`` steps; a later call with the same folder resumes from it.
        progress: a tqdm bar (silent when not on a terminal).
        encoding, errors: how a corpus file is decoded (see ``mlxterp.read_documents``).
    """
    arch = model.architecture_or_raise("the tuned lens")
    num_steps, tokens_per_step, context_size, batch_size, checkpoint_every = (
        options.integer(value, option, 1) for option, value in (
            ("num_steps", num_steps), ("tokens_per_step", tokens_per_step), ("context_size", context_size),
            ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)))
    lr = options.number(lr, "lr", 0.0, open_low=True)
    momentum = options.number(momentum, "momentum", 0.0, 1.0, open_low=True, open_high=True)  # Nesterov needs > 0
    weight_decay = options.number(weight_decay, "weight_decay", 0.0)
    grad_clip = options.number(grad_clip, "grad_clip", 0.0)  # 0: no clipping
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise OptionError(f"checkpoint_dir={checkpoint_dir!r:.60}: expected a folder path, or None.")
    _check_lens(lens, arch, optional=True)
    lens = lens or TunedLens.for_model(model)
    corpus = default_corpus() if corpus is None else corpus
    optimizer = optim.SGD(learning_rate=optim.linear_schedule(lr, 0.0, num_steps), momentum=momentum,
                          weight_decay=weight_decay, nesterov=True)
    settings = {"num_steps": num_steps, "tokens_per_step": tokens_per_step, "context_size": context_size,
                "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "grad_clip": grad_clip}
    step, consumed = 0, 0
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None and (checkpoint / "state.json").is_file():
        step, consumed = _resume(checkpoint, lens, optimizer, settings)
    batches = _forever(model, corpus, context_size, batch_size, encoding, errors)
    for _ in range(consumed):  # the micro-batches the checkpoint has already trained on
        next(batches)
    names = [f"layers.{i}.input" for i in range(arch.n_layers)]
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=step, desc="tuned lens", unit="step", disable=None if progress else True)
    while step < num_steps:
        grads, counted, loss = None, 0, 0.0
        while counted < tokens_per_step:
            windows = next(batches)
            consumed += 1
            keep = np.flatnonzero((windows.mask & ~windows.bos).ravel())
            if keep.size == 0:
                continue
            keep = keep[: tokens_per_step - counted]
            trace = model.run(windows.inputs, capture=names)
            hidden = [trace.activations[n].reshape(-1, trace.activations[n].shape[-1])[mx.array(keep)] for n in names]
            final = trace.output.reshape(-1, trace.output.shape[-1])[mx.array(keep)]
            batch_loss, batch_grads = _summed_grads(model, lens, hidden, final)
            grads = batch_grads if grads is None else _add(grads, batch_grads)
            mx.eval(grads)
            counted += keep.size
            loss += batch_loss
        grads = _scale(grads, 1.0 / counted)
        if grad_clip:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(lens, grads)
        mx.eval(lens.parameters(), optimizer.state)
        step += 1
        bar.update(1)
        bar.set_postfix(kl=f"{loss / counted / arch.n_layers:.3f}")
        if checkpoint is not None and (step % checkpoint_every == 0 or step == num_steps):
            _save_checkpoint(checkpoint, lens, optimizer, settings, step, consumed)
    bar.close()
    return lens


def evaluate_tuned_lens(
    model,
    lens: TunedLens,
    corpus: str | Path | Iterable[str],
    *,
    context_size: int = 512,
    batch_size: int = 8,
    max_tokens: int | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> LensEvaluation:
    """Mean KL(final || lens) in nats per translator (the stream entering each block), for the
    tuned lens and the logit lens, over the real non-BOS tokens of ``corpus`` (a corpus file is
    decoded with ``encoding`` and ``errors``, see ``mlxterp.read_documents``)."""
    arch = model.architecture_or_raise("the tuned lens")
    _check_lens(lens, arch)
    context_size, batch_size = options.integer(context_size, "context_size", 1), options.integer(batch_size, "batch_size", 1)
    max_tokens = None if max_tokens is None else options.integer(max_tokens, "max_tokens", 1)
    names = [f"layers.{i}.input" for i in range(arch.n_layers)]
    tuned = mx.zeros(arch.n_layers)
    logit = mx.zeros(arch.n_layers)
    counted = 0
    for windows in token_windows(model, corpus, context_size, batch_size=batch_size, max_tokens=max_tokens,
                                 encoding=encoding, errors=errors):
        keep = mx.array(np.flatnonzero((windows.mask & ~windows.bos).ravel()))
        if keep.size == 0:
            continue
        trace = model.run(windows.inputs, capture=names)
        final = log_softmax(trace.output.reshape(-1, trace.output.shape[-1])[keep].astype(mx.float32), axis=-1)
        for i, name in enumerate(names):
            hidden = trace.activations[name].reshape(-1, trace.activations[name].shape[-1])[keep]
            for start, stop in _chunks(hidden.shape[0], final.shape[-1]):
                target = final[start:stop]
                tuned = tuned.at[i].add(_kl_sum(model, lens.transform_hidden(hidden[start:stop], i), target))
                logit = logit.at[i].add(_kl_sum(model, hidden[start:stop], target))
            mx.eval(tuned, logit)
        counted += keep.size
    if counted == 0:
        raise InputError("the evaluation corpus gave no tokens to score.")
    return LensEvaluation(layers=list(range(arch.n_layers)), tuned_kl=(tuned / counted).tolist(),
                          logit_kl=(logit / counted).tolist(), n_tokens=counted)


# -- pieces -------------------------------------------------------------------------------------


def _check_lens(lens, arch, optional: bool = False) -> None:
    if lens is None and optional:
        return
    if not isinstance(lens, TunedLens):
        raise OptionError(f"lens={lens!r:.60}: expected a TunedLens (TunedLens.for_model(model) or TunedLens.load(path)).")
    if lens.num_hidden_layers != arch.n_layers:
        raise OptionError(f"lens: this lens has {lens.num_hidden_layers} translators; the model has {arch.n_layers} layers.")


def _kl_sum(model, hidden: mx.array, target_logp: mx.array) -> mx.array:
    """sum over tokens of KL(target || lens) for hidden (N, D), target log-probs (N, V)."""
    logq = log_softmax(project(model, hidden).astype(mx.float32), axis=-1)
    return (mx.exp(target_logp) * (target_logp - logq)).sum()


def _summed_grads(model, lens: TunedLens, hidden: list[mx.array], final_logits: mx.array):
    """(sum over layers and tokens of KL, gradient tree of the lens) for one micro-batch.
    Translator i only affects layer i's loss, so each layer's gradient is taken alone, in
    chunks of tokens: memory stays at one (chunk, V) block of logits."""
    final = log_softmax(final_logits.astype(mx.float32), axis=-1)
    mx.eval(final)
    per_layer, total = [], 0.0
    for i, h in enumerate(hidden):
        translator = lens.layer_translators[i]

        def loss(params, h, target):
            moved = h + h @ params["weight"].T + (params["bias"] if "bias" in params else 0)
            return _kl_sum(model, moved, target)

        grad_fn = mx.value_and_grad(loss)
        params = dict(translator.parameters())
        layer_grads = None
        for start, stop in _chunks(h.shape[0], final.shape[-1]):
            value, g = grad_fn(params, h[start:stop], final[start:stop])
            layer_grads = g if layer_grads is None else _add(layer_grads, g)
            mx.eval(value, layer_grads)
            total += value.item()
        per_layer.append(layer_grads)
    return total, {"layer_translators": per_layer}


def _chunks(n: int, vocab: int) -> Iterator[tuple[int, int]]:
    size = max(1, MEMORY_BUDGET // (vocab * 4))
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _scale(tree, factor: float):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * factor, tree)


def _forever(model, corpus, context_size: int, batch_size: int, encoding: str = "utf-8", errors: str = "strict"):
    """The corpus's micro-batches, from its start again whenever it runs out."""
    if isinstance(corpus, Iterator):
        corpus = list(corpus)  # a one-shot iterator cannot be read twice
    for epoch in itertools.count():
        empty = True
        for windows in token_windows(model, corpus, context_size, batch_size=batch_size, encoding=encoding, errors=errors):
            empty = False
            yield windows
        if empty:
            raise InputError("the training corpus gave no token windows.")


def _save_checkpoint(folder: Path, lens: TunedLens, optimizer, settings: dict, step: int, consumed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # state.json, written last, marks the checkpoint complete: remove it before anything else
    # changes, so that a write that fails (a full disk) never leaves it beside newer files
    (folder / "state.json").unlink(missing_ok=True)
    lens.save(folder / "lens")
    write_tensors_atomic(folder / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    record = {"step": step, "microbatches": consumed, "settings": settings}
    write_text_atomic(folder / "state.json", json.dumps(record, indent=2))


def _resume(folder: Path, lens: TunedLens, optimizer, settings: dict) -> tuple[int, int]:
    advice = "Delete the folder to start over, or use another checkpoint_dir."
    record = read_json(folder / "state.json", "a tuned-lens checkpoint's state", error=InputError, advice=advice)
    if record.get("settings") != settings:
        raise InputError(
            f"the checkpoint in {folder} was made with other settings ({record.get('settings')}); "
            "resume with the same ones, or use another checkpoint_dir."
        )
    lens.load_state(TunedLens.load(folder / "lens").state())
    tensors = read_tensors(folder / "optimizer.safetensors", "a tuned-lens checkpoint's optimiser state",
                           error=InputError, advice=advice)
    optimizer.state = tree_unflatten(list(tensors.items()))
    try:
        return int(record["step"]), int(record["microbatches"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{folder / 'state.json'} is not a tuned-lens checkpoint's state. {advice}") from None
