"""Evaluating an SAE: reconstruction, sparsity and what splicing it costs the model.

Definitions (``../shared/research/saes-lens-heads.md`` §1b.6), over all evaluated tokens
(BOS, padding and each window's first position excluded: the activation stream's policy), sums accumulated batch by batch so that no figure depends on the
batch size:

- ``mse`` = E_t sum_d (x - x^)^2 (per token, summed over d);
- ``explained_variance`` = 1 - E||x - x^||^2 / E||x - E[x]||^2, numerator and denominator
  averaged separately, E[x] the per-dimension mean over all tokens (predicting that mean
  explains 0; a constant offset in the data does not inflate it);
- ``normalized_mse`` = E||x - x^||^2 / E||x||^2 (relative to zero, OpenAI's; not comparable
  with 1 - EV when activations have a large mean);
- ``l0`` = mean over tokens of #{i: f_i > 0}, with its histogram;
- feature density = fraction of tokens on which a feature fires; dead = 0 over the window,
  dense = above ``dense_threshold`` (10%);
- CE loss of the next token for the clean model, the model with the site replaced by the
  reconstruction alone (no error term), and with the site zero-ablated, at the same real
  positions; ``ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``;
  ``ce_increase = CE_sae - CE_clean`` (nats: what dropping the error term costs);
  KL(clean || spliced) and KL(clean || zero-ablated) per token, summed over the vocabulary,
  ``kl_score = (KL_zero - KL_sae) / KL_zero``.

The splice and the ablation touch only those positions (BOS and the window's first token are
outliers an SAE is not trained on, and every later token attends to them).
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Serialisable
from mlxterp.plugin import Display

from .sae import SAE, SAEError

DENSE = 0.1


class Accumulator:
    """Running sums for EV, MSE, NMSE, L0 and densities over batches of (n, d) rows."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sum_x: np.ndarray | None = None
        self.sum_x2 = 0.0
        self.sse = 0.0
        self.fired = np.zeros(d_sae, dtype=np.int64)
        self.l0: list[np.ndarray] = []

    def add(self, x: mx.array, x_hat: mx.array, f: mx.array | None = None) -> None:
        x = np.asarray(x.astype(mx.float32), dtype=np.float64).reshape(-1, x.shape[-1])
        x_hat = np.asarray(x_hat.astype(mx.float32), dtype=np.float64).reshape(x.shape)
        self.n += x.shape[0]
        s = x.sum(axis=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x2 += float((x**2).sum())
        self.sse += float(((x - x_hat) ** 2).sum())
        if f is not None:
            active = np.asarray(f.reshape(-1, f.shape[-1]) > 0)
            self.fired += active.sum(axis=0)
            self.l0.append(active.sum(axis=1))

    @property
    def total_variance(self) -> float:
        """sum over tokens of ||x - E[x]||^2."""
        return self.sum_x2 - float((self.sum_x**2).sum()) / self.n

    def explained_variance(self) -> float:
        return 1.0 - self.sse / self.total_variance

    def mse(self) -> float:
        return self.sse / self.n

    def normalized_mse(self) -> float:
        return self.sse / self.sum_x2


def explained_variance(x: mx.array, x_hat: mx.array) -> float:
    """1 - E||x - x^||^2 / E||x - E[x]||^2 over the rows of (..., d) arrays."""
    acc = Accumulator(1)
    acc.add(x, x_hat)
    return acc.explained_variance()


def mse(x: mx.array, x_hat: mx.array) -> float:
    """E_t sum_d (x - x^)^2."""
    acc = Accumulator(1)
    acc.add(x, x_hat)
    return acc.mse()


def normalized_mse(x: mx.array, x_hat: mx.array) -> float:
    """E||x - x^||^2 / E||x||^2."""
    acc = Accumulator(1)
    acc.add(x, x_hat)
    return acc.normalized_mse()


@attrs.frozen(repr=False)
class SAEEvaluation(Serialisable, Display):
    """``sae.evaluate(model, texts)``: see the module doc for every definition."""

    site: str
    architecture: str
    n_tokens: int
    l0: float
    l0_histogram: list[int]  # l0_histogram[n] = tokens with exactly n active features
    explained_variance: float
    mse: float
    normalized_mse: float
    dead_fraction: float
    dense_fraction: float
    log_density: list[float]  # log10(density + 1e-10) per feature
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_loss_recovered: float
    ce_increase: float
    kl_spliced: float
    kl_zero_ablated: float
    kl_score: float

    def _summary(self) -> str:
        return (f"{self.site}, {self.n_tokens} tokens: L0 {self.l0:.1f}, EV {self.explained_variance:.3f}, "
                f"CE recovered {self.ce_loss_recovered:.1%} ({self.ce_increase:+.3f} nats), dead {self.dead_fraction:.1%}")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def plot(self, path=None):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        axes[0].bar(range(len(self.l0_histogram)), self.l0_histogram, width=1.0)
        axes[0].set(title=f"L0 per token (mean {self.l0:.1f})", xlabel="active features", ylabel="tokens")
        axes[1].hist([d for d in self.log_density if d > -10], bins=40)
        axes[1].set(title=f"feature density (dead {self.dead_fraction:.1%})", xlabel="log10 density", ylabel="features")
        names = ["clean", "SAE (no error)", "zero-ablated"]
        axes[2].bar(names, [self.ce_clean, self.ce_spliced, self.ce_zero_ablated], color=["C2", "C0", "C3"])
        axes[2].set(title=f"next-token CE (recovered {self.ce_loss_recovered:.1%})", ylabel="nats")
        fig.suptitle(f"{self.architecture} SAE at {self.site}, EV {self.explained_variance:.3f}")
        fig.tight_layout()
        return finish(fig, path)


def evaluate(
    sae: SAE,
    model,
    texts,
    *,
    n_tokens: int | None = 4096,
    context_size: int | None = None,
    batch_size: int = 8,
    dense_threshold: float = DENSE,
    progress: bool | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> SAEEvaluation:
    """Evaluate ``sae`` spliced into ``model`` on ``texts`` (a list of strings or a corpus path,
    decoded with ``encoding`` and ``errors``: see ``mlxterp.read_documents``).

    ``n_tokens`` caps the tokens read (None: all), in windows of ``context_size`` tokens
    (default: the SAE's own context size, else 128).
    """
    from mlxterp.plugin import progress_over, site_batches, token_windows, trainable

    if model.tokenizer is None:
        raise SAEError("evaluating on texts needs a model with a tokenizer.")
    context = context_size or sae.cfg.context_size or 128
    reads, site = sae.cfg.site, sae.site
    acc = Accumulator(sae.cfg.d_sae)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    counted = 0
    windows = token_windows(model, texts, context, batch_size=batch_size, max_tokens=n_tokens,
                            encoding=encoding, errors=errors)
    windows = progress_over(windows, n_tokens, "evaluate", progress is not False, "tok", lambda b: b.n_tokens)
    for batch, clean, clean_logits in site_batches(model, windows, list(dict.fromkeys([reads, site])), outputs=True):
        keep = trainable(batch)  # (B, T) positions the SAE works at
        if not keep.any():
            continue
        ids = batch.inputs
        keep_mx = mx.array(keep)[..., None]
        x, target = clean[reads], clean[site]
        f = sae.encode(x)
        recons = sae.reconstruct(f, sae._flat(x, sae.cfg.d_in, "input"))
        rows = mx.array(np.flatnonzero(keep.reshape(-1)).astype(np.int32))
        flat = lambda a: mx.take(a.reshape(-1, a.shape[-1]), rows, axis=0)  # noqa: E731
        acc.add(flat(sae._flat(target, recons.shape[-1], "output")), flat(recons), flat(f))
        # the reconstruction alone: keep the error only where the SAE is not applied
        no_error = {f"{site}.sae.error": lambda e: mx.where(keep_mx, mx.zeros_like(e), e)}
        spliced = model.run(ids, saes=[sae], interventions=no_error, capture=["logits"]).activations["logits"]
        zeroed = model.run(ids, interventions={site: lambda a: mx.where(keep_mx, mx.zeros_like(a), a)},
                           capture=["logits"]).activations["logits"]
        # next-token losses at positions whose own token and next token are real, not BOS
        scored = keep[:, :-1] & batch.mask[:, 1:]
        if not scored.any():
            continue
        targets = ids[:, 1:]
        score_mx = mx.array(scored)
        logp_clean = _log_softmax(clean_logits[:, :-1])
        for key, logits in (("clean", None), ("sae", spliced), ("zero", zeroed)):
            logp = logp_clean if logits is None else _log_softmax(logits[:, :-1])
            nll = -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            ce[key] += mx.where(score_mx, nll, 0).sum().item()
            if logits is not None:
                div = (mx.exp(logp_clean) * (logp_clean - logp)).sum(axis=-1)
                kl[key] += mx.where(score_mx, div, 0).sum().item()
        counted += int(scored.sum())
    if acc.n == 0 or counted == 0:
        raise SAEError("the evaluation texts hold no tokens to score (BOS and padding are excluded).")
    ce = {k: v / counted for k, v in ce.items()}
    kl = {k: v / counted for k, v in kl.items()}
    density = acc.fired / acc.n
    l0 = np.concatenate(acc.l0)
    gap = ce["zero"] - ce["clean"]
    return SAEEvaluation(
        site=site if not sae.cfg.is_transcoder else f"{reads} -> {site}",
        architecture=sae.cfg.architecture,
        n_tokens=acc.n,
        l0=float(l0.mean()),
        l0_histogram=np.bincount(l0).tolist(),
        explained_variance=acc.explained_variance(),
        mse=acc.mse(),
        normalized_mse=acc.normalized_mse(),
        dead_fraction=float((density == 0).mean()),
        dense_fraction=float((density > dense_threshold).mean()),
        log_density=np.log10(density + 1e-10).tolist(),
        ce_clean=ce["clean"],
        ce_spliced=ce["sae"],
        ce_zero_ablated=ce["zero"],
        ce_loss_recovered=(ce["zero"] - ce["sae"]) / gap if gap else float("nan"),
        ce_increase=ce["sae"] - ce["clean"],
        kl_spliced=kl["sae"],
        kl_zero_ablated=kl["zero"],
        kl_score=(kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] else float("nan"),
    )


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
