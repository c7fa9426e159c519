"""mlxterp's implementation. Users import ``mlxterp``; this package may reorganise freely."""

from . import blas

blas.load()  # before anything imports mlx: see blas.py
