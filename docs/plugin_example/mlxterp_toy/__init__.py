"""mlxterp-toy: an example third-party mlxterp plugin.

It adds the "toy" model family from a data file (toy.toml: no code about names at all) and
one analysis, ``model.residual_norms(text)``: the norm of the residual stream after every
layer at the last position, written against standard names only, so it works on every family.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlxterp import ArchitectureSchema, hookimpl


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
