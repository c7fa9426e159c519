"""mlxterp's sparse autoencoders and transcoders: load the field's formats (SAELens, Gemma
Scope), splice them into any trace, train them in MLX, evaluate and explore their features.

Written against standard names only; registered through the ``mlxterp`` entry point like a
third party's plugin. The public names are re-exported as ``mlxterp.load_sae``, ``mlxterp.SAE``.
"""

from __future__ import annotations

from .formats import load_sae, save_sae
from .train import TrainingLog, train_sae
from .sae import SAE, SAEConfig, SAEError, topk_relu

__all__ = ["SAE", "SAEConfig", "SAEError", "TrainingLog", "load_sae", "save_sae", "topk_relu", "train_sae"]
