"""The result kit every plugin's results share: ``Serialisable`` (``to_data`` / ``save`` /
``load`` through cattrs, JSON on disk) and ``LayerMapping`` (read-only dict-like access by
layer). A saved file names its class (``"mlxterp_result"``), so :func:`load_result` reloads
it without the caller knowing which class it is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import cattrs

from .errors import FileFormatError
from .files import read_json, write_atomic

converter = cattrs.Converter()
KIND_KEY = "mlxterp_result"  # which result class a saved file holds
T = TypeVar("T", bound="Serialisable")


_KINDS: dict[str, type] = {}  # class name -> class, of every Serialisable result defined


def load_result(path: str | Path) -> Serialisable:
    """A result saved by ``.save(path)``, whichever class it is (the file names it): the
    plugins are loaded first, so any plugin's results reload."""
    from .plugins import plugin_manager

    plugin_manager()  # imports the plugins, which define their result classes
    kind = read_json(path, "a result saved by .save()").get(KIND_KEY)
    if kind not in _KINDS:
        known = ", ".join(sorted(_KINDS)[:8])
        raise FileFormatError(f"{path} holds {'no mlxterp result' if kind is None else f'a {kind}, a class no loaded plugin defines'} "
                              f"(results it can reload: {known}, ...); install the plugin that made it.")
    return _KINDS[kind].load(path)


class Serialisable:
    """``to_data`` (plain dicts and lists), ``save`` (JSON) and ``load`` for attrs results."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _KINDS[cls.__name__] = cls

    def to_data(self) -> dict[str, Any]:
        return converter.unstructure(self)

    @classmethod
    def from_data(cls: type[T], data: dict[str, Any]) -> T:
        return converter.structure(data, cls)

    def save(self, path: str | Path) -> Path:
        """Write JSON (atomically: an interrupted save leaves any earlier file whole)."""
        data = {KIND_KEY: type(self).__name__, **self.to_data()}
        return write_atomic(path, json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """A result saved by ``save``; a file that is not one is a FileFormatError."""
        expected = f"a {cls.__name__} saved by .save()"
        data = read_json(path, expected)
        kind = data.pop(KIND_KEY, cls.__name__)
        if kind != cls.__name__:
            raise FileFormatError(f"{path} holds a {kind}, not a {cls.__name__}: load it with {kind}.load().")
        try:
            return cls.from_data(data)
        except Exception as e:  # cattrs' grouped errors: name the fields that do not fit
            details = "; ".join(cattrs.transform_error(e)) if isinstance(e, cattrs.BaseValidationError) else str(e)
            raise FileFormatError(f"{path} is not {expected}: {details:.300}") from None


class LayerMapping:
    """Read-only dict-like access by layer (kept out of the class hierarchy of ``Mapping`` so
    that cattrs still sees an attrs class)."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def keys(self) -> list[int]:
        return list(self.layers)

    def values(self) -> list[Any]:
        return [self[layer] for layer in self.layers]

    def items(self) -> list[tuple[int, Any]]:
        return [(layer, self[layer]) for layer in self.layers]

    def get(self, layer: int, default: Any = None) -> Any:
        return self[layer] if layer in self.layers else default
