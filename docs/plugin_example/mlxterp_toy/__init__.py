"""mlxterp-toy: an example third-party mlxterp plugin.

It adds the "toy" model family from a data file (toy.toml: no code about names at all), one
analysis, ``model.residual_norms(text)`` (the norm of the residual stream after every layer at
the last position, written against standard names only, so it works on every family), one
intervention type, ``iv.project_out(direction)``, and one command, ``mlxterp residual-norms``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlxterp.plugin import ArchitectureSchema, Intervention, hookimpl, load


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


def residual_norms_command(args) -> int:
    """``mlxterp residual-norms [MODEL] [--text TEXT]``: print the norms, one layer a line."""
    model = load(args.model)
    for layer, norm in enumerate(residual_norms(model, args.text)):
        print(f"layer {layer:3d}  {norm:9.2f}")
    return 0  # the exit code


@hookimpl
def mlxterp_commands(subparsers):
    command = subparsers.add_parser("residual-norms", help="the residual stream's norm after every layer")
    command.add_argument("model", nargs="?", help="a .gguf file, an mlx-lm directory or a repo id (default: the default model)")
    command.add_argument("--text", default="The capital of France is")
    command.set_defaults(handler=residual_norms_command)
