"""mlxterp's first-party analyses: logit lens, activation patching, steering, generation.

Each is a function ``f(model, ...)`` registered through the ``mlxterp_analyses`` hook, so it
appears as ``model.f(...)`` on every InterpretableModel; each is written against standard names
and the architecture schema only, never one family's module paths.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .attribution import attribution_patching
from .decomposition import accumulated_resid, decompose_resid, direct_logit_attribution
from .patterns import attention_patterns
from .unembed import (
    get_token_predictions,
    layers_per_chunk,
    lens_fields,
    logit_lens,
    prediction_rows,
    project,
    test_prompt,
    token_namer,
    top_of_logits,
)
from .patching import MEMORY_BUDGET as PATCHING_MEMORY_BUDGET
from .patching import activation_patching
from .plots import lens_heatmap
from .results import (
    AttentionLayers,
    AttentionPatterns,
    AttributionResult,
    DLAResult,
    GenerationResult,
    LogitLensResult,
    PatchingResult,
    PromptCheck,
    ResidComponents,
    SteeringVector,
)
from .steering import generate, steering_vector


@hookimpl
def mlxterp_analyses():
    return {
        "get_token_predictions": get_token_predictions,
        "test_prompt": test_prompt,
        "logit_lens": logit_lens,
        "activation_patching": activation_patching,
        "attribution_patching": attribution_patching,
        "decompose_resid": decompose_resid,
        "accumulated_resid": accumulated_resid,
        "direct_logit_attribution": direct_logit_attribution,
        "attention_patterns": attention_patterns,
        "steering_vector": steering_vector,
        "generate": generate,
    }


__all__ = [
    "AttentionLayers",
    "AttentionPatterns",
    "DLAResult",
    "ResidComponents",
    "accumulated_resid",
    "attention_patterns",
    "decompose_resid",
    "direct_logit_attribution",
    "AttributionResult",
    "attribution_patching",
    "GenerationResult",
    "LogitLensResult",
    "PromptCheck",
    "PatchingResult",
    "SteeringVector",
    "activation_patching",
    "generate",
    "get_token_predictions",
    "logit_lens",
    "steering_vector",
    "test_prompt",
    # the logit lens's pieces, for other lenses (mlxterp_lenses)
    "layers_per_chunk",
    "lens_fields",
    "prediction_rows",
    "project",
    "token_namer",
    "top_of_logits",
    "lens_heatmap",
    "PATCHING_MEMORY_BUDGET",  # bytes per batched forward of a patching sweep (the default budget)
]
