"""What MLX runs on here: the device, and the versions, for benchmark and `info` output."""

from __future__ import annotations

import importlib.metadata

import mlx.core as mx


def describe() -> str:
    device = mx.default_device()
    return f"{device}, mlx {importlib.metadata.version('mlx')}"
