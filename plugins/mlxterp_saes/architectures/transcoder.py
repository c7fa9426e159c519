"""Transcoder (SAELens ``transcoder``), loaded only: reads one site and predicts another,
``y = ReLU(x @ W_enc + b_enc) @ W_dec + b_dec``, with ``W_dec (d_sae, d_out)`` and ``b_dec
(d_out,)`` in the output space (so ``apply_b_dec_to_input`` is False and the output is never
de-normalised). Otherwise the standard SAE.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

name = "transcoder"
transcoder = True


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return nn.relu(h)
