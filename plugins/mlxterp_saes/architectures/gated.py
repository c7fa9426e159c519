"""Gated (SAELens ``gated``; Rajamanoharan et al. 2024), loaded only: the gate and the magnitude
are two linear maps of the processed input ``x~`` sharing ``W_enc``::

    f = [x~ @ W_enc + b_gate > 0] * ReLU(x~ @ (W_enc * exp(r_mag)) + b_mag)

Tensors: ``b_gate``, ``b_mag``, ``r_mag`` (d_sae,) instead of ``b_enc``. The pre-activations
(``sae.pre``) are the magnitude path's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import SAEError

name = "gated"


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    d_out = cfg.d_out or cfg.d_in
    return {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, d_out), "b_dec": (d_out,),
            "b_gate": (cfg.d_sae,), "b_mag": (cfg.d_sae,), "r_mag": (cfg.d_sae,)}


def pre_acts(sae, x: mx.array) -> mx.array:
    return x @ (sae.W_enc * mx.exp(sae.r_mag)) + sae.b_mag


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    if x is None:
        raise SAEError("a gated SAE's activation needs the input x for its gate: use encode(x).")
    gate = (sae.process_input(x) @ sae.W_enc + sae.b_gate) > 0
    return mx.where(gate, nn.relu(h), 0.0)


def fold_decoder_norm(sae, norms: mx.array) -> None:
    sae.b_gate = sae.b_gate * norms
    sae.b_mag = sae.b_mag * norms
