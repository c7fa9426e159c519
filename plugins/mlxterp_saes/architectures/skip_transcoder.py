"""Skip transcoder (SAELens ``skip_transcoder``), loaded only: a transcoder plus a linear skip
path from its input, ``W_skip (d_out, d_in)``::

    decode(f) = f @ W_dec + b_dec                 (SAELens's decode: no skip)
    y = decode(ReLU(x @ W_enc + b_enc)) + x @ W_skip.T

The skip is added where the transcoder writes its site (``SAE.reconstruct``, SAELens's
``forward``), so the splice's ``recons`` includes it and feature edits never touch it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import base

name = "skip_transcoder"
transcoder = True


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    return {**base.tensors(cfg), "W_skip": (cfg.d_out or cfg.d_in, cfg.d_in)}


def activation(sae, h: mx.array, x: mx.array | None) -> mx.array:
    return nn.relu(h)


def skip(sae, x: mx.array) -> mx.array:
    return x.astype(mx.float32) @ sae.W_skip.T
