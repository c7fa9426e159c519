"""Skip transcoder (SAELens ``skip_transcoder``), loaded only: a transcoder plus a linear skip
path, ``y = ReLU(x @ W_enc + b_enc) @ W_dec + b_dec + x @ W_skip.T`` with ``W_skip (d_out, d_in)``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import base
from .base import SAEError

name = "skip_transcoder"
transcoder = True


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    return {**base.tensors(cfg), "W_skip": (cfg.d_out or cfg.d_in, cfg.d_in)}


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return nn.relu(h)


def decode(sae, f: mx.array, x: mx.array | None) -> mx.array:
    if x is None:
        raise SAEError("a skip transcoder's decode needs the input x: decode(f, x).")
    return base.decode(sae, f, x) + x.astype(mx.float32) @ sae.W_skip.T
