"""The result kit every plugin's results share: ``Serialisable`` (``to_data`` / ``save`` /
``load`` through cattrs, JSON on disk), ``LayerMapping`` (read-only dict-like access by
layer) and ``index_of`` (where a layer, head or label is in a result, negative indices
counted from the end, a clear error for one it lacks). A saved file names its class
(``"mlxterp_result"``), so :func:`load_result` reloads it without the caller knowing which
class it is."""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import cattrs

from .errors import FileFormatError, ResultIndexError, did_you_mean
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


def index_of(keys: Sequence[Any], key: Any, what: str = "layer", owner: str = "result") -> int:
    """Where ``key`` is in ``keys`` (a result's layers, heads or labels).

    Integer keys (layers, heads) are looked up by value, and a negative one that is not among
    them counts from the end, as in a Python sequence: with layers 0..29, ``-1`` is layer 29;
    with layers [3, 7], ``-1`` is layer 7. A key that is not there is a
    :class:`ResultIndexError` (a KeyError and an IndexError) naming what ``owner`` has.
    """
    keys = list(keys)
    number = _integer(key)
    numbered = bool(keys) and all(_integer(k) is not None for k in keys)
    if numbered and number is not None:
        key = number
        if key in keys:
            return keys.index(key)
        if -len(keys) <= key < 0:
            return len(keys) + key
    elif not numbered and key in keys:
        return keys.index(key)
    if numbered:
        negative = f" (or -{len(keys)}..-1 counted from the end)"
        raise ResultIndexError(f"{what} {key!r} is not in this {owner}: it has {what}s {_describe(keys)}{negative}.")
    shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    hint = did_you_mean(key, map(str, keys)) if isinstance(key, str) else ""
    raise ResultIndexError(f"{what} {key!r} is not in this {owner}; it has {len(keys)}: {shown}.{hint}")


def _integer(key: Any) -> int | None:
    """``key`` as an int if it is an integer (numpy's included, bool not), else None."""
    if isinstance(key, bool):
        return None
    try:
        return operator.index(key)
    except TypeError:
        return None


def _describe(keys: list[int]) -> str:
    """'0..29' for a run of consecutive numbers, else the numbers (a few of them)."""
    if not keys:
        return "none"
    if keys == list(range(keys[0], keys[0] + len(keys))) and len(keys) > 2:
        return f"{keys[0]}..{keys[-1]}"
    if len(keys) <= 8:
        return str(keys)
    return f"[{', '.join(map(str, keys[:3]))}, ..., {', '.join(map(str, keys[-2:]))}] ({len(keys)} in all)"


class LayerMapping:
    """Read-only dict-like access by layer (kept out of the class hierarchy of ``Mapping`` so
    that cattrs still sees an attrs class).

    The keys are ``self.layers``; ``result[-1]`` is the last of them, as in a sequence, and a
    layer the result lacks is a :class:`ResultIndexError` naming the layers it has. A subclass
    writes ``__getitem__`` with :meth:`_position` (where a layer is in ``self.layers``).
    """

    def _position(self, layer: Any) -> int:
        return index_of(self.layers, layer, "layer", type(self).__name__)

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
        try:
            return self[layer]
        except ResultIndexError:
            return default
