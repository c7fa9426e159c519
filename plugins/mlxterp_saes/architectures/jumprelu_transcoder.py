"""JumpReLU transcoder (SAELens ``jumprelu_transcoder``; Gemma Scope's transcoders), loaded
only: a transcoder whose features are JumpReLU's, ``ReLU(h) * [h > threshold]``.
"""

from __future__ import annotations

from .jumprelu import activation, fold_decoder_norm, tensors  # noqa: F401  the same rules

name = "jumprelu_transcoder"
transcoder = True
