"""mlxterp's implementation. Users import ``mlxterp``; this package may reorganise freely."""

import importlib.metadata

from . import blas

blas.load()  # before anything imports mlx: see blas.py

try:
    __version__ = importlib.metadata.version("mlxterp")
except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
    __version__ = "0+unknown"
