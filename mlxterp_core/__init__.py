"""mlxterp's implementation. Users import ``mlxterp``; this package may reorganise freely."""
