"""Training SAEs in MLX: TopK (+AuxK), BatchTopK (exported as JumpReLU), JumpReLU and ReLU+L1,
or any registered architecture, on activations traced on the fly from texts or read from an
ActivationDataset; several sites (and so several SAEs) from one forward pass.

The recipe (``../shared/research/saes-lens-heads.md`` §1b); what is specific to an architecture
(its activation, parameters and their start, loss terms, export) is in its module of
:mod:`mlxterp_saes.architectures`:

- inputs are scaled by one scalar ``s = sqrt(d_in) / E||x||`` measured on the first batch
  (SAELens's ``expected_average_only_in``) and ``s`` is folded into the weights on export, so
  the saved SAE reads raw activations;
- ``W_dec`` rows start as random directions (unit norm for TopK/BatchTopK, 0.1 for the others,
  as SAELens), ``W_enc = W_dec^T``, ``b_dec`` = the first batch's mean, ``b_enc = 0``;
- architectures with a unit-norm decoder (TopK, BatchTopK) keep it so: the gradient's component
  along each row is removed before the step and the rows renormalised after it (OpenAI,
  BatchTopK). ReLU and JumpReLU leave the norms free and fold them on export;
- loss = sum over d of the squared error, mean over tokens (SAELens's convention), plus the
  architecture's terms (TopK's AuxK, ReLU's L1, JumpReLU's L0);
- a latent is dead when it has not fired for ``dead_tokens`` training tokens;
- Adam (betas 0.9, 0.999, bias-corrected), gradient norm clipped at 1, linear warm-up over
  the first 5% of steps and a linear decay to lr/10 over the last 20%;
- rows are shuffled in a buffer of ``buffer_tokens`` tokens, half of which is kept to mix with
  the next fill (SAELens's mixing buffer); BOS, padding and the first position of each window
  (an attention sink, see :func:`trainable`) are never trained on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp.plugin import is_raw
from mlxterp.plugin import progress_bar

from .architectures import get_architecture
from .architectures.base import check_option
from .sae import SAE, SAEConfig, SAEError, hook_name_of

CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_TENSORS = "trainer_state.safetensors"


@attrs.frozen
class TrainingLog:
    """What a training run did: per logged step, the step, tokens seen, L0, FVU (fraction of
    variance unexplained on the training batch) and the dead fraction; and its speed."""

    site: str
    architecture: str
    steps: list[int]
    tokens: list[int]
    l0: list[float]
    fvu: list[float]
    dead: list[float]
    n_tokens: int
    seconds: float
    tokens_per_second: float
    input_scale: float

    def plot(self, path=None):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()

        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for ax, values, label in zip(axes, (self.l0, self.fvu, self.dead), ("L0", "FVU", "dead fraction")):
            ax.plot(self.tokens, values)
            ax.set_xlabel("training tokens")
            ax.set_title(f"{label} ({self.site})")
        fig.tight_layout()
        return finish(fig, path)


def train_sae(
    model,
    site: str | Sequence[str],
    data: Any,
    architecture: str = "topk",
    d_sae: int | None = None,
    k: float | None = 32,
    *,
    expansion: int = 8,
    n_tokens: int = 1_000_000,
    batch_size: int = 4096,
    lr: float | None = None,
    l1_coefficient: float = 5.0,
    l0_coefficient: float = 1.0,
    aux_coefficient: float = 1 / 32,
    k_aux: int | None = None,
    dead_tokens: int | None = None,
    jumprelu_bandwidth: float = 0.05,
    jumprelu_init_threshold: float = 0.01,
    context_size: int = 128,
    forward_batch: int = 8,
    buffer_tokens: int = 65_536,
    skip_first: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    save_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log_every: int = 10,
) -> SAE | list[SAE]:
    """Train an SAE (or one per site, all from the same forward passes) and return it.

    Args:
        model: an InterpretableModel (its tokenizer windows text data).
        site: a standard name (``"layers[8].output"``) or a list of them.
        data: texts (a list of strings, or a corpus path: see ``mlxterp.read_documents``),
            traced on the fly in windows of ``context_size`` tokens, the forward stopped after
            the last layer needed; or an ActivationDataset (anything with
            ``.batches(site, batch_size, shuffle=True, seed=...)``); or an array of activations
            (N, d) (a dict site -> array for several sites). Sources are repeated until
            ``n_tokens`` tokens have been trained on.
        architecture: "topk", "batchtopk" (exported as "jumprelu"), "jumprelu" or "relu"
            ("standard"), or one registered with ``register_architecture``.
        d_sae: number of features (default ``expansion * d_in``).
        k: active features per token, in [1, d_sae] (topk, batchtopk: the mean over a batch).
        n_tokens: training tokens (BOS, padding and window starts excluded).
        batch_size: tokens per optimiser step.
        lr: Adam's learning rate (default ``2e-4 / sqrt(d_sae / 2**14)``, sparsify's rule).
        l1_coefficient, l0_coefficient: sparsity penalties of "relu" and "jumprelu".
        aux_coefficient, k_aux: the AuxK loss of topk/batchtopk (k_aux default d_in // 2).
        dead_tokens: a latent is dead after this many tokens without firing (default
            ``min(10M, n_tokens // 10)``).
        buffer_tokens: size of the shuffle buffer, in tokens.
        skip_first: leave out the first position of every window (texts or a dataset), the
            model's attention sink whose activations are outliers like BOS's (see
            :func:`trainable`); False trains on it (BOS is left out either way).
        checkpoint_dir: write a checkpoint every ``checkpoint_every`` steps there, and resume
            from the one found there.
        save_dir: save each trained SAE there in the SAELens v6 layout (one folder per site).
        progress: False hides the tqdm bar with live L0 / FVU / dead fraction (shown only
            when stderr is a terminal).

    Returns:
        the SAE, or a list of SAEs (one per site) when ``site`` is a list. Each has
        ``sae.training_log`` (:class:`TrainingLog`).

    Every option is checked before the model runs: an option out of its range is an SAEError
    that names it, the value given and the range.
    """
    sites = [site] if isinstance(site, str) else list(site)
    if not sites:
        raise SAEError("train_sae needs at least one site.")
    arch = get_architecture(architecture, training=True)
    for name, value, default in (
        ("d_sae", d_sae, "expansion * d_in"), ("expansion", expansion, None), ("n_tokens", n_tokens, None),
        ("batch_size", batch_size, None), ("buffer_tokens", buffer_tokens, None),
        ("dead_tokens", dead_tokens, "n_tokens // 10, at least batch_size, at most 10M"),
        ("context_size", context_size, None), ("forward_batch", forward_batch, None),
        ("checkpoint_every", checkpoint_every, None), ("log_every", log_every, None),
    ):
        check_option(name, value, 1, whole=True, default=default)
    check_option("lr", lr, 0, above=True, default="2e-4 / sqrt(d_sae / 2**14)")
    names = [_standard(model, s) for s in sites]
    if len(set(names)) != len(names):
        raise SAEError(f"the same site is named twice in {sites}.")
    steps = max(1, n_tokens // batch_size)
    dead_tokens = dead_tokens if dead_tokens is not None else max(batch_size, min(10_000_000, n_tokens // 10))
    settings = dict(architecture=arch.training_name, d_sae=d_sae, k=k, expansion=expansion, lr=lr, l1=l1_coefficient,
                    l0=l0_coefficient, aux=aux_coefficient, k_aux=k_aux, dead_tokens=dead_tokens, steps=steps,
                    bandwidth=jumprelu_bandwidth, init_threshold=jumprelu_init_threshold, seed=seed,
                    batch_size=batch_size, context_size=context_size, skip_first=skip_first)
    sizes = [d_sae] if d_sae is not None else sorted({expansion * _site_width(model, n, data) for n in names})
    for size in sizes:  # d_sae of each SAE
        arch.check_options(settings, size)
    source = _source(model, names, data, context_size, forward_batch, seed, skip_first)
    batches = _shuffled(source, batch_size, buffer_tokens, seed)
    trainers: list[_Trainer] | None = None
    resumed = _peek(Path(checkpoint_dir), names, settings) if checkpoint_dir is not None else None
    step = 0
    if resumed:
        step = resumed["step"]
        source.skip(resumed["source_position"])
    start = time.perf_counter()
    bar = progress_bar(steps, "train_sae", progress is not False, unit="step")
    bar.update(step)
    try:
        for batch in batches:
            if trainers is None:
                trainers = [_Trainer(name, batch[name], settings) for name in names]
                if resumed:
                    _resume(trainers, Path(checkpoint_dir))
            if step >= steps:
                break
            for trainer in trainers:
                trainer.step(batch[trainer.site])
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                stats = [t.log(step) for t in trainers]
                bar.set_postfix_str(" ".join(f"L0={s[0]:.1f} FVU={s[1]:.3f} dead={s[2]:.1%}" for s in stats[:2]))
            if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == steps):
                _checkpoint(trainers, Path(checkpoint_dir), settings, step, source.position)
            if step >= steps:
                break
    finally:
        bar.close()
    if trainers is None:
        raise SAEError("the training data held no tokens (BOS and padding are not trained on).")
    seconds = time.perf_counter() - start
    trained = step - (resumed["step"] if resumed else 0)
    saes = []
    for trainer in trainers:
        sae = trainer.export(model)
        log = trainer.training_log(seconds, trained * batch_size)
        object.__setattr__(sae, "training_log", log)
        if save_dir is not None:
            sae.save(Path(save_dir) / trainer.site, sparsity=trainer.log_sparsity())
        saes.append(sae)
    return saes if not isinstance(site, str) else saes[0]


# -- the trainer of one SAE --------------------------------------------------------------------


class _Trainer:
    """One SAE in training: the shared loop's state (parameters, Adam, dead-latent counts,
    densities, history); its architecture's rules in ``self.arch``."""

    def __init__(self, site: str, first: mx.array, settings: dict[str, Any]):
        self.site = site
        self.settings = settings
        self.arch = get_architecture(settings["architecture"], training=True)
        x = first.astype(mx.float32)
        self.d_in = x.shape[-1]
        self.d_sae = settings["d_sae"] or settings["expansion"] * self.d_in
        self.scale = float(math.sqrt(self.d_in) / max(mx.linalg.norm(x, axis=-1).mean().item(), 1e-12))
        self.params = self.arch.init_params(self, x * self.scale)
        lr = settings["lr"] or 2e-4 / math.sqrt(self.d_sae / 2**14)
        steps = settings["steps"]
        warm, decay = max(1, steps // 20), max(1, steps // 5)
        schedule = optim.join_schedules(
            [optim.linear_schedule(lr * 0.01, lr, warm), lambda s: mx.array(lr, dtype=mx.float32),
             optim.linear_schedule(lr, lr / 10, decay)],
            [warm, max(warm + 1, steps - decay)],
        )
        self.optimizer = optim.Adam(learning_rate=schedule, bias_correction=True)
        self.optimizer.init(self.params)
        self.since_fired = mx.zeros((self.d_sae,), dtype=mx.int32)
        self.fired_count = mx.zeros((self.d_sae,), dtype=mx.float32)
        self.counted_tokens = 0
        self.buffers = self.arch.init_buffers(self)  # e.g. batchtopk's running threshold
        self.seen = 0
        self.history: dict[str, list] = {"steps": [], "tokens": [], "l0": [], "fvu": [], "dead": []}
        self._last: tuple[mx.array, ...] | None = None
        self._grad = mx.value_and_grad(self._loss)

    # the loss, in the scaled space
    def _loss(self, params, x, dead):
        h = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        f = self.arch.train_activation(self, params, h)
        recons = f @ params["W_dec"] + params["b_dec"]
        error = x - recons
        mse = (error**2).sum(axis=-1).mean()
        loss = mse
        extra = self.arch.loss(self, params, h, f, error, dead)
        if extra is not None:
            loss = loss + extra
        return loss, (f, mse, x)

    def step(self, x: mx.array) -> None:
        x = x.astype(mx.float32) * self.scale
        dead = self.since_fired > self.settings["dead_tokens"]
        (loss, (f, mse, _)), grads = self._grad(self.params, x, dead)
        if self.arch.unit_norm_decoder:
            W = self.params["W_dec"]
            g = grads["W_dec"]
            grads["W_dec"] = g - (g * W).sum(axis=-1, keepdims=True) * W
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        self.params = self.optimizer.apply_gradients(grads, self.params)
        if self.arch.unit_norm_decoder:
            W = self.params["W_dec"]
            self.params["W_dec"] = W / mx.maximum(mx.linalg.norm(W, axis=-1, keepdims=True), 1e-8)
        fired = (f > 0).any(axis=0)
        n = x.shape[0]
        self.since_fired = mx.where(fired, 0, self.since_fired + n)
        self.buffers = self.arch.after_step(self, f)
        if self.seen >= self.settings["steps"] * n * 3 // 4:  # densities over the last quarter
            self.fired_count = self.fired_count + (f > 0).sum(axis=0)
            self.counted_tokens += n
        self.seen += n
        variance = ((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()
        self._last = ((f > 0).sum(axis=-1).mean(), mse / variance)
        mx.eval(self.params, self.optimizer.state, self.since_fired, self.buffers, self.fired_count, *self._last)

    def log(self, step: int) -> tuple[float, float, float]:
        l0, fvu = (v.item() for v in self._last)
        dead = (self.since_fired > self.settings["dead_tokens"]).astype(mx.float32).mean().item()
        for key, value in zip(self.history, (step, self.seen, l0, fvu, dead)):
            self.history[key].append(value)
        return l0, fvu, dead

    def log_sparsity(self) -> mx.array:
        tokens = max(self.counted_tokens, 1)
        return mx.log10(self.fired_count / tokens + 1e-10)

    def training_log(self, seconds: float, tokens: int) -> TrainingLog:
        return TrainingLog(site=self.site, architecture=self.settings["architecture"], n_tokens=self.seen,
                           seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9), input_scale=self.scale,
                           **self.history)

    def export(self, model) -> SAE:
        """The trained SAE for raw activations, as the architecture exports it (the input scale
        folded in; BatchTopK as JumpReLU; unit-norm decoder rows unless it refuses them)."""
        weights, fields = self.arch.export(self)
        cfg = SAEConfig(
            architecture=self.arch.saved_as, d_in=self.d_in, d_sae=self.d_sae,
            site=self.site, hook_name=None if is_raw(self.site) else hook_name_of(self.site),
            model_name=_model_name(model), context_size=self.settings.get("context_size"),
            metadata={"training_architecture": self.settings["architecture"], "training_tokens": self.seen,
                      "exclude_special_tokens": True, "mlxterp_trained": True},
            **fields,
        )
        sae = SAE(cfg, weights)
        if self.arch.fold_on_export:
            sae.fold_W_dec_norm()
        return sae

    # checkpoints
    def state(self) -> dict[str, mx.array]:
        tensors = {f"params.{k}": v for k, v in self.params.items()}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        tensors.update(since_fired=self.since_fired, fired_count=self.fired_count, **self.buffers)
        return tensors

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        self.params = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
        state = [(k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")]
        self.optimizer.state = tree_unflatten(state)
        self.since_fired, self.fired_count = tensors["since_fired"], tensors["fired_count"]
        self.buffers = {k: tensors[k] for k in self.buffers}
        self.scale, self.seen, self.counted_tokens = info["scale"], info["seen"], info["counted_tokens"]
        self.history = info["history"]


def _checkpoint(trainers: list[_Trainer], folder: Path, settings, step: int, position: int) -> None:
    """One folder per site: tensors first, then the JSON state (renamed into place last)."""
    for trainer in trainers:
        where = folder / _safe(trainer.site)
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / ("tmp." + CHECKPOINT_TENSORS)
        mx.save_safetensors(str(tmp), trainer.state())
        os.replace(tmp, where / CHECKPOINT_TENSORS)
        info = {"step": step, "source_position": position, "settings": settings, "scale": trainer.scale,
                "seen": trainer.seen, "counted_tokens": trainer.counted_tokens, "history": trainer.history}
        tmp = where / ("tmp." + CHECKPOINT_STATE)
        tmp.write_text(json.dumps(info))
        os.replace(tmp, where / CHECKPOINT_STATE)


def _peek(folder: Path, sites: list[str], settings) -> dict[str, Any] | None:
    """The state of the checkpoints in ``folder`` (one per site, all at the same step), or None."""
    found = []
    for site in sites:
        where = folder / _safe(site) / CHECKPOINT_STATE
        if not where.is_file():
            found.append(None)
            continue
        try:
            info = json.loads(where.read_text())
        except ValueError as e:
            raise SAEError(f"{where}: unreadable checkpoint ({e}); delete it to start over.") from e
        differ = {k for k in settings if info["settings"].get(k) != settings[k]}
        if differ:
            raise SAEError(
                f"the checkpoint in {where.parent} was made with other settings ({', '.join(sorted(differ))}): "
                "use another checkpoint_dir, or the same settings to resume."
            )
        found.append(info)
    if all(f is None for f in found):
        return None
    if any(f is None for f in found) or len({f["step"] for f in found}) != 1:
        raise SAEError(f"the checkpoints in {folder} are from different runs or steps; delete them to start over.")
    return found[0]


def _resume(trainers: list[_Trainer], folder: Path) -> None:
    for trainer in trainers:
        where = folder / _safe(trainer.site)
        info = json.loads((where / CHECKPOINT_STATE).read_text())
        try:
            tensors = mx.load(str(where / CHECKPOINT_TENSORS))
        except Exception as e:
            raise SAEError(f"{where / CHECKPOINT_TENSORS}: unreadable checkpoint ({e}); delete it to start over.") from e
        trainer.load_state(tensors, info)


def _safe(site: str) -> str:
    return site.replace("/", "_")


# -- data -----------------------------------------------------------------------------------------


def _standard(model, site: str) -> str:
    if is_raw(site):
        return site
    found = model.architecture_or_raise(site).resolve(site)
    if len(found) != 1:
        raise SAEError(f"train one SAE per site: {site!r} names {len(found)} sites (list them instead).")
    return found[0].name


def _site_width(model, site: str, data) -> int:
    """The width of ``site``'s training rows, without running the model: the data's when it
    says (an array, a dataset's manifest), else the site's last axis in a one-token forward
    built lazily and never evaluated (MLX knows shapes before it computes anything)."""
    if isinstance(data, (mx.array, np.ndarray)):
        return int(data.shape[-1])
    if isinstance(data, dict) and site in data:
        return int(data[site].shape[-1])
    if hasattr(data, "rows"):  # an ActivationDataset
        return int(data.rows(site).shape[-1])
    from mlxterp.plugin import Hooks

    with Hooks(model, capture=[site], stop_after="auto") as hooks:
        _, recorded = hooks(mx.zeros((1, 1), dtype=mx.int32), evaluate=False)
    if is_raw(site):
        return int(recorded[site].shape[-1])
    resolved = model.architecture.resolve(site)[0]
    return int(resolved.read(recorded[resolved.site]).shape[-1])


class _Source:
    """Chunks of rows {site: (n, d)} from the data, repeated forever; ``position`` counts the
    units read (windows for text, batches for a dataset, rows for arrays) so a resumed run can
    ``skip`` them."""

    position = 0

    def chunks(self) -> Iterator[dict[str, mx.array]]:
        raise NotImplementedError

    def skip(self, position: int) -> None:
        self._skip = position


class _TextSource(_Source):
    def __init__(self, model, sites, corpus, context_size, forward_batch, skip_first=True):
        from mlxterp.plugin import read_documents

        self.model, self.sites = model, sites
        self.corpus = corpus if isinstance(corpus, (str, os.PathLike)) else list(read_documents(corpus))
        self.context_size, self.forward_batch, self.skip_first = context_size, forward_batch, skip_first
        self._skip = 0

    def chunks(self):
        from mlxterp.plugin import token_windows

        while True:
            read = skipped = 0
            for windows in token_windows(self.model, self.corpus, self.context_size, batch_size=self.forward_batch):
                self.position += len(windows)
                if self.position <= self._skip:
                    skipped += 1
                    continue
                keep = trainable(windows, self.skip_first).reshape(-1)
                if not keep.any():
                    continue
                read += 1
                acts = trace_sites(self.model, windows.inputs, self.sites)
                index = mx.array(np.flatnonzero(keep).astype(np.int32))
                yield {s: mx.take(a.reshape(-1, a.shape[-1]), index, axis=0).astype(mx.float32) for s, a in acts.items()}
            if read == 0 and skipped == 0:
                raise SAEError("the training texts hold no tokens to train on (BOS and padding are excluded).")


class _DatasetSource(_Source):
    def __init__(self, dataset, sites, batch_size, seed, skip_first=True):
        self.dataset, self.sites, self.batch_size, self.seed = dataset, sites, batch_size, seed
        # ActivationDataset.batches leaves out window starts by default
        self.options = {} if skip_first else {"skip_first": False}
        self._skip = 0

    def chunks(self):
        epoch = 0
        while True:
            streams = [self.dataset.batches(s, self.batch_size, shuffle=True, seed=self.seed + epoch, **self.options)
                       for s in self.sites]
            empty = True
            for rows in zip(*streams):
                empty = False
                self.position += 1
                if self.position <= self._skip:
                    continue
                yield {s: r.astype(mx.float32) for s, r in zip(self.sites, rows)}
            if empty:
                raise SAEError(f"the dataset {self.dataset!r} yields no rows for {self.sites}.")
            epoch += 1


class _ArraySource(_Source):
    def __init__(self, arrays: dict[str, mx.array], chunk: int):
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise SAEError(f"the activation arrays have different numbers of rows: {sizes}.")
        self.arrays, self.chunk, self.rows = arrays, chunk, sizes.pop()
        self._skip = 0

    def chunks(self):
        while True:
            for start in range(0, self.rows, self.chunk):
                self.position += 1
                if self.position <= self._skip:
                    continue
                yield {s: a[start : start + self.chunk].astype(mx.float32) for s, a in self.arrays.items()}


def _source(model, sites, data, context_size, forward_batch, seed, skip_first=True) -> _Source:
    if hasattr(data, "batches"):
        return _DatasetSource(data, sites, 4096, seed, skip_first)
    if isinstance(data, (mx.array, np.ndarray)):
        if len(sites) != 1:
            raise SAEError("one activation array trains one site: pass {site: array} for several.")
        data = {sites[0]: data}
    if isinstance(data, dict):
        missing = [s for s in sites if s not in data]
        if missing:
            raise SAEError(f"no activations given for {', '.join(missing)}.")
        arrays = {s: mx.array(data[s]).reshape(-1, data[s].shape[-1]) for s in sites}
        return _ArraySource(arrays, 8192)
    if isinstance(data, str) and not os.path.exists(data):
        raise SAEError(f"data={data[:60]!r} is not a file or folder: pass texts as a list of strings.")
    if model.tokenizer is None:
        raise SAEError("training on texts needs a model with a tokenizer.")
    return _TextSource(model, sites, data, context_size, forward_batch, skip_first)


def _shuffled(source: _Source, batch_size: int, buffer_tokens: int, seed: int) -> Iterator[dict[str, mx.array]]:
    """Training batches: chunks mixed in a buffer of ``buffer_tokens`` rows, half of which is
    kept for the next fill; every site's rows in the same order."""
    rng = np.random.default_rng(seed)
    held: list[dict[str, mx.array]] = []
    count = 0
    keep = max(buffer_tokens // 2, batch_size)
    for chunk in source.chunks():
        held.append(chunk)
        count += next(iter(chunk.values())).shape[0]
        if count < buffer_tokens + batch_size:
            continue
        sites = list(held[0])
        rows = {s: mx.concatenate([c[s] for c in held]) for s in sites}
        perm = mx.array(rng.permutation(count).astype(np.int32))
        rows = {s: mx.take(r, perm, axis=0) for s, r in rows.items()}
        serve = (count - keep) // batch_size * batch_size
        mx.eval(rows)
        for start in range(0, serve, batch_size):
            yield {s: r[start : start + batch_size] for s, r in rows.items()}
        held = [{s: r[serve:] for s, r in rows.items()}]
        count -= serve


def trainable(windows, skip_first: bool = True) -> np.ndarray:
    """(B, T) bool: the positions SAEs are trained and evaluated on. Not padding, not BOS, and
    (unless ``skip_first=False``) not the first position of a window: with nothing before it,
    it is the model's attention sink, whose activations are outliers like BOS's (on the default
    model its norm is ~100x the others'; the 1 token in 128 it is carries 98% of the residual
    stream's variance). ``ActivationDataset.batches`` leaves out the same rows."""
    keep = windows.mask & ~windows.bos
    if skip_first:
        keep[:, 0] = False
    return keep


def trace_sites(model, inputs: mx.array, sites: list[str]) -> dict[str, mx.array]:
    """{site: activation} of one forward pass, stopped after the last layer any site needs."""
    from mlxterp.plugin import Hooks

    with Hooks(model, capture=list(sites), stop_after="auto") as hooks:
        _, recorded = hooks(inputs, evaluate=False)
    out = {}
    arch = model.architecture
    for site in sites:
        if is_raw(site):
            out[site] = recorded[site]
        else:
            resolved = arch.resolve(site)[0]
            out[site] = resolved.read(recorded[resolved.site])
    mx.eval(list(out.values()))
    return out


def _model_name(model) -> str | None:
    report = getattr(model, "load_report", None) or {}
    return report.get("repo") or report.get("file") or type(model.model).__name__
