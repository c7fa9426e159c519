"""JumpReLU (SAELens ``jumprelu``; Rajamanoharan et al. 2024, Gemma Scope): ``f = ReLU(h) *
[h > threshold]`` (strict), one threshold per feature.

Trained on ``log_threshold`` (initialised at ``log(jumprelu_init_threshold)``) with an L0 penalty,
``l0_coefficient * L0``, through straight-through estimators with a rectangle kernel of width
``jumprelu_bandwidth``; exported with ``threshold = exp(log_threshold)`` and unit-norm decoder
rows (folding scales the threshold with its feature).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import base
from .base import check_option

name = "jumprelu"


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    return {**base.tensors(cfg), "threshold": (cfg.d_sae,)}


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return mx.where(h > sae.threshold, nn.relu(h), 0.0)


def fold_decoder_norm(sae, norms: mx.array) -> None:
    sae.b_enc = sae.b_enc * norms
    sae.threshold = sae.threshold * norms


# -- training ----------------------------------------------------------------------------------


def check_options(settings: dict, d_sae: int) -> None:
    check_option("l0_coefficient", settings["l0"], 0)
    check_option("jumprelu_bandwidth", settings["bandwidth"], 0, above=True)
    check_option("jumprelu_init_threshold", settings["init_threshold"], 0, above=True)


def init_params(t, x: mx.array) -> dict[str, mx.array]:
    params = base.init_params(t, x)
    params["log_threshold"] = mx.full((t.d_sae,), math.log(t.settings["init_threshold"]))
    return params


def train_activation(t, params, h: mx.array) -> mx.array:
    return _jump(h, mx.exp(params["log_threshold"]), t.settings["bandwidth"])


def loss(t, params, h, f, error, dead) -> mx.array:
    l0 = _step(h, mx.exp(params["log_threshold"]), t.settings["bandwidth"]).sum(axis=-1).mean()
    return t.settings["l0"] * l0


def export(t) -> tuple[dict[str, mx.array], dict]:
    weights, _ = base.export(t)
    weights["threshold"] = mx.exp(t.params["log_threshold"])
    return weights, {}


# -- straight-through estimators ---------------------------------------------------------------


def _rectangle(u: mx.array) -> mx.array:
    return ((u > -0.5) & (u < 0.5)).astype(mx.float32)


def _jump(h: mx.array, threshold: mx.array, bandwidth: float) -> mx.array:
    """``h * [h > threshold]``; the threshold's gradient through the rectangle kernel."""

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
    """``[h > threshold]`` (the L0 of a token, summed); the threshold's gradient as in _jump."""

    @mx.custom_function
    def heaviside(h, threshold):
        return (h > threshold).astype(mx.float32)

    @heaviside.vjp
    def heaviside_vjp(primals, cotangent, output):
        h, threshold = primals
        dt = -(1.0 / bandwidth) * _rectangle((h - threshold) / bandwidth) * cotangent
        return mx.zeros_like(h), dt.reshape(-1, dt.shape[-1]).sum(axis=0)

    return heaviside(h, threshold)
