"""The plugin manager: loads the ``mlxterp`` entry-point group, first-party plugins included.

Which third-party plugins load: all of them, unless the environment variable
``MLXTERP_LOAD_PLUGINS`` is set to a comma-separated list of entry-point names (empty: none),
or :func:`load_plugins` is called with such a list. mlxterp's own plugins always load.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "mlxterp"
FIRST_PARTY = "mlxterp"  # the distribution whose entry points are mlxterp's own plugins

_manager: pluggy.PluginManager | None = None
_tables: dict[str, dict[str, Any]] = {}  # hook name -> merged {name: object}; reset on (re)registration


def load_plugins(third_party: Iterable[str] | None = None) -> pluggy.PluginManager:
    """(Re)build the plugin manager: first-party plugins, plus the named third-party ones
    (all of them when ``third_party`` is None)."""
    global _manager
    chosen = None if third_party is None else set(third_party)
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: _is_third_party(ep)):
        if _is_third_party(ep) and chosen is not None and ep.name not in chosen:
            continue
        if manager.get_plugin(ep.name) is not None:
            continue
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as e:  # a broken plugin must not break mlxterp
            warnings.warn(f"mlxterp plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}", stacklevel=2)
    _manager = manager
    _tables.clear()
    return manager


def _is_third_party(ep) -> bool:
    return ep.dist is None or ep.dist.name != FIRST_PARTY


def plugin_manager() -> pluggy.PluginManager:
    if _manager is None:
        selection = os.environ.get("MLXTERP_LOAD_PLUGINS")
        load_plugins(None if selection is None else [n for n in selection.split(",") if n.strip()])
    return _manager


def register(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module in this process (a notebook's own plugin)."""
    _tables.clear()
    return plugin_manager().register(plugin, name=name)


def call_each(hook_name: str, **kwargs) -> list[tuple[str, Any]]:
    """Call every implementation of a hook separately: (plugin name, result) for those that
    answered; one that raises is reported by name in a warning and skipped."""
    results = []
    for impl in getattr(plugin_manager().hook, hook_name).get_hookimpls()[::-1]:
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception as e:
            warnings.warn(f"mlxterp plugin {impl.plugin_name!r} raised in {hook_name}: {type(e).__name__}: {e}", stacklevel=3)
            continue
        if result is not None:
            results.append((impl.plugin_name, result))
    return results


def schemas() -> list[tuple[str, Any]]:
    """(plugin name, ArchitectureSchema) for every schema the plugins provide."""
    return [(name, schema) for name, found in call_each("mlxterp_architectures") for schema in found]


def families_with(sub: str) -> list[str]:
    """Families whose schema maps the block-level standard name ``sub``."""
    from .names import DERIVED_BLOCK_NAMES, HEAD_VIEWS

    base = HEAD_VIEWS.get(sub, sub)
    if base in DERIVED_BLOCK_NAMES and base != "attn.pattern":
        return sorted({s.family for _, s in schemas()})
    return sorted({s.family for _, s in schemas() if base in s.block or (base == "attn.pattern" and s.attention.pattern)})


def _merged(hook_name: str) -> dict[str, Any]:
    """The {name: object} tables a hook returns, merged: first-party first, third-party plugins
    override; cached until plugins change (attribute lookups on a model consult it)."""
    if hook_name not in _tables:
        found: dict[str, Any] = {}
        for _, table in call_each(hook_name)[::-1]:
            found.update(table)
        _tables[hook_name] = found
    return _tables[hook_name]


def intervention_types() -> dict[str, Any]:
    """name -> intervention factory, from every plugin."""
    return _merged("mlxterp_interventions")


def analyses() -> dict[str, Any]:
    """name -> analysis function, from every plugin."""
    return _merged("mlxterp_analyses")


def bench_rows() -> dict[str, Any]:
    """key -> benchmark row function, from every plugin."""
    return _merged("mlxterp_bench_rows")


def exports() -> dict[str, Any]:
    """name -> public object (class, module) from every plugin, for ``mlxterp.<name>``."""
    return _merged("mlxterp_exports")
