"""Evaluating transcoders: each layer's reconstruction, and the replacement model they make.

Over the evaluated tokens (the activation stream's trainable positions: real tokens, not BOS,
not a window's first position), sums accumulated batch by batch so no figure depends on the
batch size:

- per covered layer m, of the MLP output ``y_m`` predicted from the clean forward's MLP inputs
  (a CLT's prediction sums the features of every covered layer up to m):
  ``explained_variance = 1 - E||y - y^||^2 / E||y - E[y]||^2``, ``normalized_mse = E||y - y^||^2 /
  E||y||^2``, ``l0`` (active features per token), ``dead_fraction`` (features that never fire)
  and ``dense_fraction`` (features firing on more than ``dense_threshold`` of the tokens);
- the replacement model: every covered MLP output replaced by its reconstruction, errors off
  (the error sub-sites zeroed at the evaluated positions: elsewhere the MLP is exact), features
  computed from the replacement model's own activations; its next-token CE loss and its KL
  from the original (per token, summed over the vocabulary), against the same MLPs
  zero-ablated at those positions: ``ce_loss_recovered = (CE_zero - CE_replacement) / (CE_zero -
  CE_clean)``.
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Display, Serialisable, options

from .transcoders import TranscoderError, Transcoders

DENSE = 0.1


@attrs.frozen(repr=False)
class TranscoderEvaluation(Serialisable, Display):
    """``mlxterp.evaluate_transcoders(model, tc, texts)``: per-layer lists follow ``layers``;
    the module doc defines every figure."""

    kind: str
    activation: str
    layers: list[int]
    n_tokens: int
    explained_variance: list[float]
    normalized_mse: list[float]
    l0: list[float]
    dead_fraction: list[float]
    dense_fraction: list[float]
    ce_clean: float
    ce_replacement: float
    ce_zero_ablated: float
    ce_loss_recovered: float
    kl_replacement: float
    kl_zero_ablated: float

    @property
    def mean_l0(self) -> float:
        return float(np.mean(self.l0))

    @property
    def mean_explained_variance(self) -> float:
        return float(np.mean(self.explained_variance))

    def _summary(self) -> str:
        what = "CLT" if self.kind == "clt" else "PLTs"
        span = f"layers {self.layers[0]}..{self.layers[-1]}" if len(self.layers) > 1 else f"layer {self.layers[0]}"
        return (f"{what}, {span}, {self.n_tokens} tokens: L0 {self.mean_l0:.1f} per layer, EV {self.mean_explained_variance:.3f} "
                f"(mean); replacement CE recovered {self.ce_loss_recovered:.1%} "
                f"({self.ce_replacement - self.ce_clean:+.3f} nats), KL {self.kl_replacement:.3g}")

    def plot(self, path=None):
        """Explained variance, L0 and dead / dense fractions per layer; the three CE losses."""
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
        marker = "o" if len(self.layers) <= 40 else None
        axes[0].plot(self.layers, self.explained_variance, marker=marker, label="explained variance")
        axes[0].plot(self.layers, self.normalized_mse, marker=marker, label="normalised MSE")
        axes[0].set(title="MLP output reconstruction", xlabel="layer")
        axes[0].legend()
        axes[1].plot(self.layers, self.l0, marker=marker)
        axes[1].set(title=f"L0 per layer (mean {self.mean_l0:.1f})", xlabel="layer", ylabel="active features")
        axes[2].plot(self.layers, self.dead_fraction, marker=marker, label="dead")
        axes[2].plot(self.layers, self.dense_fraction, marker=marker, label="dense")
        axes[2].set(title="feature fractions", xlabel="layer")
        axes[2].legend()
        names = ["clean", "replacement", "MLPs zeroed"]
        axes[3].bar(names, [self.ce_clean, self.ce_replacement, self.ce_zero_ablated], color=["C2", "C0", "C3"])
        axes[3].set(title=f"next-token CE (recovered {self.ce_loss_recovered:.1%})", ylabel="nats")
        fig.suptitle(f"{'cross-layer transcoder' if self.kind == 'clt' else 'per-layer transcoders'} "
                     f"({self.activation}), KL to the model {self.kl_replacement:.3g}")
        fig.tight_layout()
        return finish(fig, path)


def evaluate_transcoders(model, tc: Transcoders, texts, *, n_tokens: int | None = 4096, context_size: int = 128,
                         batch_size: int = 8, dense_threshold: float = DENSE,
                         progress: bool | None = None) -> TranscoderEvaluation:
    """Evaluate ``tc`` on ``model`` over ``texts`` (a list of strings or a corpus path): each
    layer's reconstruction of its MLP output, and the replacement model's CE loss and KL (see
    the module doc). ``n_tokens`` caps the tokens read (None: all), in windows of
    ``context_size`` tokens, ``batch_size`` windows per forward pass."""
    from mlxterp_saes import Accumulator

    from mlxterp.plugin import progress_over, site_batches, token_windows, trainable

    from .formats import check_model

    if n_tokens is not None:
        options.integer(n_tokens, "n_tokens", 1)
    options.integer(context_size, "context_size", 2)
    options.integer(batch_size, "batch_size", 1)
    options.number(dense_threshold, "dense_threshold", 0, 1)
    if model.tokenizer is None:
        raise TranscoderError("evaluating on texts needs a model with a tokenizer.")
    check_model(tc, model)
    reads = [f"layers.{layer}.{tc.reads}" for layer in tc.layers]
    writes = [f"layers.{layer}.mlp" for layer in tc.layers]
    spliced = tc.with_error_term(True)  # the error is switched off where evaluated, and only there
    accumulators = [Accumulator(tc.d_features) for _ in tc.layers]
    ce = {"clean": 0.0, "replacement": 0.0, "zero": 0.0}
    kl = {"replacement": 0.0, "zero": 0.0}
    scored_tokens = 0
    windows = token_windows(model, texts, context_size, batch_size=batch_size, max_tokens=n_tokens)
    windows = progress_over(windows, n_tokens, "evaluate_transcoders", progress is not False, "tok", lambda b: b.n_tokens)
    for batch, clean, clean_logits in site_batches(model, windows, reads + writes, outputs=True):
        keep = trainable(batch)
        if not keep.any():
            continue
        rows = mx.array(np.flatnonzero(keep.reshape(-1)).astype(np.int32))
        flat = lambda a: mx.take(a.reshape(-1, a.shape[-1]), rows, axis=0)  # noqa: E731
        x = {layer: flat(clean[name]) for layer, name in zip(tc.layers, reads)}
        features = {layer: tc.encode(x[layer], layer) for layer in tc.layers}
        for acc, layer, name in zip(accumulators, tc.layers, writes):
            acc.add(flat(clean[name]), tc.reconstruct(features, x[layer], layer), features[layer])
        at = mx.array(keep)[..., None]
        ids = batch.inputs
        no_error = {f"{name}.transcoder.error": lambda e: mx.where(at, mx.zeros_like(e), e) for name in writes}
        replaced = model.run(ids, transcoders=spliced, interventions=no_error, capture=["logits"]).activations["logits"]
        zeroed = model.run(ids, interventions={name: lambda a: mx.where(at, mx.zeros_like(a), a) for name in writes},
                           capture=["logits"]).activations["logits"]
        # next-token losses where the token and the next one are real, the token not BOS
        scored = keep[:, :-1] & batch.mask[:, 1:]
        if not scored.any():
            continue
        where = mx.array(scored)
        logp_clean = _log_softmax(clean_logits[:, :-1])
        for key, logits in (("clean", None), ("replacement", replaced), ("zero", zeroed)):
            logp = logp_clean if logits is None else _log_softmax(logits[:, :-1])
            nll = -mx.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            ce[key] += mx.where(where, nll, 0).sum().item()
            if logits is not None:
                kl[key] += mx.where(where, (mx.exp(logp_clean) * (logp_clean - logp)).sum(axis=-1), 0).sum().item()
        scored_tokens += int(scored.sum())
    if accumulators[0].n == 0 or scored_tokens == 0:
        raise TranscoderError("the evaluation texts hold no tokens to score (BOS, padding and window starts are excluded).")
    ce = {key: value / scored_tokens for key, value in ce.items()}
    kl = {key: value / scored_tokens for key, value in kl.items()}
    gap = ce["zero"] - ce["clean"]
    densities = [acc.fired / acc.n for acc in accumulators]
    return TranscoderEvaluation(
        kind=tc.kind, activation=tc.activation, layers=list(tc.layers), n_tokens=accumulators[0].n,
        explained_variance=[acc.explained_variance() for acc in accumulators],
        normalized_mse=[acc.normalized_mse() for acc in accumulators],
        l0=[float(np.concatenate(acc.l0).mean()) for acc in accumulators],
        dead_fraction=[float((d == 0).mean()) for d in densities],
        dense_fraction=[float((d > dense_threshold).mean()) for d in densities],
        ce_clean=ce["clean"], ce_replacement=ce["replacement"], ce_zero_ablated=ce["zero"],
        ce_loss_recovered=(ce["zero"] - ce["replacement"]) / gap if gap else float("nan"),
        kl_replacement=kl["replacement"], kl_zero_ablated=kl["zero"],
    )


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
