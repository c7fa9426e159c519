"""Upstream mlxterp's activation helpers, over mlxterp's traces and ``mlxterp.probes.collect``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from mlxterp.plugin import Activations
from mlxterp_probes import collect

ActivationCache = Activations
"""What :func:`collect_activations` returns: a trace's activations, looked up by raw name, by
standard name, or by a module path without the leading ``model.`` (``cache.get("layers.3")``)."""


def get_activations(model, prompts: str | Sequence[str], layers: list[int] | None = None,
                    positions: int | list[int] = -1) -> dict[str, mx.array]:
    """``{"layer_i": (N, D)}``: each prompt's residual stream leaving block i at ``positions``
    ((N, P, D) for a list of them), float32. A position counts from each prompt's own start, a
    negative one from its own last real token: padding is never read (upstream reads the
    right-padded batch's last column)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return batch_get_activations(model, prompts, layers, positions, batch_size=len(prompts))


def batch_get_activations(model, prompts: Sequence[str], layers: list[int] | None = None,
                          positions: int | list[int] = -1, batch_size: int = 8) -> dict[str, mx.array]:
    """:func:`get_activations`, ``batch_size`` prompts per forward pass."""
    layers = list(range(len(model.layers))) if layers is None else list(layers)
    sites = [f"layers.{i}" for i in layers]  # the standard name, or the block's module without a schema
    several = not isinstance(positions, int)
    per_position = [collect(model, list(prompts), sites, position=p, batch_size=batch_size, progress=False)
                    for p in (positions if several else [positions])]  # each (S, N, D)
    stacked = mx.stack(per_position, axis=2) if several else per_position[0]
    return {f"layer_{i}": stacked[k] for k, i in enumerate(layers)}


def collect_activations(model, inputs: Any, layers: list[str] | None = None) -> ActivationCache:
    """The activations of one forward pass of ``inputs``: at ``layers`` (any names a trace
    takes, ``"layers.3"``, ``"layers.0.self_attn"``), or everywhere. Keys stay raw names
    (``model.model.layers.3``); every form of a name looks them up."""
    return model.run(inputs, capture=layers).activations
