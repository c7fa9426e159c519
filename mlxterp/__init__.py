"""mlxterp: mechanistic interpretability for MLX models.

The public API. Everything here is re-exported from ``mlxterp_core``, which implements it::

    from mlxterp import InterpretableModel, interventions as iv
"""

from mlxterp_core import __version__, interventions
from mlxterp_core.architecture import Architecture
from mlxterp_core.dataset import ActivationDataset, DatasetError
from mlxterp_core.corpus import Windows, default_corpus, read_documents, token_windows
from mlxterp_core.hookspecs import hookimpl
from mlxterp_core.plugins import load_plugins, register as register_plugin
from mlxterp_core.schema import ArchitectureSchema, Attention, Port, SchemaError, Unembed
from mlxterp_core.errors import (
    CorpusError,
    FileFormatError,
    InputError,
    InterventionError,
    MlxterpError,
    OptionError,
    ResultIndexError,
    TraceError,
    UnknownNameError,
)
from mlxterp_core.load import default_model_path
from mlxterp_core.model import InterpretableModel, load
from mlxterp_core.results import load_result
from mlxterp_core.distributed import launch_mode
from mlxterp_core.sharding import ShardingError
from mlxterp_core.trace import MODEL_OUTPUT, Activations, Trace

__all__ = [
    "__version__",
    "InterpretableModel",
    "load",
    "default_model_path",
    "ArchitectureSchema",
    "Architecture",
    "Port",
    "Attention",
    "Unembed",
    "SchemaError",
    "hookimpl",
    "load_plugins",
    "register_plugin",
    "interventions",
    "Trace",
    "Activations",
    "MODEL_OUTPUT",
    "MlxterpError",
    "UnknownNameError",
    "InterventionError",
    "InputError",
    "OptionError",
    "ResultIndexError",
    "FileFormatError",
    "TraceError",
    "CorpusError",
    "read_documents",
    "token_windows",
    "default_corpus",
    "Windows",
    "ActivationDataset",
    "DatasetError",
    "load_result",
    "launch_mode",
    "ShardingError",
]


def __getattr__(name: str):
    """Public classes and modules of plugins (the ``mlxterp_exports`` hook): ``mlxterp.TunedLens``."""
    if name.startswith("__"):  # the import system's own questions
        raise AttributeError(name)
    from mlxterp_core.plugins import exports

    found = exports()
    if name in found:
        return found[name]
    raise AttributeError(f"module 'mlxterp' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, plugins' exports included (tab completion: ``mlxterp.TunedLens``)."""
    from mlxterp_core.plugins import exports

    return sorted({*globals(), *exports()})
