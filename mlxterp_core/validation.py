"""Wrap-time validation: a 3-token forward pass checks a family's schema against the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .invariants import check_all
from .schema import SchemaError

if TYPE_CHECKING:
    from .model import InterpretableModel

VALIDATION_IDS = [0, 1, 2]


def validate_architecture(model: InterpretableModel) -> None:
    """Raise SchemaError naming the schema field and the plugin when a check fails."""
    arch = model.architecture
    layers = {0, arch.n_layers - 1}
    failed = [c for c in check_all(model, VALIDATION_IDS, layers, thorough=False) if c.passed is False]
    if failed:
        lines = [f"  {c.name}: {c.detail}" + (f" (schema field: {c.field})" if c.field else "") for c in failed]
        raise SchemaError(
            f"schema {arch.family!r} from plugin {arch.plugin!r} does not fit this "
            f"{type(model.model).__name__}:\n" + "\n".join(lines) + "\nFix the schema fields named, "
            "or pass validate=False to wrap it anyway (standard names may then be wrong)."
        )
