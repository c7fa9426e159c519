"""``mlxterp.interventions``: re-exported from ``mlxterp_core.interventions``."""

from mlxterp_core.interventions import *  # noqa: F401,F403
from mlxterp_core.interventions import __all__  # noqa: F401
