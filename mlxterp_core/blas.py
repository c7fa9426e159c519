"""An optimized BLAS for MLX's CPU backend on Linux, loaded before MLX is.

MLX's Linux CPU wheel links the reference BLAS: a 1024^3 float32 matmul runs at ~6 GFLOP/s on
a 2-core x86 machine. Symbols of a library loaded into the process with RTLD_GLOBAL before
``mlx.core`` win over that reference BLAS, so with Intel MKL (the ``mkl`` wheel, a dependency
on Linux x86-64) loaded first the same matmul runs 15-30x faster. Results change only by
float rounding.

This module must not import mlx. ``mlxterp_core/__init__.py`` calls :func:`load` first thing,
and so does the ``mlxterp.pth`` startup hook (``_mlxterp_startup.py``, installed with the
package) just before anything imports ``mlx.core``, so the import order of a script does not
matter. It does nothing on macOS (Accelerate), on the CUDA backend, when
``MLXTERP_BLAS=reference`` is set, or when mlx was imported before mlxterp without the hook
(then the state says so, and ``mlxterp.load()`` keeps quantized weights quantized, which is
faster than dequantized ones on the reference BLAS).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path

state = "not attempted"
"""What happened, for ``mlxterp info`` and the benchmark: the library loaded, or why not."""


def _library(distribution: str, stem: str) -> Path | None:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith(stem) and ".so" in file.name:
            return Path(file.locate()).resolve()
    return None


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def optimized() -> bool:
    """Whether MLX's CPU matmuls run on an optimized BLAS in this process (MKL, Accelerate)."""
    return state.startswith(("Intel MKL", "platform BLAS"))


def load() -> str:
    """Load MKL's single dynamic library into the process if it makes sense here."""
    global state
    if state != "not attempted":
        return state
    if sys.platform != "linux":
        state = "platform BLAS (not Linux)"
    elif os.environ.get("MLXTERP_BLAS", "").lower() in ("reference", "off", "0"):
        state = "reference BLAS (MLXTERP_BLAS=reference)"
    elif any(_has_distribution(d) for d in ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13")):
        state = "not needed (CUDA backend installed)"
    elif "mlx.core" in sys.modules:
        state = ("reference BLAS (mlx was imported before mlxterp and mlxterp.pth did not run at "
                 "startup: reinstall mlxterp, or import mlxterp first)")
    else:
        library = _library("mkl", "libmkl_rt")
        if library is None:
            state = "reference BLAS (install the 'mkl' package for a faster CPU backend)"
        else:
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                state = f"Intel MKL {importlib.metadata.version('mkl')} ({library.name})"
            except OSError as e:
                state = f"reference BLAS (loading {library.name} failed: {e})"
    return state
