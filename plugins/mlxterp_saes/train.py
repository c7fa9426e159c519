"""Training SAEs in MLX: TopK (+AuxK), BatchTopK (exported as JumpReLU), JumpReLU and ReLU+L1,
on activations traced on the fly from texts or read from an ActivationDataset; several sites
(and so several SAEs) from one forward pass.

The recipe (``../shared/research/saes-lens-heads.md`` §1b):

- inputs are scaled by one scalar ``s = sqrt(d_in) / E||x||`` measured on the first batch
  (SAELens's ``expected_average_only_in``) and ``s`` is folded into the weights on export, so
  the saved SAE reads raw activations;
- ``W_dec`` rows start as random directions (unit norm for TopK/BatchTopK, 0.1 for the others,
  as SAELens), ``W_enc = W_dec^T``, ``b_dec`` = the first batch's mean, ``b_enc = 0``;
- TopK and BatchTopK keep unit-norm decoder rows: the gradient's component along each row is
  removed before the step and the rows renormalised after it (OpenAI, BatchTopK). ReLU and
  JumpReLU leave the norms free (the L1 penalty is weighted by them) and fold them on export;
- loss = sum over d of the squared error, mean over tokens (SAELens's convention), plus
  TopK/BatchTopK: ``aux_coefficient * min(n_dead / k_aux, 1) * ||e^ - e||^2 / ||e - mean e||^2``
  with ``e = x - x^`` (detached) and ``e^`` decoded from the ``k_aux`` largest dead
  pre-activations *without* ``b_dec`` (the AuxK fix of sparsify PR #134);
  ReLU: ``l1_coefficient * sum_i f_i ||W_dec,i||``;
  JumpReLU: ``l0_coefficient * L0`` through a rectangle-kernel straight-through estimator;
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

from mlxterp_core.files import read_json, read_tensors, write_tensors_atomic, write_text_atomic
from mlxterp_core.names import is_raw
from mlxterp_core.progress import progress_bar

from .sae import SAE, SAEConfig, SAEError, topk_relu

TRAINABLE = ("topk", "batchtopk", "jumprelu", "relu")
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
        from mlxterp_analyses.plots import _finish, _pyplot

        plt = _pyplot()

        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for ax, values, label in zip(axes, (self.l0, self.fvu, self.dead), ("L0", "FVU", "dead fraction")):
            ax.plot(self.tokens, values)
            ax.set_xlabel("training tokens")
            ax.set_title(f"{label} ({self.site})")
        fig.tight_layout()
        return _finish(fig, path)


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
    encoding: str = "utf-8",
    errors: str = "strict",
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
        architecture: "topk", "batchtopk" (exported as "jumprelu"), "jumprelu" or "relu".
        d_sae: number of features (default ``expansion * d_in``).
        k: active features per token (topk, batchtopk: the mean over a batch).
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
        encoding, errors: how a corpus file is decoded (see ``mlxterp.read_documents``).

    Returns:
        the SAE, or a list of SAEs (one per site) when ``site`` is a list. Each has
        ``sae.training_log`` (:class:`TrainingLog`).
    """
    sites = [site] if isinstance(site, str) else list(site)
    if not sites:
        raise SAEError("train_sae needs at least one site.")
    if architecture == "standard":
        architecture = "relu"
    if architecture not in TRAINABLE:
        raise SAEError(f"cannot train architecture {architecture!r}; choose one of {', '.join(TRAINABLE)}.")
    if architecture in ("topk", "batchtopk") and (k is None or k <= 0):
        raise SAEError(f"{architecture} needs k > 0 (active features per token), got {k!r}.")
    for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size), ("buffer_tokens", buffer_tokens)):
        if not isinstance(value, int) or value < 1:
            raise SAEError(f"{name} must be a positive integer, got {value!r}.")
    names = [_standard(model, s) for s in sites]
    if len(set(names)) != len(names):
        raise SAEError(f"the same site is named twice in {sites}.")
    source = _source(model, names, data, context_size, forward_batch, seed, skip_first, encoding, errors)
    batches = _shuffled(source, batch_size, buffer_tokens, seed)
    steps = max(1, n_tokens // batch_size)
    dead_tokens = dead_tokens if dead_tokens is not None else max(batch_size, min(10_000_000, n_tokens // 10))
    settings = dict(architecture=architecture, d_sae=d_sae, k=k, expansion=expansion, lr=lr, l1=l1_coefficient,
                    l0=l0_coefficient, aux=aux_coefficient, k_aux=k_aux, dead_tokens=dead_tokens, steps=steps,
                    bandwidth=jumprelu_bandwidth, init_threshold=jumprelu_init_threshold, seed=seed,
                    batch_size=batch_size, context_size=context_size, skip_first=skip_first)
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
    def __init__(self, site: str, first: mx.array, settings: dict[str, Any]):
        self.site = site
        self.settings = settings
        self.arch = settings["architecture"]
        x = first.astype(mx.float32)
        self.d_in = x.shape[-1]
        self.d_sae = settings["d_sae"] or settings["expansion"] * self.d_in
        self.k = settings["k"]
        self.k_aux = settings["k_aux"] or max(1, self.d_in // 2)
        self.scale = float(math.sqrt(self.d_in) / max(mx.linalg.norm(x, axis=-1).mean().item(), 1e-12))
        key = mx.random.key(settings["seed"])
        direction = mx.random.normal((self.d_sae, self.d_in), key=key)
        norm = 1.0 if self.arch in ("topk", "batchtopk") else 0.1
        W_dec = direction / mx.linalg.norm(direction, axis=-1, keepdims=True) * norm
        self.params = {
            "W_enc": W_dec.T,
            "b_enc": mx.zeros((self.d_sae,)),
            "W_dec": W_dec,
            "b_dec": (x * self.scale).mean(axis=0),
        }
        if self.arch == "jumprelu":
            self.params["log_threshold"] = mx.full((self.d_sae,), math.log(settings["init_threshold"]))
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
        self.threshold = mx.array(0.0)  # batchtopk's running inference threshold
        self.seen = 0
        self.history: dict[str, list] = {"steps": [], "tokens": [], "l0": [], "fvu": [], "dead": []}
        self._last: tuple[mx.array, ...] | None = None
        self._grad = mx.value_and_grad(self._loss)

    # the loss, in the scaled space
    def _encode(self, params, x):
        h = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if self.arch == "topk":
            return h, topk_relu(h, int(self.k))
        if self.arch == "batchtopk":
            return h, _batch_topk(h, self.k)
        if self.arch == "jumprelu":
            return h, _jumprelu(h, mx.exp(params["log_threshold"]), self.settings["bandwidth"])
        return h, mx.maximum(h, 0)

    def _loss(self, params, x, dead):
        h, f = self._encode(params, x)
        recons = f @ params["W_dec"] + params["b_dec"]
        error = x - recons
        mse = (error**2).sum(axis=-1).mean()
        loss = mse
        if self.arch in ("topk", "batchtopk"):
            e = mx.stop_gradient(error)
            dead_h = mx.where(dead, h, -mx.inf)
            f_aux = topk_relu(dead_h, min(self.k_aux, self.d_sae))
            e_hat = f_aux @ params["W_dec"]  # no b_dec: the residual has none
            scale = mx.minimum(dead.sum() / self.k_aux, 1.0)
            norm = ((e - e.mean(axis=0)) ** 2).sum(axis=-1).mean() + 1e-12
            loss = loss + self.settings["aux"] * scale * ((e_hat - e) ** 2).sum(axis=-1).mean() / norm
        elif self.arch == "relu":
            norms = mx.linalg.norm(params["W_dec"], axis=-1)
            loss = loss + self.settings["l1"] * (f * norms).sum(axis=-1).mean()
        elif self.arch == "jumprelu":
            l0 = _step(h, mx.exp(params["log_threshold"]), self.settings["bandwidth"]).sum(axis=-1).mean()
            loss = loss + self.settings["l0"] * l0
        return loss, (f, mse, x)

    def step(self, x: mx.array) -> None:
        x = x.astype(mx.float32) * self.scale
        dead = self.since_fired > self.settings["dead_tokens"]
        (loss, (f, mse, _)), grads = self._grad(self.params, x, dead)
        if self.arch in ("topk", "batchtopk"):
            W = self.params["W_dec"]
            g = grads["W_dec"]
            grads["W_dec"] = g - (g * W).sum(axis=-1, keepdims=True) * W
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        self.params = self.optimizer.apply_gradients(grads, self.params)
        if self.arch in ("topk", "batchtopk"):
            W = self.params["W_dec"]
            self.params["W_dec"] = W / mx.maximum(mx.linalg.norm(W, axis=-1, keepdims=True), 1e-8)
        fired = (f > 0).any(axis=0)
        n = x.shape[0]
        self.since_fired = mx.where(fired, 0, self.since_fired + n)
        if self.arch == "batchtopk":
            positive = mx.where(f > 0, f, mx.inf).min()
            self.threshold = mx.where(self.seen == 0, positive, 0.99 * self.threshold + 0.01 * positive)
        if self.seen >= self.settings["steps"] * n * 3 // 4:  # densities over the last quarter
            self.fired_count = self.fired_count + (f > 0).sum(axis=0)
            self.counted_tokens += n
        self.seen += n
        variance = ((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()
        self._last = ((f > 0).sum(axis=-1).mean(), mse / variance)
        mx.eval(self.params, self.optimizer.state, self.since_fired, self.threshold, self.fired_count, *self._last)

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
        return TrainingLog(site=self.site, architecture=self.arch, n_tokens=self.seen, seconds=seconds,
                           tokens_per_second=tokens / max(seconds, 1e-9), input_scale=self.scale, **self.history)

    def export(self, model) -> SAE:
        """The trained SAE for raw activations: the input scale folded in; BatchTopK as JumpReLU;
        ReLU and JumpReLU with unit-norm decoder rows."""
        p, s = self.params, self.scale
        weights = {"W_enc": p["W_enc"] * s, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / s, "b_dec": p["b_dec"] / s}
        arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(self.arch, self.arch)
        if self.arch == "jumprelu":
            weights["threshold"] = mx.exp(p["log_threshold"])
        elif self.arch == "batchtopk":
            weights["threshold"] = mx.full((self.d_sae,), self.threshold.item())
        from .formats import _tl

        cfg = SAEConfig(
            architecture=arch, d_in=self.d_in, d_sae=self.d_sae, k=int(self.k) if arch == "topk" else None,
            site=self.site, hook_name=None if is_raw(self.site) else _tl(self.site),
            model_name=_model_name(model), context_size=self.settings.get("context_size"),
            metadata={"training_architecture": self.arch, "training_tokens": self.seen,
                      "exclude_special_tokens": True, "mlxterp_trained": True},
        )
        sae = SAE(cfg, weights)
        if arch in ("standard", "jumprelu"):
            sae.fold_W_dec_norm()
        return sae

    # checkpoints
    def state(self) -> dict[str, mx.array]:
        tensors = {f"params.{k}": v for k, v in self.params.items()}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        tensors.update(since_fired=self.since_fired, fired_count=self.fired_count, threshold=self.threshold)
        return tensors

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        self.params = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
        state = [(k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")]
        self.optimizer.state = tree_unflatten(state)
        self.since_fired, self.fired_count, self.threshold = tensors["since_fired"], tensors["fired_count"], tensors["threshold"]
        self.scale, self.seen, self.counted_tokens = info["scale"], info["seen"], info["counted_tokens"]
        self.history = info["history"]


def _checkpoint(trainers: list[_Trainer], folder: Path, settings, step: int, position: int) -> None:
    """One folder per site: tensors first, then the JSON state (renamed into place last)."""
    for trainer in trainers:
        where = folder / _safe(trainer.site)
        where.mkdir(parents=True, exist_ok=True)
        # the JSON state, written last, marks the checkpoint complete: remove it before the
        # tensors change, so that a failed write (a full disk) never leaves it beside newer ones
        (where / CHECKPOINT_STATE).unlink(missing_ok=True)
        write_tensors_atomic(where / CHECKPOINT_TENSORS, trainer.state())
        info = {"step": step, "source_position": position, "settings": settings, "scale": trainer.scale,
                "seen": trainer.seen, "counted_tokens": trainer.counted_tokens, "history": trainer.history}
        write_text_atomic(where / CHECKPOINT_STATE, json.dumps(info))


_RESTART = "Delete the checkpoint folder to start over."


def _peek(folder: Path, sites: list[str], settings) -> dict[str, Any] | None:
    """The state of the checkpoints in ``folder`` (one per site, all at the same step), or None."""
    found = []
    for site in sites:
        where = folder / _safe(site) / CHECKPOINT_STATE
        if not where.is_file():
            found.append(None)
            continue
        info = read_json(where, "an SAE training checkpoint", error=SAEError, advice=_RESTART)
        if not isinstance(info.get("settings"), dict) or not isinstance(info.get("step"), int):
            raise SAEError(f"{where} is not an SAE training checkpoint (no settings or step). {_RESTART}")
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
        info = read_json(where / CHECKPOINT_STATE, "an SAE training checkpoint", error=SAEError, advice=_RESTART)
        tensors = read_tensors(where / CHECKPOINT_TENSORS, "an SAE training checkpoint", error=SAEError, advice=_RESTART)
        try:
            trainer.load_state(tensors, info)
        except KeyError as e:
            raise SAEError(f"the checkpoint in {where} lacks {e}. {_RESTART}") from None


def _safe(site: str) -> str:
    return site.replace("/", "_")


# -- activation functions with straight-through gradients ----------------------------------------


def _batch_topk(h: mx.array, k: float) -> mx.array:
    """ReLU(h) keeping the k * N largest values of the whole (N, d_sae) batch."""
    relu = mx.maximum(h, 0)
    flat = relu.reshape(-1)
    keep = max(1, min(int(round(k * h.shape[0])), flat.size))
    index = mx.stop_gradient(mx.argpartition(-flat, kth=keep - 1)[:keep])
    mask = mx.zeros(flat.shape).at[index].add(1.0) > 0
    return mx.where(mask.reshape(h.shape), relu, 0.0)


def _rectangle(u: mx.array) -> mx.array:
    return ((u > -0.5) & (u < 0.5)).astype(mx.float32)


def _jumprelu(h: mx.array, threshold: mx.array, bandwidth: float) -> mx.array:
    @mx.custom_function
    def jump(h, threshold):
        return mx.where(h > threshold, h, 0.0)

    @jump.vjp
    def jump_vjp(primals, cotangent, output):
        h, threshold = primals
        dh = mx.where(h > threshold, cotangent, 0.0)
        dt = -(threshold / bandwidth) * _rectangle((h - threshold) / bandwidth) * cotangent
        return dh, dt.reshape(-1, dt.shape[-1]).sum(axis=0)

    return jump(h, threshold)


def _step(h: mx.array, threshold: mx.array, bandwidth: float) -> mx.array:
    @mx.custom_function
    def heaviside(h, threshold):
        return (h > threshold).astype(mx.float32)

    @heaviside.vjp
    def heaviside_vjp(primals, cotangent, output):
        h, threshold = primals
        dt = -(1.0 / bandwidth) * _rectangle((h - threshold) / bandwidth) * cotangent
        return mx.zeros_like(h), dt.reshape(-1, dt.shape[-1]).sum(axis=0)

    return heaviside(h, threshold)


# -- data -----------------------------------------------------------------------------------------


def _standard(model, site: str) -> str:
    if is_raw(site):
        return site
    found = model.architecture_or_raise(site).resolve(site)
    if len(found) != 1:
        raise SAEError(f"train one SAE per site: {site!r} names {len(found)} sites (list them instead).")
    return found[0].name


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
    def __init__(self, model, sites, corpus, context_size, forward_batch, skip_first=True, encoding="utf-8", errors="strict"):
        from mlxterp_core.corpus import read_documents

        self.model, self.sites, self.decoding = model, sites, {"encoding": encoding, "errors": errors}
        self.corpus = corpus if isinstance(corpus, (str, os.PathLike)) else list(read_documents(corpus))
        self.context_size, self.forward_batch, self.skip_first = context_size, forward_batch, skip_first
        self._skip = 0

    def chunks(self):
        from mlxterp_core.corpus import token_windows

        while True:
            read = skipped = 0
            for windows in token_windows(self.model, self.corpus, self.context_size, batch_size=self.forward_batch, **self.decoding):
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


def _source(model, sites, data, context_size, forward_batch, seed, skip_first=True, encoding="utf-8", errors="strict") -> _Source:
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
        for s in sites:
            shape = getattr(data[s], "shape", None)
            if not shape or not shape[-1] or not np.prod(shape):
                raise SAEError(f"the activations given for {s} have shape {shape}: give an array of (N, d) rows, N >= 1.")
        arrays = {s: mx.array(data[s]).reshape(-1, data[s].shape[-1]) for s in sites}
        return _ArraySource(arrays, 8192)
    if isinstance(data, str) and not os.path.exists(data):
        raise SAEError(f"data={data[:60]!r} is not a file or folder: pass texts as a list of strings.")
    if model.tokenizer is None:
        raise SAEError("training on texts needs a model with a tokenizer.")
    return _TextSource(model, sites, data, context_size, forward_batch, skip_first, encoding, errors)


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
    from mlxterp_core.caching import run_until_stopped, stop_before, stop_forward
    from mlxterp_core.trace import Hooks

    stop = stop_before(model, [_layer(site) for site in sites])
    with Hooks(model, {stop: stop_forward} if stop else None, capture=list(sites)) as hooks:
        recorded = run_until_stopped(hooks, inputs)
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


def _layer(site: str) -> int | None:
    """The block a standard name ``layers.i....`` is computed in; None for any other site
    (model-level or raw: the whole forward runs)."""
    import re

    match = re.match(r"^layers\.(\d+)\.", site)
    return None if match is None else int(match.group(1))


def _model_name(model) -> str | None:
    report = getattr(model, "load_report", None) or {}
    return report.get("repo") or report.get("file") or type(model.model).__name__
