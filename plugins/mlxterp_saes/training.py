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
- rows come from the activation stream (``mlxterp.plugin``): traced from texts (several sites
  from one forward, stopped after the last block needed), or read from an ActivationDataset,
  under the stream's one policy (BOS, padding and the first position of each window, an
  attention sink, are never trained on), shuffled in one mixing buffer of ``buffer_tokens``
  tokens, half of which is kept to mix with the next fill (SAELens's);
- the loop, checkpoints and resume are the core's (``train_steps``): the checkpoint holds the
  SAEs, Adam's state, the buffer and the data position, so a resumed run equals an
  uninterrupted one bitwise.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp.plugin import ActivationDataset, ArrayRows, Batches, DatasetRows, Display, RowSource, TextRows, is_raw, train_steps

from .architectures import get_architecture
from .architectures.base import after_step as base_after_step
from .architectures.base import check_option
from .sae import SAE, SAEConfig, SAEError, hook_name_of, site_width



@attrs.frozen(repr=False)
class TrainingLog(Display):
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

    def _summary(self) -> str:
        head = (f"{self.architecture} at {self.site}, {self.n_tokens} tokens in {self.seconds:.3g} s "
                f"({self.tokens_per_second:,.0f} tokens/s), {len(self.steps)} logged steps")
        if not self.steps:
            return head
        return f"{head}; at step {self.steps[-1]}: L0 {self.l0[-1]:.3g}, FVU {self.fvu[-1]:.3g}, dead {self.dead[-1]:.1%}"

    def plot(self, path=None):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()

        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        marker = "o" if len(self.tokens) <= 30 else None  # a short run's few points, each visible
        for ax, values, label in zip(axes, (self.l0, self.fvu, self.dead), ("L0", "FVU", "dead fraction")):
            ax.plot(self.tokens, values, marker=marker)
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
        architecture: "topk", "batchtopk" (exported as "jumprelu"), "jumprelu" or "relu"
            ("standard"), or one registered with ``register_architecture``.
        d_sae: number of features (default ``expansion * d_in``).
        k: active features per token, in [1, d_sae] (topk, batchtopk: the mean over a batch).
        n_tokens: training tokens (BOS, padding and window starts excluded).
        batch_size: tokens per optimiser step.
        lr: Adam's learning rate (default ``2e-4 / sqrt(d_sae / 2**14)``, sparsify's rule).
        l1_coefficient: the sparsity penalty of "relu".
        l0_coefficient: the sparsity penalty of "jumprelu".
        aux_coefficient: the weight of the AuxK loss of topk/batchtopk.
        k_aux: dead latents the AuxK loss decodes (default d_in // 2).
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
        encoding: the text encoding of a corpus file (see ``mlxterp.read_documents``).
        errors: what to do with bytes that do not decode ("strict": a CorpusError).

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
    _check_arrays(names, data)
    steps = max(1, n_tokens // batch_size)
    dead_tokens = dead_tokens if dead_tokens is not None else max(batch_size, min(10_000_000, n_tokens // 10))
    settings = dict(architecture=arch.training_name, d_sae=d_sae, k=k, expansion=expansion, lr=lr, l1=l1_coefficient,
                    l0=l0_coefficient, aux=aux_coefficient, k_aux=k_aux, dead_tokens=dead_tokens, steps=steps,
                    bandwidth=jumprelu_bandwidth, init_threshold=jumprelu_init_threshold, seed=seed,
                    batch_size=batch_size, context_size=context_size, skip_first=skip_first)
    sizes = [d_sae] if d_sae is not None else sorted({expansion * _site_width(model, n, data) for n in names})
    for size in sizes:  # d_sae of each SAE
        arch.check_options(settings, size)
    source = _source(model, names, data, context_size, forward_batch, seed, skip_first, encoding, errors)
    batches = _batches(source, batch_size, buffer_tokens, seed)
    group = _Group(names, settings, log_every)
    run = train_steps(group, batches, steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      settings=settings, progress=progress, desc="train_sae", what="train_sae", error=SAEError)
    group.finish()
    saes = []
    for trainer in group.trainers:
        sae = trainer.export(model)
        log = trainer.training_log(run.seconds, run.steps * batch_size)
        object.__setattr__(sae, "training_log", log)
        if save_dir is not None:
            sae.save(Path(save_dir) / trainer.site, sparsity=trainer.log_sparsity())
        saes.append(sae)
    return saes if not isinstance(site, str) else saes[0]


class _Group:
    """The SAEs of one run, trained on the same batches (one per site): the trainer the core's
    loop (``train_steps``) runs, with the logging every ``log_every`` steps."""

    def __init__(self, sites: list[str], settings: dict[str, Any], log_every: int):
        self.sites, self.settings, self.log_every = sites, settings, log_every
        self.trainers: list[_Trainer] = []
        self.step_count = 0
        self._status = ""

    def start(self, first: dict[str, mx.array] | None) -> None:
        if first is not None:
            self.trainers = [_Trainer(site, first[site], self.settings) for site in self.sites]

    def step(self, batch: dict[str, mx.array]) -> None:
        for trainer in self.trainers:
            trainer.step(batch[trainer.site])
        self.step_count += 1
        # the first and the last step too, so that even a short run logs a curve (two points)
        if self.step_count in (1, self.settings["steps"]) or self.step_count % self.log_every == 0:
            self._log()

    def _log(self) -> None:
        stats = [t.log(self.step_count) for t in self.trainers]
        self._status = " ".join(f"L0={s[0]:.1f} FVU={s[1]:.3f} dead={s[2]:.1%}" for s in stats[:2])

    def finish(self) -> None:
        """Log the last step run, where the data ran out before a logged step."""
        trainer = self.trainers[0] if self.trainers else None  # they step together
        if trainer is not None and trainer.stepped and trainer.history["steps"][-1:] != [self.step_count]:
            self._log()

    def status(self) -> str:
        return self._status

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors, infos = {}, []
        for i, trainer in enumerate(self.trainers):
            part, info = trainer.state()
            tensors.update({f"{i}.{k}": v for k, v in part.items()})
            infos.append(info)
        return tensors, {"sites": self.sites, "steps": self.step_count, "status": self._status, "trainers": infos}

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        if not self.trainers:  # a finished run: nothing to start from but the checkpoint
            first = {site: mx.zeros((1, tensors[f"{i}.params.W_dec"].shape[-1])) for i, site in enumerate(self.sites)}
            self.start(first)
        for i, trainer in enumerate(self.trainers):
            trainer.load_state({k[len(f"{i}."):]: v for k, v in tensors.items() if k.startswith(f"{i}.")}, info["trainers"][i])
        self.step_count, self._status = info["steps"], info["status"]


# -- the trainer of one SAE --------------------------------------------------------------------


@mx.custom_function
def _pre_acts(x, W_enc, b_enc, b_dec):
    """(B, d_in) -> (B, d_sae): ``h = (x - b_dec) @ W_enc + b_enc``."""
    return (x - b_dec) @ W_enc + b_enc


@_pre_acts.vjp
def _pre_acts_vjp(primals, cotangent, output):
    # b_dec's gradient is -W_enc @ (the batch's sum of dh), a (d_in, d_sae) x (d_sae,) product;
    # autodiff would reach it through the (B, d_in) gradient of x - b_dec, a product as large as
    # the encoder. x is data: its cotangent is never used.
    x, W_enc, b_enc, b_dec = primals
    total = cotangent.sum(axis=0)
    return mx.zeros_like(x), (x - b_dec).T @ cotangent, total, -(W_enc @ total)



class _Trainer:
    """One SAE in training: the shared loop's state (parameters, Adam, dead-latent counts,
    densities, history); its architecture's rules in ``self.arch``.

    A step is one compiled function (``mx.compile``: loss, gradients, clipping, Adam and the
    decoder's unit norm, traced once per batch shape and AuxK plan) and a few (d_sae,) updates
    after it; it is evaluated asynchronously, with at most one step waiting behind the one the
    device runs, so that building a step overlaps computing the one before."""

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
        self.aux_plan: tuple[int, bool] | None = (self.d_sae, True)  # the plain AuxK pass (see topk.loss)
        self._updates: dict[Any, Any] = {}  # the compiled step of each AuxK plan
        self._features_needed = self.arch.after_step is not base_after_step
        self._waiting: list | None = None
        self._n_dead: mx.array | None = None  # dead latents after the last step (auxk architectures)

    # the loss, in the scaled space
    def _loss(self, params, x, dead):
        h = _pre_acts(x, params["W_enc"], params["b_enc"], params["b_dec"])
        f = self.arch.train_activation(self, params, h)
        recons = f @ params["W_dec"] + params["b_dec"]
        error = x - recons
        mse = (error**2).sum(axis=-1).mean()
        loss = mse
        extra = self.arch.loss(self, params, h, f, error, dead)
        if extra is not None:
            loss = loss + extra
        return loss, (f, mse, x)

    def _update(self, params, state, buffers, x, since_fired):
        """One optimiser step, traced by ``mx.compile``: the new parameters and Adam state, the
        number of tokens each latent fired on (d_sae,), the FVU, and the features (B, d_sae)
        when the architecture's ``after_step`` reads them."""
        x = x.astype(mx.float32) * self.scale
        dead = since_fired > self.settings["dead_tokens"]
        self.buffers = buffers  # what the architecture's rules read while this is traced
        (_, (f, mse, _)), grads = mx.value_and_grad(self._loss)(params, x, dead)
        if self.arch.unit_norm_decoder:  # no step along a row: it would only change its norm
            W = params["W_dec"]
            g = grads["W_dec"]
            grads["W_dec"] = g - (g * W).sum(axis=-1, keepdims=True) * W
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        self.optimizer.state = state
        params = self.optimizer.apply_gradients(grads, params)
        if self.arch.unit_norm_decoder:
            W = params["W_dec"]
            params["W_dec"] = W / mx.maximum(mx.linalg.norm(W, axis=-1, keepdims=True), 1e-8)
        counts = (f > 0).sum(axis=0)
        variance = ((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()
        return (params, self.optimizer.state, counts, mse / variance) + ((f,) if self._features_needed else ())

    def _compiled(self, plan):
        """The step compiled for one AuxK plan: a function of its own (mx.compile keeps one
        cache per function object), which sets the plan its trace reads. It reaches the trainer
        through a weak reference: kept in ``self._updates``, a strong one would be a reference
        cycle holding the SAE and its Adam state after training until Python's cyclic GC ran."""
        trainer = weakref.ref(self)

        def update(params, state, buffers, x, since_fired):
            me = trainer()
            me.aux_plan = plan
            return me._update(params, state, buffers, x, since_fired)

        return mx.compile(update)

    def step(self, x: mx.array) -> None:
        self.aux_plan = self._plan_aux() if self.arch.auxk else None
        update = self._updates.get(self.aux_plan)
        if update is None:
            update = self._updates[self.aux_plan] = self._compiled(self.aux_plan)
        buffers = self.buffers
        params, state, counts, fvu, *f = update(self.params, self.optimizer.state, buffers, x, self.since_fired)
        self.params, self.optimizer.state, self.buffers = params, state, buffers
        n = x.shape[0]
        self.since_fired = mx.where(counts > 0, 0, self.since_fired + n)
        self.buffers = self.arch.after_step(self, f[0] if f else None)
        if self.seen >= self.settings["steps"] * n * 3 // 4:  # densities over the last quarter
            self.fired_count = self.fired_count + counts
            self.counted_tokens += n
        self.seen += n
        self._last = (counts.sum() / n, fvu)  # L0, FVU
        if self.arch.auxk:  # queued first: the next step's plan waits for it, not for this whole step
            self._n_dead = (self.since_fired > self.settings["dead_tokens"]).sum()
            mx.async_eval(self._n_dead)
        outputs = [self.since_fired, self.params, self.optimizer.state, self.buffers, self.fired_count, *self._last]
        mx.async_eval(outputs)
        if self._waiting is not None:
            mx.eval(self._waiting)
        self._waiting = outputs

    def _plan_aux(self) -> tuple[int, bool] | None:
        """This step's AuxK plan (``topk.loss``): None when no latent is dead, else the columns
        the dead ones fit in (a power of two, at least 32, at most d_sae) and whether more of
        them than ``k_aux`` compete. No latent can be dead while fewer tokens than
        ``dead_tokens`` have been seen; after that, counting them waits for the last step's
        counts (as SAELens's count does)."""
        threshold = self.settings["dead_tokens"]
        if self.seen <= threshold:
            return None
        counted = self._n_dead if self._n_dead is not None else (self.since_fired > threshold).sum()
        n_dead = int(counted.item())
        if n_dead == 0:
            return None
        k_aux = self.settings["k_aux"] or max(1, self.d_in // 2)
        return min(self.d_sae, max(32, 1 << (n_dead - 1).bit_length())), n_dead > k_aux

    def log(self, step: int) -> tuple[float, float, float]:
        l0, fvu = (v.item() for v in self._last)
        dead = (self.since_fired > self.settings["dead_tokens"]).astype(mx.float32).mean().item()
        for key, value in zip(("steps", "tokens", "l0", "fvu", "dead"), (step, self.seen, l0, fvu, dead)):
            self.history[key].append(value)
        return l0, fvu, dead

    @property
    def stepped(self) -> bool:
        """Whether this call stepped (a finished run resumed from its checkpoint has not)."""
        return self._last is not None

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
    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors = {f"params.{k}": v for k, v in self.params.items()}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        tensors.update(since_fired=self.since_fired, fired_count=self.fired_count, **self.buffers)
        info = {"scale": self.scale, "seen": self.seen, "counted_tokens": self.counted_tokens, "history": self.history}
        return tensors, info

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        # in the order of a fresh run's trees: clip_grad_norm sums over the gradient tree in
        # its order, and a file's (sorted) order would round that sum differently
        self.params = {k: tensors[f"params.{k}"] for k in self.params}
        order = [k for k, _ in tree_flatten(self.optimizer.state)]
        self.optimizer.state = tree_unflatten([(k, tensors[f"optimizer.{k}"]) for k in order])
        self.since_fired, self.fired_count = tensors["since_fired"], tensors["fired_count"]
        self._n_dead = None
        self.buffers = {k: tensors[k] for k in self.buffers}
        self.scale, self.seen, self.counted_tokens = info["scale"], info["seen"], info["counted_tokens"]
        self.history = info["history"]


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
    return site_width(model, site)


def _check_arrays(sites: list[str], data: Any) -> None:
    """Activations given as arrays (one, or a dict site -> array) must hold (N, d) rows."""
    arrays = {sites[0]: data} if isinstance(data, (mx.array, np.ndarray)) else data if isinstance(data, dict) else {}
    for site, value in arrays.items():
        shape = getattr(value, "shape", None)
        if not shape or not shape[-1] or not np.prod(shape):
            raise SAEError(f"the activations given for {site} have shape {shape}: give an array of (N, d) rows, N >= 1.")


def _source(model, sites: list[str], data: Any, context_size: int, forward_batch: int, seed: int,
            skip_first: bool = True, encoding: str = "utf-8", errors: str = "strict") -> RowSource:
    """The training rows of ``data`` (see train_sae) as a source of the activation stream."""
    if isinstance(data, ActivationDataset):
        return DatasetRows(data, sites, rng=np.random.default_rng(seed), repeat=True, skip_first=skip_first)
    if hasattr(data, "batches"):
        return _ForeignBatches(data, sites, seed)
    if isinstance(data, (mx.array, np.ndarray)):
        if len(sites) != 1:
            raise SAEError("one activation array trains one site: pass {site: array} for several.")
        data = {sites[0]: data}
    if isinstance(data, dict):
        missing = [s for s in sites if s not in data]
        if missing:
            raise SAEError(f"no activations given for {', '.join(missing)}.")
        return ArrayRows({s: mx.array(data[s]).reshape(-1, data[s].shape[-1]) for s in sites})
    if isinstance(data, str) and not os.path.exists(data):
        raise SAEError(f"data={data[:60]!r} is not a file or folder: pass texts as a list of strings.")
    if model.tokenizer is None:
        raise SAEError("training on texts needs a model with a tokenizer.")
    return TextRows(model, data, sites, context_size=context_size, batch_size=forward_batch, skip_first=skip_first,
                    encoding=encoding, errors=errors)


def _batches(source: RowSource, batch_size: int, buffer_tokens: int, seed: int) -> Batches:
    """Training batches of ``source``, mixed in one buffer of ``buffer_tokens`` rows (a
    dataset's shard order and the buffer share one generator); another library's batches are
    already shuffled and only cut to size."""
    if isinstance(source, _ForeignBatches):
        return Batches(source, batch_size, shuffle=False)
    rng = source.rng if isinstance(source, DatasetRows) else np.random.default_rng(seed)
    return Batches(source, batch_size, buffer_rows=buffer_tokens, rng=rng)


class _ForeignBatches(RowSource):
    """Rows of an object with ActivationDataset's ``batches(site, batch_size, shuffle, seed)``
    (already shuffled: the trainer only cuts them into its batches), one pass per seed."""

    def __init__(self, dataset, sites, seed):
        super().__init__(repeat=True)
        self.dataset, self.sites, self.seed = dataset, sites, seed
        self.read = 0

    @property
    def position(self) -> dict[str, Any]:
        return {"batches": self.read}

    def __iter__(self):
        skip = (self._restored or {}).get("batches", 0)
        self.read, passes = 0, 0
        while True:
            streams = [self.dataset.batches(s, 4096, shuffle=True, seed=self.seed + passes) for s in self.sites]
            empty = True
            for rows in zip(*streams):
                empty = False
                self.read += 1
                if self.read > skip:
                    yield dict(zip(self.sites, rows))
            if empty:
                raise SAEError(f"the dataset {self.dataset!r} yields no rows for {self.sites}.")
            passes += 1


def _model_name(model) -> str | None:
    """cfg.json's ``metadata.model_name``: the model's name as loaded (``model.architecture
    .model_name``: a Hub repo id, a file's or folder's own name), never a path, which would put
    one machine's folders into files that are shared."""
    arch = model.architecture
    return (arch.model_name if arch is not None else None) or type(model.model).__name__
