"""mlxterp's first-party architecture plugin: one schema file per model family.

Every ``schemas/*.toml`` file here is an :class:`~mlxterp_core.schema.ArchitectureSchema`;
adding a family that only differs in names is adding a file. The plugin is registered through
the ``mlxterp`` entry-point group in pyproject.toml, like any third-party plugin.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from mlxterp.plugin import hookimpl
from mlxterp.plugin import ArchitectureSchema

SCHEMA_DIR = Path(__file__).parent / "schemas"


@cache
def _schemas() -> tuple[ArchitectureSchema, ...]:
    return tuple(ArchitectureSchema.from_file(path) for path in sorted(SCHEMA_DIR.glob("*.toml")))


@hookimpl
def mlxterp_architectures():
    return list(_schemas())
