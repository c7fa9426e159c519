"""Training and evaluating a tuned lens on a corpus, through the activation stream.

The stream (``mlxterp.plugin.TextRows``) runs each micro-batch of token windows once through the
model, recording the streams entering the blocks (``layers[i].input``) and the model's own final
logits, the targets; it keeps the rows every trainer trains on (no padding, BOS or window
start). Translator i is trained on KL(final || lens_i) at the same position (the reference's
default loss), summed over layers as the reference sums their gradients. The optimiser and
schedule are the reference's: SGD with Nesterov momentum 0.9, learning rate 0.1 decaying
linearly to 0, weight decay 1e-3, gradient norm clipped at 1, 250 steps of 2^18 tokens
(gradient accumulation over micro-batches). The loop, checkpoints and resume are the core's
(``mlxterp.plugin.train_steps``): a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp.plugin import (
    InputError,
    OptionError,
    TextRows,
    default_corpus,
    options,
    site_batches,
    token_windows,
    train_steps,
    trainable,
)
from mlxterp_analyses import project

from .results import LensEvaluation
from .tuned_lens import TunedLens, log_softmax

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
        num_steps: optimiser steps.
        tokens_per_step: training tokens per step (no padding, BOS or window start: the
            stream's one policy).
        context_size: tokens per window of a micro-batch (one forward pass).
        batch_size: windows per micro-batch.
        lr: SGD-Nesterov's learning rate (> 0), decaying linearly to 0, as in the reference.
        momentum: Nesterov momentum, in (0, 1).
        weight_decay: weight decay (>= 0).
        grad_clip: the gradient norm is clipped to this (0: no clipping).
        checkpoint_dir: save the lens, the optimiser state and the data position there every
            ``checkpoint_every`` steps; a later call with the same folder resumes from it.
        progress: a progress bar (silent when not on a terminal or in a notebook).
        encoding: the text encoding of a corpus file (see ``mlxterp.read_documents``).
        errors: what to do with bytes that do not decode ("strict": a CorpusError).
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
    settings = {"num_steps": num_steps, "tokens_per_step": tokens_per_step, "context_size": context_size,
                "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "grad_clip": grad_clip}
    names = [f"layers.{i}.input" for i in range(arch.n_layers)]
    rows = TextRows(model, corpus, names, context_size=context_size, batch_size=batch_size, outputs=True,
                    encoding=encoding, errors=errors)
    trainer = _LensTrainer(model, lens, names, num_steps, lr, momentum, weight_decay, grad_clip)
    before = lens.steps_trained
    run = train_steps(trainer, _Steps(rows, tokens_per_step), num_steps, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, settings=settings, progress=progress, desc="tuned lens",
                      what="train_tuned_lens")
    lens.steps_trained, lens.training_kl = before + run.end, trainer.kl
    return lens


class _Steps:
    """The stream's rows grouped into optimiser steps of ``tokens`` rows: each item is an
    iterator over the step's chunks (the last one cut; the rest of its micro-batch is not
    used), read lazily so only one micro-batch is held at a time."""

    def __init__(self, rows: TextRows, tokens: int):
        self.rows, self.tokens = rows, tokens
        self._chunks: Iterator | None = None

    def __iter__(self) -> _Steps:
        return self

    def __next__(self) -> Iterator[dict[str, mx.array]]:
        if self._chunks is None:
            self._chunks = iter(self.rows)
        return self._step()

    def _step(self) -> Iterator[dict[str, mx.array]]:
        counted = 0
        while counted < self.tokens:
            chunk = next(self._chunks)
            n = next(iter(chunk.values())).shape[0]
            if counted + n > self.tokens:
                chunk = {k: v[: self.tokens - counted] for k, v in chunk.items()}
                n = self.tokens - counted
            counted += n
            yield chunk

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        return {}, {"source": self.rows.position}

    def restore(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        self.rows.restore(info["source"])


class _LensTrainer:
    """One optimiser step: gradients accumulated over the step's micro-batches, averaged per
    token, clipped, an SGD-Nesterov update."""

    def __init__(self, model, lens: TunedLens, names: list[str], num_steps: int, lr: float, momentum: float,
                 weight_decay: float, grad_clip: float):
        self.model, self.lens, self.names, self.grad_clip = model, lens, names, grad_clip
        self.optimizer = optim.SGD(learning_rate=optim.linear_schedule(lr, 0.0, num_steps), momentum=momentum,
                                   weight_decay=weight_decay, nesterov=True)
        self.optimizer.init(lens.trainable_parameters())
        self.kl = 0.0

    def start(self, first) -> None:
        pass

    def step(self, chunks: Iterator[dict[str, mx.array]]) -> None:
        grads, counted, loss = None, 0, 0.0
        for chunk in chunks:
            hidden = [chunk[name] for name in self.names]
            batch_loss, batch_grads = _summed_grads(self.model, self.lens, hidden, chunk["output"])
            grads = batch_grads if grads is None else _add(grads, batch_grads)
            mx.eval(grads)
            counted += hidden[0].shape[0]
            loss += batch_loss
        grads = _scale(grads, 1.0 / counted)
        if self.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, self.grad_clip)
        self.optimizer.update(self.lens, grads)
        mx.eval(self.lens.parameters(), self.optimizer.state)
        self.kl = loss / counted / len(self.names)

    def status(self) -> str:
        return f"kl={self.kl:.3f}"

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors = {f"lens.{k}": v for k, v in self.lens.state().items()}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        return tensors, {"kl": self.kl}

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        self.lens.load_state({k[len("lens."):]: v for k, v in tensors.items() if k.startswith("lens.")})
        order = [k for k, _ in tree_flatten(self.optimizer.state)]  # a fresh run's order, not the file's
        self.optimizer.state = tree_unflatten([(k, tensors[f"optimizer.{k}"]) for k in order])
        self.kl = info["kl"]


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
    tuned lens and the logit lens, over the tokens of ``corpus`` that trainers use (no
    padding, BOS or window start). A corpus file is decoded with ``encoding`` and ``errors``
    (see ``mlxterp.read_documents``)."""
    arch = model.architecture_or_raise("the tuned lens")
    _check_lens(lens, arch)
    context_size, batch_size = options.integer(context_size, "context_size", 1), options.integer(batch_size, "batch_size", 1)
    max_tokens = None if max_tokens is None else options.integer(max_tokens, "max_tokens", 1)
    names = [f"layers.{i}.input" for i in range(arch.n_layers)]
    tuned = mx.zeros(arch.n_layers)
    logit = mx.zeros(arch.n_layers)
    counted = 0
    windows = token_windows(model, corpus, context_size, batch_size=batch_size, max_tokens=max_tokens,
                            encoding=encoding, errors=errors)
    for batch, acts, output in site_batches(model, windows, names, outputs=True):
        keep = mx.array(trainable(batch).reshape(-1).nonzero()[0])
        if keep.size == 0:
            continue
        final = log_softmax(output.reshape(-1, output.shape[-1])[keep].astype(mx.float32), axis=-1)
        for i, name in enumerate(names):
            hidden = acts[name].reshape(-1, acts[name].shape[-1])[keep]
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
