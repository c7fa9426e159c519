"""mlxterp: mechanistic interpretability for MLX models.

The public API. Everything here is re-exported from ``mlxterp_core``, which implements it::

    from mlxterp import InterpretableModel, interventions as iv
"""

from mlxterp_core import interventions
from mlxterp_core.errors import (
    InputError,
    InterventionError,
    MlxterpError,
    TraceError,
    UnknownNameError,
)
from mlxterp_core.model import InterpretableModel
from mlxterp_core.trace import MODEL_OUTPUT, Activations, Trace

__all__ = [
    "InterpretableModel",
    "interventions",
    "Trace",
    "Activations",
    "MODEL_OUTPUT",
    "MlxterpError",
    "UnknownNameError",
    "InterventionError",
    "InputError",
    "TraceError",
]
