"""TopK (SAELens ``topk``; Gao et al. 2024): ``f`` keeps the ReLU of the k largest
pre-activations of each token, zero elsewhere. Trained with unit-norm decoder rows and the AuxK
loss that revives dead latents: ``aux_coefficient * min(n_dead / k_aux, 1) * ||e^ - e||^2 /
||e - mean e||^2``, with ``e = x - x^`` (detached) and ``e^`` decoded from the ``k_aux`` largest
dead pre-activations *without* ``b_dec`` (the fix of sparsify PR #134).

``cfg.json`` carries ``k``; decoder norms are never folded (that would change which k features
win), so a file's ``rescale_acts_by_decoder_norm`` is folded into the encoder at load instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import base
from .base import SAEError, check_option

name = "topk"
unit_norm_decoder = True
fold_on_export = False


def topk_relu(h: mx.array, k: int) -> mx.array:
    """ReLU of the k largest entries of the last axis, zero elsewhere; exactly k chosen even
    when values tie."""
    k = int(k)
    if k >= h.shape[-1]:
        return nn.relu(h)
    index = mx.stop_gradient(mx.argpartition(-h, kth=k - 1, axis=-1)[..., :k])
    values = nn.relu(mx.take_along_axis(h, index, axis=-1))
    return mx.put_along_axis(mx.zeros_like(h), index, values, axis=-1)


def check_config(cfg) -> None:
    if not cfg.k:
        raise SAEError("a topk SAE needs k (cfg field 'k').")


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return topk_relu(h, sae.cfg.k)


def fold_decoder_norm(sae, norms: mx.array) -> None:
    raise SAEError(
        "folding decoder norms changes which k features a TopK SAE picks; TopK SAEs keep "
        "their decoder as trained (SAELens refuses this too)."
    )


def config_fields(cfg) -> dict:
    return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}


# -- training ----------------------------------------------------------------------------------


def check_options(settings: dict, d_sae: int) -> None:
    check_k(settings, d_sae)
    k = settings["k"]
    if k != int(k):
        raise SAEError(
            f"train_sae: k={k!r} is out of range: k must be a whole number in [1, {d_sae}] (topk keeps "
            "exactly k features per token)."
        )
    check_auxk(settings, d_sae)


def check_k(settings: dict, d_sae: int) -> None:
    why = f" ({settings['architecture']} needs k > 0 active features per token, at most d_sae = {d_sae})"
    check_option("k", settings["k"], 1, d_sae, why=why)


def check_auxk(settings: dict, d_sae: int) -> None:
    check_option("k_aux", settings["k_aux"], 1, d_sae, whole=True, default="d_in // 2")
    check_option("aux_coefficient", settings["aux"], 0)


def train_activation(t, params, h: mx.array) -> mx.array:
    return topk_relu(h, int(t.settings["k"]))


def loss(t, params, h, f, error, dead) -> mx.array:
    """The AuxK term (see the module docstring), also BatchTopK's."""
    k_aux = t.settings["k_aux"] or max(1, t.d_in // 2)
    e = mx.stop_gradient(error)
    dead_h = mx.where(dead, h, -mx.inf)
    f_aux = topk_relu(dead_h, min(k_aux, t.d_sae))
    e_hat = f_aux @ params["W_dec"]  # no b_dec: the residual has none
    scale = mx.minimum(dead.sum() / k_aux, 1.0)
    norm = ((e - e.mean(axis=0)) ** 2).sum(axis=-1).mean() + 1e-12
    return t.settings["aux"] * scale * ((e_hat - e) ** 2).sum(axis=-1).mean() / norm


def export(t) -> tuple[dict[str, mx.array], dict]:
    weights, _ = base.export(t)
    return weights, {"k": int(t.settings["k"])}
