"""``mlxterp.interventions``: re-exported from ``mlxterp_core.interventions``."""

import sys

from mlxterp_core import interventions as _implementation

# ``mlxterp.interventions`` is the implementation module itself, so that intervention types
# added by plugins (its module-level __getattr__) appear here too.
sys.modules[__name__] = _implementation
