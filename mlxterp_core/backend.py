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
        conflict = library_conflict()
        if conflict:
            text += f"; {conflict}"
    return text


def library_conflict() -> str | None:
    """Why MLX runs on the CPU although a CUDA build is installed, if that is the case.

    ``mlx-cpu`` and ``mlx-cuda-12``/``-13`` each ship ``mlx/lib/libmlx.so``; with both
    installed (``pip install ".[cuda]"`` pulls both in) the one unpacked last wins. The sizes in
    the distributions' RECORD files say whose library is on disk.
    """
    def library(name: str):
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        return next((f for f in files if f.name == "libmlx.so"), None)

    cpu = library("mlx-cpu")
    for cuda_name in ("mlx-cuda-13", "mlx-cuda-12"):
        cuda = library(cuda_name)
        if cpu is None or cuda is None:
            continue
        try:
            size = cuda.locate().stat().st_size
        except OSError:
            return None
        if size != cuda.size:
            version = importlib.metadata.version(cuda_name)
            return (f"mlx-cpu's libmlx.so replaced {cuda_name}'s, so MLX has no GPU: run "
                    f"python -m pip install --force-reinstall --no-deps {cuda_name}=={version}")
    return None


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
