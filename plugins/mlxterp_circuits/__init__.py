"""Attribution graphs (circuit tracing) on MLX: the direct linear effects between transcoder
features, error nodes, tokens and logits of a prompt's local replacement model, computed as
circuit-tracer computes them, pruned and scored, written for its frontend and Neuronpedia,
viewed offline, and tested by feature interventions.

``model.attribution_graph(prompt, tc)``, ``model.feature_intervention(prompt, [(layer, pos,
feature, value)], tc)``; ``mlxterp.load_graph(path)``.
"""

from __future__ import annotations

from mlxterp.plugin import hookimpl

from .attribution import attribution_graph
from .features import describe_features
from .graph import AttributionGraph, GraphScores, PrunedGraph
from .interventions import FeatureIntervention, feature_intervention
from .replacement import GraphError, prompt_ids

load_graph = AttributionGraph.load


@hookimpl
def mlxterp_analyses():
    return {"attribution_graph": attribution_graph, "feature_intervention": feature_intervention}


@hookimpl
def mlxterp_exports():
    return {"AttributionGraph": AttributionGraph, "load_graph": load_graph}


__all__ = ["AttributionGraph", "FeatureIntervention", "GraphError", "GraphScores", "PrunedGraph", "attribution_graph",
           "describe_features", "feature_intervention", "load_graph", "prompt_ids"]
