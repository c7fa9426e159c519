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

import mlx.core as mx
import mlx.nn as nn

from .errors import TraceError

# Instance attribute (kept in the object's __dict__, never among the module's parameters)
# that holds the active probe of a probed module.
PROBE_ATTR = "_mlxterp_probe"
# Class attribute of a generated subclass that names the class it stands in for.
_ORIGINAL_ATTR = "_mlxterp_original_class"

_CONTAINERS = (dict, list, tuple)
_probed_classes: dict[Callable, dict[type, type]] = {}  # make_call -> class -> probed class


def walk_modules(root: nn.Module, prefix: str = "model") -> list[tuple[str, nn.Module]]:
    """Every module under ``root`` with its dotted path, parents before children.

    Follows child modules, lists, tuples and dicts of modules the way ``Module.children()``
    does. A module reachable twice (shared, or through a cycle) is listed once, under the
    first path found.
    """
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    array, module_type = mx.array, nn.Module

    def visit(value: Any, path: str) -> None:
        if isinstance(value, module_type):
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
            # only containers (nn.Module is a dict) can hold modules; most leaves are
            # parameters, skipped by the cheapest test first
            if type(child) is not array and isinstance(child, _CONTAINERS):
                visit(child, path + "." + str(key))

    visit(root, prefix)
    visit = None  # noqa: F841 (the closure refers to itself: break the cycle, free it now)
    return found


def consult_probe(original_call: Callable) -> Callable:
    """The probed classes' ``__call__``: hand the call to the instance's probe, or behave
    exactly like the original when it has none (installed but idle)."""

    def __call__(self, *args, **kwargs):
        probe = self.__dict__.get(PROBE_ATTR)
        if probe is None:
            return original_call(self, *args, **kwargs)
        return probe(original_call, self, args, kwargs)

    return __call__


def _probed_class(cls: type, make_call: Callable[[Callable], Callable] = consult_probe) -> type:
    """The generated subclass of ``cls`` whose ``__call__`` is ``make_call(cls.__call__)``."""
    classes = _probed_classes.setdefault(make_call, {})
    probed = classes.get(cls)
    if probed is not None:
        return probed
    probed = stand_in(cls, make_call(cls.__call__), _ORIGINAL_ATTR)
    classes[cls] = probed
    return probed


def stand_in(cls: type, call: Callable, marker: str) -> type:
    """A subclass of ``cls`` that looks like it (name, module, qualified name) and differs only
    in its ``__call__``; the class attribute ``marker`` names ``cls``, so an instance swapped
    to it can be swapped back (``object.__setattr__(module, "__class__", ...)``)."""
    return type(cls.__name__, (cls,), {
        "__call__": call,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        marker: cls,
    })


def is_probed(module: nn.Module) -> bool:
    return _ORIGINAL_ATTR in type(module).__dict__


Probe = Callable[[Callable, nn.Module, tuple, dict], Any]


class probes_installed:  # noqa: N801 (used as a context manager, like contextlib's)
    """Install ``probe`` on each module for the duration of the block, then restore it.

    A probe of ``None`` installs an idle probe (the generated class, no recording), which is
    how tests show that probing alone changes nothing. Restoration runs whatever happens in
    the block, so an exception never leaves a probe behind.

    ``make_call``: how the generated classes' ``__call__`` is made from the original's; by
    default it calls the probe (:func:`consult_probe`). Another one may run what a probe
    would, itself, with whatever it finds as the instance's probe (one Python call less per
    module call, where a trace probes every module).
    """

    __slots__ = ("_targets", "_installed", "_classes", "_make_call")

    def __init__(self, targets: list[tuple[nn.Module, Any]], make_call: Callable[[Callable], Callable] = consult_probe):
        self._targets = targets
        self._make_call = make_call
        self._classes = _probed_classes.setdefault(make_call, {})
        # (module, its class before): one dict lookup per module on the way in, none on the
        # way out; a trace of every module installs a few hundred of these
        self._installed: list[tuple[nn.Module, type]] = []

    def __enter__(self) -> None:
        installed = self._installed
        classes = self._classes
        try:
            for module, probe in self._targets:
                cls = type(module)
                probed = classes.get(cls)
                if probed is None:
                    if _ORIGINAL_ATTR in cls.__dict__:
                        raise TraceError(
                            f"{cls.__name__} is already probed: a trace is running on this "
                            "model (traces cannot start inside an intervention of another trace)."
                        )
                    probed = _probed_class(cls, self._make_call)
                # object.__setattr__: nn.Module.__setattr__ would type-check every assignment
                object.__setattr__(module, "__class__", probed)
                installed.append((module, cls))
                if probe is not None:
                    module.__dict__[PROBE_ATTR] = probe  # the instance dict, not its parameters
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        installed, self._installed = self._installed, []
        for module, cls in installed:
            module.__dict__.pop(PROBE_ATTR, None)
            object.__setattr__(module, "__class__", cls)
