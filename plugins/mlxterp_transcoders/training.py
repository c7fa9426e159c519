"""Training transcoders in MLX: a set of per-layer transcoders (PLTs) or a cross-layer
transcoder (CLT) over any layers, every layer's MLP input and output read from one forward pass.

The objective (``../shared/research/circuit-tracing.md`` §5), in the training space (below):

- reconstruction: ``sum_m E_t ||y^_m - y_m||^2`` (summed over d, averaged over tokens, summed over
  the target layers m), with ``y^_m = sum_{l in sources(m)} a_l @ W_dec[l -> m] + b_dec_m [+ x_m @
  W_skip_m^T]``; a PLT's sources(m) is {m}, a CLT's every covered layer up to m;
- JumpReLU and ReLU: ``lambda * sum_l sum_i tanh(c * ||W_dec,i^l|| * a_i^l)``, ``||W_dec,i^l||``
  the norm of feature i's decoders concatenated over every layer it writes (Anthropic's recipe as
  CLT-Forge and crosslayer-coding implement it), lambda ramped linearly from 0 over the first
  ``sparsity_warmup`` of the steps; ``sparsity="l0"`` uses JumpReLU's L0 instead (Gemma Scope's);
  plus the pre-activation term ``pre_act_coefficient * sum_i ReLU(theta_i - h_i) * ||W_dec,i||``
  (theta = 0 for ReLU) that keeps features from dying; JumpReLU's threshold learns through the
  straight-through estimators of :mod:`mlxterp_saes` (``jumprelu_ste``, ``heaviside_ste``);
- TopK and BatchTopK: k features per token and layer (BatchTopK: k * N over each layer's batch of
  N tokens, exported as JumpReLU with its running threshold, as ``train_sae`` does), decoders of
  unit norm over the layers they write, and AuxK: the dead features' top ``k_aux`` decode the
  residual error of every target they write, ``aux_coefficient * sum_m min(n_dead_m / k_aux, 1) *
  ||e^_m - e_m||^2 / ||e_m - mean e_m||^2`` (n_dead_m: dead features per source of m, averaged);
- Adam, gradient norm clipped at 1 (per layer for a PLT set, which is then exactly independent
  transcoders; over everything for a CLT), warm-up over the first 5% of steps, decay to lr/10 over
  the last 20% (train_sae's schedule); a feature is dead after ``dead_tokens`` tokens unfired.

Scaling. Inputs and targets are scaled per layer by one scalar each, ``s_x[l] = sqrt(d) /
E||x_l||`` and ``s_y[m] = sqrt(d) / E||y_m||``, measured on the first batch, so every layer's loss
has the same size. The export folds them in, so the transcoders read raw activations and predict
raw MLP outputs (``y^_m(raw) = y^_m(train) / s_y[m]``):

- ``W_enc[l] <- W_enc[l] * s_x[l]``; ``b_enc`` and thresholds unchanged (pre-activations equal);
- ``W_dec[l -> m] <- W_dec[l -> m] / s_y[m]`` for every target m, the CLT's cross-layer decoders
  each by its own target's scale;
- ``b_dec[m] <- b_dec[m] / s_y[m]``;
- ``W_skip[m] <- W_skip[m] * s_x[m] / s_y[m]`` (transposed for a CLT, whose skip circuit-tracer
  applies as ``x @ W_skip``).

Memory. :func:`training_memory` is what a run holds: parameters, Adam's two moments and the
gradients (4 bytes each), one batch's activations (inputs and targets, pre-activations,
features, reconstructions, errors and their gradients) and the mixing buffer's rows (2 sites a
layer); ``train_transcoders`` refuses before it runs when that exceeds ``memory_budget``.

Rows come from the activation stream (``mlxterp.plugin``: texts traced on the fly, every site
from one forward stopped after the last layer needed, or an ActivationDataset), under its one
row policy, through one mixing buffer; the loop, checkpoints and bitwise resume are the core's
``train_steps``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp.plugin import ActivationDataset, ArrayRows, Batches, DatasetRows, Display, TextRows, options, train_steps

from .transcoders import INPUT_SITES, TranscoderError, Transcoders

KINDS = ("plt", "clt")
ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")
SPARSITY = ("tanh", "l0")
GiB = 2**30


@attrs.frozen(repr=False)
class TranscoderTrainingLog(Display):
    """What a training run did: per logged step, the step, tokens seen, L0 and FVU (fraction of
    variance unexplained on the training batch) averaged over layers, the dead fraction of all
    features and the sparsity coefficient in effect; the last logged step's L0 and FVU per layer;
    the scales measured on the first batch; the speed; and the memory the run was estimated to
    need before it started (:func:`training_memory`, bytes)."""

    kind: str
    activation: str
    layers: list[int]
    steps: list[int]
    tokens: list[int]
    l0: list[float]
    fvu: list[float]
    dead: list[float]
    sparsity_coefficient: list[float]
    layer_l0: list[float]
    layer_fvu: list[float]
    input_scales: list[float]
    target_scales: list[float]
    n_tokens: int
    seconds: float
    tokens_per_second: float
    memory_estimate: dict[str, int]  # training_memory's figures, in bytes

    def _summary(self) -> str:
        head = (f"{self.kind} {self.activation}, {len(self.layers)} layers, {self.n_tokens:,} tokens in "
                f"{self.seconds:.3g} s ({self.tokens_per_second:,.0f} tokens/s)")
        if not self.steps:
            return head
        return (f"{head}; at step {self.steps[-1]}: L0 {self.l0[-1]:.3g} per layer, FVU {self.fvu[-1]:.3g}, "
                f"dead {self.dead[-1]:.1%}")

    def plot(self, path=None):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(14, 3))
        marker = "o" if len(self.tokens) <= 30 else None
        for ax, values, label in zip(axes[:3], (self.l0, self.fvu, self.dead),
                                     ("L0 per layer (mean)", "FVU (mean over layers)", "dead fraction")):
            ax.plot(self.tokens, values, marker=marker)
            ax.set(xlabel="training tokens", title=label)
        axes[3].plot(self.layers, self.layer_fvu, marker="o")
        axes[3].set(xlabel="layer", title="FVU per layer (last step)")
        fig.suptitle(f"{self.kind} {self.activation} training")
        fig.tight_layout()
        return finish(fig, path)


def train_transcoders(
    model,
    data: Any,
    kind: str = "plt",
    layers: Sequence[int] | None = None,
    d_features: int | None = None,
    activation: str = "jumprelu",
    skip: bool = False,
    *,
    reads: str = "ln2",
    expansion: int = 4,
    k: float = 32,
    n_tokens: int = 1_000_000,
    batch_size: int = 1024,
    lr: float | None = None,
    sparsity: str = "tanh",
    sparsity_coefficient: float = 2.0,
    tanh_scale: float = 4.0,
    sparsity_warmup: float = 0.5,
    pre_act_coefficient: float = 3e-6,
    aux_coefficient: float = 1 / 32,
    k_aux: int | None = None,
    dead_tokens: int | None = None,
    jumprelu_bandwidth: float = 0.05,
    jumprelu_init_threshold: float = 0.03,
    context_size: int = 128,
    forward_batch: int = 8,
    buffer_tokens: int = 8192,
    skip_first: bool = True,
    seed: int = 0,
    memory_budget: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    save_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log_every: int = 10,
) -> Transcoders:
    """Train per-layer transcoders (``kind="plt"``) or a cross-layer transcoder (``"clt"``) on
    the MLPs of ``layers`` and return them (:class:`Transcoders`, reading raw activations).

    Args:
        model: an InterpretableModel whose family has ``layers[i].ln2`` (or ``.resid_mid``) and
            ``layers[i].mlp``.
        data: texts (a list of strings, or a corpus path: see ``mlxterp.read_documents``),
            traced on the fly in windows of ``context_size`` tokens, every layer's sites from one
            forward; or an ActivationDataset holding ``layers[i].<reads>`` and ``layers[i].mlp``
            for every covered layer; or a dict of those names -> (N, d) arrays. Repeated until
            ``n_tokens`` tokens have been trained on.
        kind: "plt" (one transcoder per layer, each reconstructing its own MLP's output) or
            "clt" (features read at layer l write to the MLP outputs of l and every later
            covered layer).
        layers: the layers covered (default: all).
        d_features: features per layer (default ``expansion * d_model``).
        activation: "jumprelu", "topk", "batchtopk" (exported as JumpReLU) or "relu".
        skip: learn a linear skip ``W_skip`` from each MLP's input to its output too.
        reads: the MLP input the features read: "ln2" (the normalised input, circuit-tracer's
            ``mlp.hook_in``) or "resid_mid" (``hook_resid_mid``).
        k: features per token and layer of topk/batchtopk, in [1, d_features].
        n_tokens: training tokens (BOS, padding and window starts are never trained on).
        batch_size: tokens per optimiser step.
        lr: Adam's learning rate (default ``2e-4 / sqrt(d_features / 2**14)``, as train_sae).
        sparsity: "tanh" (the decoder-norm-weighted tanh penalty) or "l0" (JumpReLU only).
        sparsity_coefficient: lambda, the penalty's weight once ramped up (jumprelu, relu).
        tanh_scale: c in ``tanh(c * ||W_dec|| * a)``.
        sparsity_warmup: the fraction of the steps over which lambda ramps up from 0, in [0, 1].
        pre_act_coefficient: the weight of the pre-activation (dead-feature) term (jumprelu, relu).
        aux_coefficient: the weight of the AuxK term (topk, batchtopk).
        k_aux: dead features AuxK decodes (default d_model // 2).
        dead_tokens: a feature is dead after this many tokens without firing (default
            ``n_tokens // 10``, at least batch_size, at most 10M).
        jumprelu_bandwidth: the straight-through estimators' kernel width.
        jumprelu_init_threshold: JumpReLU's starting threshold (in the training space).
        forward_batch: windows per forward pass when tracing texts.
        buffer_tokens: the shuffle buffer, in tokens (each holds 2 rows of d per layer).
        skip_first: leave out each window's first position (the attention sink); BOS is left
            out either way.
        memory_budget: bytes the run may hold (default 8 GiB, or half this machine's memory if
            less); a run that needs more is refused before it starts (:func:`training_memory`).
        checkpoint_dir: write a checkpoint every ``checkpoint_every`` steps there, and resume
            from the one found there (bitwise the run that never stopped).
        save_dir: save the trained transcoders there in circuit-tracer's layout.
        progress: False hides the progress bar (L0, FVU, dead fraction).

    Returns:
        the trained :class:`Transcoders`, with ``tc.training_log`` (:class:`TranscoderTrainingLog`).

    Every option is checked before the model runs: an option out of its range is an OptionError
    naming it, the value given and the range; a site the family lacks, data without the sites
    needed or a budget too small is a TranscoderError; nothing is written.
    """
    options.choice(kind, KINDS, "kind")
    options.choice(activation, ACTIVATIONS, "activation")
    options.choice(reads, INPUT_SITES, "reads")
    options.choice(sparsity, SPARSITY, "sparsity")
    if sparsity == "l0" and activation != "jumprelu":
        raise options.OptionError(f"sparsity='l0' is JumpReLU's penalty; activation={activation!r} takes sparsity='tanh'.")
    if not isinstance(skip, bool):
        raise options.OptionError(f"skip={skip!r}: expected True or False.")
    arch = model.architecture_or_raise("transcoders")
    covered = sorted(set(options.layers(layers, arch.n_layers)))
    for sub in (reads, "mlp"):
        if not arch.has(sub, covered[0]):
            raise TranscoderError(
                f"train_transcoders reads layers[i].{reads} and writes layers[i].mlp, but this {arch.family} model has no "
                f"'{sub}' (its block names: {', '.join(arch.block_names(covered[0]))})."
            )
    d_model = _width(model, f"layers.{covered[0]}.mlp")
    for name, value in (("expansion", expansion), ("n_tokens", n_tokens), ("batch_size", batch_size),
                        ("context_size", context_size), ("forward_batch", forward_batch), ("buffer_tokens", buffer_tokens),
                        ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        options.integer(value, name, 1)
    features = options.integer(d_features, "d_features", 1) if d_features is not None else expansion * d_model
    if activation in ("topk", "batchtopk"):
        if activation == "topk":
            options.integer(k, "k", 1, features)
        else:
            options.number(k, "k", 1, features)
        if k_aux is not None:
            options.integer(k_aux, "k_aux", 1, features)
        options.number(aux_coefficient, "aux_coefficient", 0)
    for name, value in (("sparsity_coefficient", sparsity_coefficient), ("pre_act_coefficient", pre_act_coefficient)):
        options.number(value, name, 0)
    options.number(sparsity_warmup, "sparsity_warmup", 0, 1)
    for name, value in (("tanh_scale", tanh_scale), ("jumprelu_bandwidth", jumprelu_bandwidth),
                        ("jumprelu_init_threshold", jumprelu_init_threshold)):
        options.number(value, name, 0, open_low=True)
    if lr is not None:
        options.number(lr, "lr", 0, open_low=True)
    if dead_tokens is not None:
        options.integer(dead_tokens, "dead_tokens", 1)
    budget = default_budget() if memory_budget is None else options.number(memory_budget, "memory_budget", 0, open_low=True)
    need = training_memory(kind, len(covered), d_model, features, skip=skip, batch_size=batch_size,
                           buffer_tokens=buffer_tokens)
    if need["total"] > budget:
        parts = ", ".join(f"{key} {value / GiB:.2f}" for key, value in need.items() if key != "total")
        raise TranscoderError(
            f"train_transcoders: a {kind} over {len(covered)} layers with {features} features per layer needs about "
            f"{need['total'] / GiB:.1f} GiB ({parts} GiB); memory_budget is {budget / GiB:.1f} GiB. Use fewer layers, "
            "a smaller d_features, batch_size or buffer_tokens, or raise memory_budget."
        )
    if save_dir is not None and kind == "clt" and (skip or covered != list(range(len(covered)))):
        raise TranscoderError(
            f"save_dir: circuit-tracer's CLT layout covers layers 0..n-1 without a skip; this CLT would cover {covered}"
            f"{' with a skip' if skip else ''}. Train it with layers=range(n) and skip=False, or save it yourself."
        )

    inputs = [_standard(model, f"layers.{layer}.{reads}") for layer in covered]
    targets = [_standard(model, f"layers.{layer}.mlp") for layer in covered]
    source = _source(model, inputs + targets, data, d_model, context_size, forward_batch, seed, skip_first)
    if isinstance(source, DatasetRows):
        inputs, targets = [data.site_name(s) for s in inputs], [data.site_name(s) for s in targets]
    steps = max(1, n_tokens // batch_size)
    settings = dict(kind=kind, layers=covered, d_model=d_model, d_features=features, activation=activation, skip=skip,
                    reads=reads, k=k if activation in ("topk", "batchtopk") else None, lr=lr or 2e-4 / math.sqrt(features / 2**14),
                    sparsity=sparsity, sparsity_coefficient=sparsity_coefficient, tanh_scale=tanh_scale,
                    sparsity_warmup=sparsity_warmup, pre_act_coefficient=pre_act_coefficient, aux=aux_coefficient,
                    k_aux=k_aux or max(1, d_model // 2), steps=steps, batch_size=batch_size,
                    dead_tokens=dead_tokens or max(batch_size, min(10_000_000, n_tokens // 10)),
                    bandwidth=jumprelu_bandwidth, init_threshold=jumprelu_init_threshold, seed=seed,
                    context_size=context_size, buffer_tokens=buffer_tokens, skip_first=skip_first)
    rng = source.rng if isinstance(source, DatasetRows) else np.random.default_rng(seed)
    batches = Batches(source, batch_size, buffer_rows=buffer_tokens, rng=rng)
    trainer = _Trainer(settings, inputs, targets, log_every)
    run = train_steps(trainer, batches, steps, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      settings=settings, progress=progress, what="train_transcoders",
                      desc=f"train_transcoders ({kind}, {len(covered)} layers, ~{need['total'] / GiB:.1f} GiB)",
                      error=TranscoderError)
    trainer.finish()
    tc = trainer.export(_model_name(model))
    tc.training_log = trainer.training_log(run.seconds, run.steps * batch_size, need)
    if save_dir is not None:
        from .formats import save_transcoders

        save_transcoders(tc, save_dir)
    return tc


# -- memory -----------------------------------------------------------------------------------


def training_memory(kind: str, n_layers: int, d_model: int, d_features: int, *, skip: bool = False,
                    batch_size: int = 1024, buffer_tokens: int = 8192) -> dict[str, int]:
    """Bytes a training run holds (float32): ``parameters``, ``adam`` (two moments),
    ``gradients``, ``activations`` (one batch: inputs, targets, reconstructions, errors, their
    gradients and the decoder's partial sums, 10 x d per layer; pre-activations, features, the
    penalty's terms and their gradients, 8 x d_features per layer: measured peaks on the CPU
    were within 10% of this) and
    ``buffer`` (the mixing buffer: up to ``buffer_tokens + batch_size`` rows of the 2 sites of
    every layer, twice while it reshuffles), and their ``total``. A CLT has n(n+1)/2 decoder
    blocks (source, target), a PLT set n."""
    blocks = n_layers * (n_layers + 1) // 2 if kind == "clt" else n_layers
    per_layer = d_features * d_model + 2 * d_features + d_model + (d_model * d_model if skip else 0)
    params = n_layers * per_layer + blocks * d_features * d_model
    need = {"parameters": 4 * params, "adam": 8 * params, "gradients": 4 * params,
            "activations": 4 * batch_size * n_layers * (10 * d_model + 8 * d_features),
            "buffer": 4 * 2 * (buffer_tokens + batch_size) * 2 * n_layers * d_model}
    need["total"] = sum(need.values())
    return need


def default_budget() -> int:
    """8 GiB, or half this machine's memory where that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * GiB
    return min(8 * GiB, ram // 2)


# -- the trainer ------------------------------------------------------------------------------


class _Trainer:
    """The transcoders in training (parameters in the training space, Adam, dead-feature
    counts, BatchTopK's thresholds, history): the trainer the core's ``train_steps`` runs.

    ``params[p]`` holds covered layer p's ``W_enc`` (F, d), ``b_enc`` (F,), ``W_dec`` (a list of
    (F, d) blocks, one per layer it writes, in order), ``b_dec`` (d,) and, as the options say,
    ``log_threshold`` (F,) and ``W_skip`` (d, d) (applied as ``x @ W_skip.T``)."""

    def __init__(self, settings: dict[str, Any], inputs: list[str], targets: list[str], log_every: int):
        self.settings, self.inputs, self.targets, self.log_every = settings, inputs, targets, log_every
        self.kind, self.activation = settings["kind"], settings["activation"]
        n = len(inputs)
        # which covered layers' features write to target m, and at which of their decoder slots
        self.sources = [[(p, m - p) for p in range(m + 1)] if self.kind == "clt" else [(m, 0)] for m in range(n)]
        self.unit_norm = self.activation in ("topk", "batchtopk")
        self.step_count, self.seen = 0, 0
        self.history: dict[str, list] = {key: [] for key in ("steps", "tokens", "l0", "fvu", "dead", "lam")}
        self.layer_stats: tuple[list[float], list[float]] = ([], [])
        self._last = None
        self._status = ""

    # -- start ----------------------------------------------------------------------------

    def start(self, first: dict[str, mx.array] | None) -> None:
        s = self.settings
        d, F, n = s["d_model"], s["d_features"], len(self.inputs)
        if first is None:  # a finished run: everything comes from the checkpoint
            first = {name: mx.ones((1, d)) for name in self.inputs + self.targets}
        x = [first[name].astype(mx.float32) for name in self.inputs]
        y = [first[name].astype(mx.float32) for name in self.targets]
        self.input_scales = [_scale(a) for a in x]
        self.target_scales = [_scale(a) for a in y]
        keys = mx.random.split(mx.random.key(s["seed"]), 2 * n)
        decoder_norm = 1.0 if self.unit_norm else 0.1
        self.params = {"layers": []}  # Adam's state is a dict: the per-layer list goes under one key
        for p in range(n):
            W_enc = mx.random.normal((F, d), key=keys[2 * p])
            W_enc = W_enc / mx.linalg.norm(W_enc, axis=-1, keepdims=True)
            blocks = mx.random.normal((F, len(self._writes(p)), d), key=keys[2 * p + 1])
            blocks = blocks / mx.linalg.norm(blocks.reshape(F, -1), axis=-1)[:, None, None] * decoder_norm
            layer = {"W_enc": W_enc, "b_enc": mx.zeros((F,)), "W_dec": [blocks[:, t] for t in range(blocks.shape[1])],
                     "b_dec": (y[p] * self.target_scales[p]).mean(axis=0)}
            if self.activation == "jumprelu":
                layer["log_threshold"] = mx.full((F,), math.log(s["init_threshold"]))
            if s["skip"]:
                layer["W_skip"] = mx.zeros((d, d))
            self.params["layers"].append(layer)
        steps = s["steps"]
        warm, decay = max(1, steps // 20), max(1, steps // 5)
        lr = s["lr"]
        schedule = optim.join_schedules(
            [optim.linear_schedule(lr * 0.01, lr, warm), lambda _: mx.array(lr, dtype=mx.float32),
             optim.linear_schedule(lr, lr / 10, decay)],
            [warm, max(warm + 1, steps - decay)],
        )
        self.optimizer = optim.Adam(learning_rate=schedule, bias_correction=True)
        self.optimizer.init(self.params)
        self.since_fired = mx.zeros((n, F), dtype=mx.int32)
        self.thresholds = mx.zeros((n,))  # BatchTopK's running thresholds, one per layer

    def _writes(self, p: int) -> list[int]:
        """The target indices covered layer p's features write to."""
        return [m for m in range(len(self.inputs)) if any(q == p for q, _ in self.sources[m])]

    # -- the loss, in the training space -------------------------------------------------------

    def _activate(self, p: int, params: dict, h: mx.array) -> mx.array:
        from mlxterp_saes import batchtopk_relu, jumprelu_ste, topk_relu

        if self.activation == "relu":
            return mx.maximum(h, 0)
        if self.activation == "jumprelu":
            return jumprelu_ste(h, mx.exp(params["log_threshold"]), self.settings["bandwidth"])
        if self.activation == "topk":
            return topk_relu(h, int(self.settings["k"]))
        return batchtopk_relu(self, params, h)

    def _decode(self, params: list[dict], features: list[mx.array], x: list[mx.array], bias: bool = True) -> list[mx.array]:
        out = []
        for m, sources in enumerate(self.sources):
            r = params[m]["b_dec"] if bias else None
            for p, slot in sources:
                term = features[p] @ params[p]["W_dec"][slot]
                r = term if r is None else r + term
            if bias and "W_skip" in params[m]:
                r = r + x[m] @ params[m]["W_skip"].T
            out.append(r)
        return out

    def forward(self, params: dict, x: list[mx.array]) -> tuple[list[mx.array], list[mx.array], list[mx.array]]:
        """Pre-activations, features and reconstructions per covered layer from the scaled
        inputs ``x`` (each (n, d)), in the training space."""
        layers = params["layers"]
        pre = [a @ layer["W_enc"].T + layer["b_enc"] for a, layer in zip(x, layers)]
        features = [self._activate(p, layer, h) for p, (layer, h) in enumerate(zip(layers, pre))]
        return pre, features, self._decode(layers, features, x)

    def _loss(self, params, x, y, dead, lam):
        pre, features, recons = self.forward(params, x)
        s, params = self.settings, params["layers"]
        errors = [t - r for t, r in zip(y, recons)]
        mse = [(e**2).sum(axis=-1).mean() for e in errors]
        loss = sum(mse)
        if self.unit_norm:
            loss = loss + s["aux"] * self._auxk(params, x, pre, errors, dead)
        else:
            norms = [_decoder_norms(layer) for layer in params]
            if s["sparsity"] == "l0":
                from mlxterp_saes import heaviside_ste

                penalty = sum(heaviside_ste(h, mx.exp(layer["log_threshold"]), s["bandwidth"]).sum(axis=-1).mean()
                              for h, layer in zip(pre, params))
            else:
                penalty = sum(mx.tanh(s["tanh_scale"] * norm * f).sum(axis=-1).mean() for norm, f in zip(norms, features))
            loss = loss + lam * penalty
            if s["pre_act_coefficient"]:
                theta = [mx.exp(layer["log_threshold"]) if "log_threshold" in layer else 0.0 for layer in params]
                below = sum((mx.maximum(t - h, 0) * norm).sum(axis=-1).mean() for t, h, norm in zip(theta, pre, norms))
                loss = loss + s["pre_act_coefficient"] * below
        return loss, (features, mse)

    def _auxk(self, params, x, pre, errors, dead) -> mx.array:
        """AuxK over every target: the dead features' top k_aux decode the residual error (see
        the module doc); no b_dec and no skip (the residual holds neither)."""
        from mlxterp_saes import topk_relu

        k_aux = min(self.settings["k_aux"], self.settings["d_features"])
        aux = [topk_relu(mx.where(dead[p], h, -mx.inf), k_aux) for p, h in enumerate(pre)]
        decoded = self._decode(params, aux, x, bias=False)
        n_dead = dead.sum(axis=-1).astype(mx.float32)
        total = mx.array(0.0)
        for m, (e_hat, e) in enumerate(zip(decoded, errors)):
            e = mx.stop_gradient(e)
            scale = mx.minimum(mx.mean(n_dead[mx.array([p for p, _ in self.sources[m]])]) / k_aux, 1.0)
            norm = ((e - e.mean(axis=0)) ** 2).sum(axis=-1).mean() + 1e-12
            total = total + scale * ((e_hat - e) ** 2).sum(axis=-1).mean() / norm
        return total

    # -- one step -------------------------------------------------------------------------------

    def step(self, batch: dict[str, mx.array]) -> None:
        s = self.settings
        x = [batch[name].astype(mx.float32) * scale for name, scale in zip(self.inputs, self.input_scales)]
        y = [batch[name].astype(mx.float32) * scale for name, scale in zip(self.targets, self.target_scales)]
        dead = self.since_fired > s["dead_tokens"]
        ramp = max(1, round(s["sparsity_warmup"] * s["steps"]))
        lam = s["sparsity_coefficient"] * min(1.0, (self.step_count + 1) / ramp)
        # the gradient function is made per step, not kept on self: a kept wrapper of a bound method is a
        # reference cycle that held the parameters and Adam state after training until Python's collector ran
        (_, (features, mse)), grads = mx.value_and_grad(self._loss)(self.params, x, y, dead, mx.array(lam, dtype=mx.float32))
        if self.unit_norm:  # keep each feature's decoder (over the layers it writes) at unit norm
            for layer, grad in zip(self.params["layers"], grads["layers"]):
                along = sum((g * W).sum(axis=-1) for g, W in zip(grad["W_dec"], layer["W_dec"]))
                grad["W_dec"] = [g - along[:, None] * W for g, W in zip(grad["W_dec"], layer["W_dec"])]
        if self.kind == "plt":
            grads = {"layers": [optim.clip_grad_norm(g, 1.0)[0] for g in grads["layers"]]}
        else:
            grads, _ = optim.clip_grad_norm(grads, 1.0)
        self.params = self.optimizer.apply_gradients(grads, self.params)
        if self.unit_norm:
            for layer in self.params["layers"]:
                norm = mx.maximum(_decoder_norms(layer), 1e-8)[:, None]
                layer["W_dec"] = [W / norm for W in layer["W_dec"]]
        fired = mx.stack([(f > 0).any(axis=0) for f in features])
        n = x[0].shape[0]
        self.since_fired = mx.where(fired, 0, self.since_fired + n)
        if self.activation == "batchtopk":  # theta <- 0.99 theta + 0.01 min positive f (the first batch sets it)
            positive = mx.stack([mx.where(f > 0, f, mx.inf).min() for f in features])
            self.thresholds = positive if self.seen == 0 else 0.99 * self.thresholds + 0.01 * positive
        self.seen += n
        self.step_count += 1
        l0 = mx.stack([(f > 0).sum(axis=-1).astype(mx.float32).mean() for f in features])
        fvu = mx.stack([err / ((t - t.mean(axis=0)) ** 2).sum(axis=-1).mean() for err, t in zip(mse, y)])
        self._last = (l0, fvu, lam)
        mx.eval(self.params, self.optimizer.state, self.since_fired, self.thresholds, l0, fvu)
        if self.step_count in (1, s["steps"]) or self.step_count % self.log_every == 0:
            self._log()

    def _log(self) -> None:
        l0, fvu, lam = self._last
        l0, fvu = l0.tolist(), fvu.tolist()
        dead = (self.since_fired > self.settings["dead_tokens"]).astype(mx.float32).mean().item()
        row = dict(steps=self.step_count, tokens=self.seen, l0=float(np.mean(l0)), fvu=float(np.mean(fvu)), dead=dead, lam=lam)
        for key, value in row.items():  # by name: a checkpoint's JSON gives the keys back sorted
            self.history[key].append(value)
        self.layer_stats = (l0, fvu)
        self._status = f"L0={row['l0']:.1f} FVU={row['fvu']:.3f} dead={dead:.1%}"

    def finish(self) -> None:
        """Log the last step run, where the data ran out before a logged step."""
        if self._last is not None and self.history["steps"][-1:] != [self.step_count]:
            self._log()

    def status(self) -> str:
        return self._status

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors = {f"params.{k}": v for k, v in tree_flatten(self.params)}
        tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        tensors.update(since_fired=self.since_fired, thresholds=self.thresholds)
        info = {"input_scales": self.input_scales, "target_scales": self.target_scales, "seen": self.seen,
                "step_count": self.step_count, "history": self.history, "layer_stats": self.layer_stats,
                "status": self._status}
        return tensors, info

    def load_state(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        # in a fresh run's key order (the core's docstring says why: a file's keys come back sorted)
        self.params = tree_unflatten([(k, tensors[f"params.{k}"]) for k, _ in tree_flatten(self.params)])
        order = [k for k, _ in tree_flatten(self.optimizer.state)]
        self.optimizer.state = tree_unflatten([(k, tensors[f"optimizer.{k}"]) for k in order])
        self.since_fired, self.thresholds = tensors["since_fired"], tensors["thresholds"]
        self.input_scales, self.target_scales = info["input_scales"], info["target_scales"]
        self.seen, self.step_count, self.history = info["seen"], info["step_count"], info["history"]
        self.layer_stats, self._status = tuple(info["layer_stats"]), info["status"]

    # -- the result -----------------------------------------------------------------------------

    def export(self, model_name: str | None) -> Transcoders:
        """The transcoders for raw activations: the scales folded in (the module doc's rules)."""
        s, sx, sy, params = self.settings, self.input_scales, self.target_scales, self.params["layers"]
        W_enc = [layer["W_enc"] * sx[p] for p, layer in enumerate(params)]
        W_dec = [mx.stack([W / sy[m] for W, m in zip(layer["W_dec"], self._writes(p))], axis=1)
                 for p, layer in enumerate(params)]
        b_dec = [layer["b_dec"] / sy[m] for m, layer in enumerate(params)]
        W_skip = None
        if s["skip"]:
            W_skip = [layer["W_skip"] * (sx[m] / sy[m]) for m, layer in enumerate(params)]
            W_skip = [W.T for W in W_skip] if self.kind == "clt" else W_skip
        threshold = None
        if self.activation == "jumprelu":
            threshold = [mx.exp(layer["log_threshold"]) for layer in params]
        elif self.activation == "batchtopk":
            threshold = [mx.full((s["d_features"],), t) for t in self.thresholds.tolist()]
        activation = {"batchtopk": "jumprelu"}.get(self.activation, self.activation)
        tc = Transcoders(self.kind, s["layers"], W_enc, [layer["b_enc"] for layer in params], W_dec, b_dec,
                         activation=activation, threshold=threshold, W_skip=W_skip,
                         k=int(s["k"]) if activation == "topk" else None, reads=s["reads"],
                         metadata={"model_name": model_name} if model_name else {})
        mx.eval(tc.W_enc, tc.W_dec, tc.b_dec, tc.threshold, tc.W_skip)
        return tc

    def training_log(self, seconds: float, tokens: int, memory: dict[str, int]) -> TranscoderTrainingLog:
        h = self.history
        return TranscoderTrainingLog(
            kind=self.kind, activation=self.activation, layers=list(self.settings["layers"]), steps=h["steps"],
            tokens=h["tokens"], l0=h["l0"], fvu=h["fvu"], dead=h["dead"], sparsity_coefficient=h["lam"],
            layer_l0=list(self.layer_stats[0]), layer_fvu=list(self.layer_stats[1]), input_scales=self.input_scales,
            target_scales=self.target_scales, n_tokens=self.seen, seconds=seconds,
            tokens_per_second=tokens / max(seconds, 1e-9), memory_estimate=memory)


def _scale(x: mx.array) -> float:
    """``sqrt(d) / E||x||`` over the rows of (n, d) ``x``."""
    return float(math.sqrt(x.shape[-1]) / max(mx.linalg.norm(x, axis=-1).mean().item(), 1e-12))


def _decoder_norms(layer: dict) -> mx.array:
    """(F,): each feature's decoder norm over every layer it writes."""
    return mx.sqrt(sum((W**2).sum(axis=-1) for W in layer["W_dec"]))


# -- data -------------------------------------------------------------------------------------


def _standard(model, name: str) -> str:
    return model.architecture_or_raise(name).resolve(name)[0].name


def _width(model, site: str) -> int:
    """The last axis of ``site``, from a one-token forward built lazily and never evaluated."""
    from mlxterp_saes import site_width

    return site_width(model, site)


def _source(model, sites: list[str], data: Any, d_model: int, context_size: int, forward_batch: int, seed: int,
            skip_first: bool):
    """The rows of ``sites`` in ``data`` (see train_transcoders) as a source of the activation
    stream; data that lacks a site, or holds it at another width, is a clear error."""
    needed = "train_transcoders needs every covered layer's MLP input and output"
    if isinstance(data, ActivationDataset):
        missing = [s for s in sites if not _stored(data, s)]
        if missing:
            raise TranscoderError(
                f"{needed}; the dataset at {data.path} lacks {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''} "
                f"(it has {', '.join(data.sites[:6])}{', ...' if len(data.sites) > 6 else ''}): cache them with "
                "model.cache_activations(texts, sites, folder)."
            )
        wrong = [s for s in sites if int(np.prod(data.site_info(s)["shape"])) != d_model]
        if wrong:
            raise TranscoderError(f"the dataset holds {wrong[0]} at width {data.site_info(wrong[0])['shape']}; this model's is {d_model}.")
        return DatasetRows(data, sites, rng=np.random.default_rng(seed), repeat=True, skip_first=skip_first)
    if isinstance(data, dict):
        missing = [s for s in sites if s not in data]
        if missing:
            raise TranscoderError(f"{needed}; the arrays given lack {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}.")
        rows = {s: mx.array(data[s]).reshape(-1, data[s].shape[-1]) for s in sites}
        wrong = [s for s in sites if rows[s].shape[-1] != d_model]
        if wrong:
            raise TranscoderError(f"the arrays hold {wrong[0]} at width {rows[wrong[0]].shape[-1]}; this model's is {d_model}.")
        return ArrayRows(rows)
    if isinstance(data, str) and not os.path.exists(data):
        raise TranscoderError(f"data={data[:60]!r} is not a file or folder: pass texts as a list of strings.")
    if isinstance(data, (mx.array, np.ndarray)):
        raise TranscoderError(f"{needed}: pass a dict {{site: (N, d) array}} with {sites[0]!r}, ..., not one array.")
    if model.tokenizer is None:
        raise TranscoderError("training on texts needs a model with a tokenizer.")
    return TextRows(model, data, sites, context_size=context_size, batch_size=forward_batch, skip_first=skip_first)


def _stored(dataset, site: str) -> bool:
    try:
        dataset.site_name(site)
    except Exception:
        return False
    return True


def _model_name(model) -> str | None:
    arch = model.architecture
    return arch.model_name if arch is not None else None
