"""JumpReLU skip transcoder (SAELens ``jumprelu_skip_transcoder``; Gemma Scope 2's transcoders
with an affine skip), loaded only: a skip transcoder whose features are JumpReLU's,
``ReLU(h) * [h > threshold]``; ``decode`` is the dictionary alone and the skip ``x @ W_skip.T``
is added at the site, as in :mod:`.skip_transcoder`.
"""

from __future__ import annotations

from . import jumprelu, skip_transcoder
from .jumprelu import activation, fold_decoder_norm  # noqa: F401  JumpReLU's features
from .skip_transcoder import skip  # noqa: F401  and the skip transcoder's skip

name = "jumprelu_skip_transcoder"
transcoder = True


def tensors(cfg) -> dict[str, tuple[int, ...]]:
    return {**jumprelu.tensors(cfg), "W_skip": skip_transcoder.tensors(cfg)["W_skip"]}
