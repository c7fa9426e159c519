"""BatchTopK (Bussmann, Leask, Nanda 2024), trained only: ``f`` keeps the ReLU of the ``k * N``
largest pre-activations of the whole batch of N tokens (k per token on average; k may be
fractional), with unit-norm decoder rows and TopK's AuxK loss.

While training it keeps a running threshold, ``theta <- 0.99 theta + 0.01 * min(positive f)``
(the first batch sets it), and it is exported as a JumpReLU with that threshold for every
feature, as SAELens saves it: single tokens then encode as they would in a batch. A SAELens
BatchTopK training checkpoint (``architecture "batchtopk"``, a 0-d float64 ``topk_threshold``)
is read the same way (:func:`from_checkpoint`).
"""

from __future__ import annotations

import mlx.core as mx

from . import base
from .base import SAEError
from .topk import check_auxk, check_k, loss  # noqa: F401  TopK's AuxK term is BatchTopK's loss

name = "batchtopk"
saved_as = "jumprelu"
unit_norm_decoder = True
auxk = True


def check_options(settings: dict, d_sae: int) -> None:
    check_k(settings, d_sae)
    check_auxk(settings, d_sae)


def train_activation(t, params, h: mx.array) -> mx.array:
    """ReLU(h) keeping the k * N largest values of the whole (N, d_sae) batch."""
    relu = mx.maximum(h, 0)
    flat = relu.reshape(-1)
    keep = max(1, min(int(round(t.settings["k"] * h.shape[0])), flat.size))
    index = mx.stop_gradient(mx.argpartition(-flat, kth=keep - 1)[:keep])
    mask = mx.zeros(flat.shape).at[index].add(1.0) > 0
    return mx.where(mask.reshape(h.shape), relu, 0.0)


def init_buffers(t) -> dict[str, mx.array]:
    return {"threshold": mx.array(0.0)}


def after_step(t, f: mx.array) -> dict[str, mx.array]:
    positive = mx.where(f > 0, f, mx.inf).min()
    threshold = t.buffers["threshold"]
    return {"threshold": mx.where(t.seen == 0, positive, 0.99 * threshold + 0.01 * positive)}


def export(t) -> tuple[dict[str, mx.array], dict]:
    weights, _ = base.export(t)
    weights["threshold"] = mx.full((t.d_sae,), t.buffers["threshold"].item())
    return weights, {}


def from_checkpoint(cfg: dict, tensors: dict[str, mx.array]) -> tuple[dict, dict[str, mx.array]]:
    """A SAELens BatchTopK checkpoint as SAELens's ``save_inference_model`` writes it: with
    ``rescale_acts_by_decoder_norm`` the decoder norms ``n`` are folded (``W_enc * n``,
    ``b_enc * n``, ``W_dec / n``: the pre-activations become the rescaled ones the threshold was
    learnt on), and ``threshold = ones(d_sae) * topk_threshold``; a JumpReLU."""
    tensors = dict(tensors)
    if "topk_threshold" not in tensors:
        raise SAEError(f"a batchtopk checkpoint holds topk_threshold (the running threshold); this one has "
                       f"{', '.join(sorted(tensors))}.")
    threshold = tensors.pop("topk_threshold").astype(mx.float32).reshape(())
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = mx.linalg.norm(tensors["W_dec"], axis=-1)
        norms = mx.where(norms > 0, norms, 1.0)
        tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    tensors["threshold"] = mx.ones_like(tensors["b_enc"]) * threshold
    metadata = {"training_architecture": name, **(cfg.get("metadata") or {})}
    saved = {k: v for k, v in cfg.items() if k not in ("k", "rescale_acts_by_decoder_norm", "topk_threshold_lr")}
    return {**saved, "architecture": saved_as, "metadata": metadata}, tensors
