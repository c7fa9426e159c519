"""``mlxterp.visualization``: upstream mlxterp's attention functions, re-exported from the plugin
that provides them through the ``mlxterp_exports`` hook (``mlxterp_upstream``)."""

import sys

from mlxterp_core.plugins import exports

sys.modules[__name__] = exports()["visualization"]  # this name is that module
