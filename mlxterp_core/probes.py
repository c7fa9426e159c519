"""Probes: see every module call of an ``mlx.nn.Module`` without changing the module.

A probe is installed by swapping one instance's class for a generated subclass whose
``__call__`` hands the call to the probe object stored on that instance. Nothing else changes:
the parameter tree, ``parameters()``, ``load_weights``, ``nn.quantize`` and every attribute the
model code reads stay exactly as they were, ``isinstance`` still holds, and removing the probe
restores the original class. Probes live only while a trace runs its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.nn as nn

from .errors import TraceError

# Instance attribute (kept in the object's __dict__, never among the module's parameters)
# that holds the active probe of a probed module.
_PROBE_ATTR = "_mlxterp_probe"
# Class attribute of a generated subclass that names the class it stands in for.
_ORIGINAL_ATTR = "_mlxterp_original_class"

_probed_classes: dict[type, type] = {}


def walk_modules(root: nn.Module, prefix: str = "model") -> list[tuple[str, nn.Module]]:
    """Every module under ``root`` with its dotted path, parents before children.

    Follows child modules, lists, tuples and dicts of modules the way ``Module.children()``
    does. A module reachable twice (shared, or through a cycle) is listed once, under the
    first path found.
    """
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(value: Any, path: str) -> None:
        # only containers can hold modules: parameters (arrays) and settings are skipped here,
        # not in a call per leaf
        if isinstance(value, nn.Module):
            if id(value) in seen:
                return
            seen.add(id(value))
            found.append((path, value))
            children = value.items()
        elif isinstance(value, dict):
            children = value.items()
        else:
            children = enumerate(value)
        for key, child in children:
            if isinstance(child, (dict, list, tuple)):  # nn.Module is a dict
                visit(child, f"{path}.{key}")

    visit(root, prefix)
    visit = None  # noqa: F841 (the closure refers to itself: break the cycle, free it now)
    return found


def _probed_class(cls: type) -> type:
    """The generated subclass of ``cls`` whose ``__call__`` consults the instance's probe."""
    probed = _probed_classes.get(cls)
    if probed is not None:
        return probed
    original_call = cls.__call__

    def __call__(self, *args, **kwargs):
        probe = self.__dict__.get(_PROBE_ATTR)
        if probe is None:  # installed but idle: behave exactly like the original
            return original_call(self, *args, **kwargs)
        return probe(original_call, self, args, kwargs)

    probed = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            _ORIGINAL_ATTR: cls,
        },
    )
    _probed_classes[cls] = probed
    return probed


def is_probed(module: nn.Module) -> bool:
    return _ORIGINAL_ATTR in type(module).__dict__


Probe = Callable[[Callable, nn.Module, tuple, dict], Any]


class probes_installed:  # noqa: N801 (used as a context manager, like contextlib's)
    """Install ``probe`` on each module for the duration of the block, then restore it.

    A probe of ``None`` installs an idle probe (the generated class, no recording), which is
    how tests show that probing alone changes nothing. Restoration runs whatever happens in
    the block, so an exception never leaves a probe behind.
    """

    __slots__ = ("_targets", "_installed")

    def __init__(self, targets: list[tuple[nn.Module, Probe | None]]):
        self._targets = targets
        # (module, its class before): one dict lookup per module on the way in, none on the
        # way out; a trace of every module installs a few hundred of these
        self._installed: list[tuple[nn.Module, type]] = []

    def __enter__(self) -> None:
        installed = self._installed
        try:
            for module, probe in self._targets:
                cls = type(module)
                probed = _probed_classes.get(cls)
                if probed is None:
                    if _ORIGINAL_ATTR in cls.__dict__:
                        raise TraceError(
                            f"{cls.__name__} is already probed: a trace is running on this "
                            "model (traces cannot start inside an intervention of another trace)."
                        )
                    probed = _probed_class(cls)
                # object.__setattr__: nn.Module.__setattr__ would type-check every assignment
                object.__setattr__(module, "__class__", probed)
                installed.append((module, cls))
                if probe is not None:
                    module.__dict__[_PROBE_ATTR] = probe  # the instance dict, not its parameters
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        installed, self._installed = self._installed, []
        for module, cls in installed:
            module.__dict__.pop(_PROBE_ATTR, None)
            object.__setattr__(module, "__class__", cls)
