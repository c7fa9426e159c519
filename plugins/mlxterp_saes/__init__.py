"""mlxterp's sparse autoencoders and transcoders: load the field's formats (SAELens, Gemma
Scope), splice them into any trace, train them in MLX, evaluate and explore their features.

Written against standard names only; registered through the ``mlxterp`` entry point like a
third party's plugin. The public names are re-exported as ``mlxterp.load_sae``, ``mlxterp.SAE``.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .architectures import Architecture, get_architecture, register_architecture
from .architectures.batchtopk import train_activation as batchtopk_relu
from .architectures.jumprelu import _jump as jumprelu_ste
from .architectures.jumprelu import _step as heaviside_ste
from .architectures.topk import topk_relu
from .evaluate import Accumulator, SAEEvaluation, explained_variance, mse, normalized_mse
from .features import Example, FeatureAttribution, FeatureExamples, feature_attribution, top_activations
from .formats import load_sae, save_sae
from .training import TrainingLog, train_sae
from .sae import SAE, SAEConfig, SAEError, site_width


@hookimpl
def mlxterp_exports():
    return {"SAE": SAE, "load_sae": load_sae, "train_sae": train_sae}


__all__ = [
    "SAE", "SAEConfig", "SAEError", "SAEEvaluation", "TrainingLog", "Example", "FeatureExamples",
    "FeatureAttribution", "load_sae", "save_sae", "train_sae", "top_activations", "feature_attribution",
    "explained_variance", "mse", "normalized_mse", "topk_relu", "batchtopk_relu", "jumprelu_ste", "heaviside_ste",
    "register_architecture", "get_architecture",
    "Architecture", "Accumulator", "site_width",
]
