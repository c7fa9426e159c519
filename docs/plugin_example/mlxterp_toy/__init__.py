"""mlxterp-toy: an example third-party mlxterp plugin.

It adds the "toy" model family from a data file (toy.toml: no code about names at all), one
analysis, ``model.residual_norms(text)`` (the norm of the residual stream after every layer at
the last position, written against standard names only, so it works on every family), and one
intervention type, ``iv.project_out(direction)``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlxterp import ArchitectureSchema, hookimpl
from mlxterp.interventions import Intervention


@hookimpl
def mlxterp_architectures():
    return [ArchitectureSchema.from_file(Path(__file__).parent / "toy.toml")]


def residual_norms(model, inputs) -> list[float]:
    """L2 norm of ``layers[i].output`` at the last position, for every layer i."""
    trace = model.run(inputs, capture=["layers[*].output"])
    stacked = trace.activations["layers[*].output"]  # (L, B, T, D)
    return mx.linalg.norm(stacked[:, 0, -1, :], axis=-1).tolist()


@hookimpl
def mlxterp_analyses():
    return {"residual_norms": residual_norms}


def project_out(direction) -> Intervention:
    """Remove the component of the activation along ``direction`` (a (D,) vector): directional
    ablation, as in refusal-direction studies."""
    unit = mx.array(direction, dtype=mx.float32)
    unit = unit / mx.linalg.norm(unit)

    def ablate(x: mx.array) -> mx.array:
        along = (x.astype(mx.float32) @ unit)[..., None] * unit
        return (x.astype(mx.float32) - along).astype(x.dtype)

    return Intervention(ablate, "project_out")


@hookimpl
def mlxterp_interventions():
    return {"project_out": project_out}
