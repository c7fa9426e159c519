"""The standard SAE (SAELens ``standard``; trained as ``relu``): ``f = ReLU(h)``, trained with an
L1 penalty on the features weighted by their decoder norms, ``l1_coefficient * sum_i f_i
||W_dec,i||`` (the norms are left free while training and folded into unit rows on export).

Everything else is the shared default (:mod:`.base`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import check_option

name = "standard"
aliases = ("relu",)
training_name = "relu"  # what train_sae records (training log, checkpoints, cfg metadata)


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return nn.relu(h)


def check_options(settings: dict, d_sae: int) -> None:
    check_option("l1_coefficient", settings["l1"], 0)


def train_activation(t, params, h: mx.array) -> mx.array:
    return mx.maximum(h, 0)


def loss(t, params, h, f, error, dead) -> mx.array:
    norms = mx.linalg.norm(params["W_dec"], axis=-1)
    return t.settings["l1"] * (f * norms).sum(axis=-1).mean()
