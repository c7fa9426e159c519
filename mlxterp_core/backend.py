"""What MLX runs on here: the device, and the versions, for benchmark and `info` output."""

from __future__ import annotations

import importlib.metadata

import mlx.core as mx


from . import blas


def describe() -> str:
    """The device, MLX version and (on the CPU) which BLAS serves matmuls."""
    device = mx.default_device()
    text = f"{device}, mlx {importlib.metadata.version('mlx')}"
    if device.type == mx.cpu:
        text += f", BLAS: {blas.state}"
    return text


def on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def reduced_float32_matmul() -> bool:
    """Whether float32 matmuls run at TF32 precision (10-bit mantissa): MLX's CUDA backend does
    unless ``MLX_ENABLE_TF32=0`` is set before MLX starts."""
    import os

    return (
        mx.default_device().type == mx.gpu
        and mx.cuda.is_available()
        and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    )
