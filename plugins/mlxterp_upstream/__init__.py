"""Upstream mlxterp's public names (github.com/coairesearch/mlxterp), each a thin alias over
mlxterp's own function, so that code written for it runs unchanged where its API is sound:
``mlxterp.get_activations``, ``batch_get_activations``, ``collect_activations``,
``ActivationCache``, the interventions at the top level (``mlxterp.zero_out`` ...,
``InterventionComposer``), ``mlxterp.visualization``, and ``model.load_sae(path)``,
``model.load_tuned_lens(path)``. docs/guide/migrating.md has the table of upstream calls and ours.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl, interventions

from . import visualization
from .activations import ActivationCache, batch_get_activations, collect_activations, get_activations
from .files import load_sae, load_tuned_lens


@hookimpl
def mlxterp_exports():
    names = ("zero_out", "scale", "add_vector", "replace_with", "clamp", "noise", "InterventionComposer")
    return {
        **{name: getattr(interventions, name) for name in names},
        "get_activations": get_activations,
        "batch_get_activations": batch_get_activations,
        "collect_activations": collect_activations,
        "ActivationCache": ActivationCache,
        "visualization": visualization,
    }


@hookimpl
def mlxterp_analyses():
    return {"load_sae": load_sae, "load_tuned_lens": load_tuned_lens}


__all__ = ["batch_get_activations", "collect_activations", "get_activations", "load_sae", "load_tuned_lens",
           "visualization"]  # ActivationCache is mlxterp.Activations: documented there
