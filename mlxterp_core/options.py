"""Checks of the options an analysis is called with, at its boundary, before anything runs.

Every check returns the value normalised (negative layer and position indices counted from
the end, as Python counts them) or raises :class:`OptionError` naming the option, the value
given and the range allowed. Analyses call these first, so a bad option never reaches a
kernel (an index past an array reads whatever memory lies there) and never wraps silently.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from .errors import OptionError


def integer(value: Any, option: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either bound optional); bools are not integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, mx.array) and value.size == 1 and mx.issubdtype(value.dtype, mx.integer):
            value = value.item()
        else:
            raise OptionError(f"{option}={value!r:.60}: expected an integer.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low}, {high}]" if low is not None and high is not None else (f">= {low}" if low is not None else f"<= {high}")
        raise OptionError(f"{option}={value} is out of range: it must be {span}.")
    return value


def number(value: Any, option: str, low: float | None = None, high: float | None = None, *,
           open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite float in [low, high] (``open_low``/``open_high``: the bound itself
    excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{option}={value!r:.60}: expected a number.")
    value = float(value)
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if value != value or abs(value) == float("inf") or too_low or too_high:
        if high is None:
            bounds = f"{'>' if open_low else '>='} {low}" if low is not None else "finite"
        else:
            bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise OptionError(f"{option}={value} is out of range: it must be {'in ' if high is not None else ''}{bounds}.")
    return value


def index(value: Any, size: int, option: str, what: str, given: Any = None) -> int:
    """One index into ``size`` things (layers, positions, heads); -1 is the last. ``given``:
    the whole option value, for the message (when ``value`` is one item of a list)."""
    i = integer(value, option)
    if not -size <= i < size:
        raise OptionError(
            f"{option}={value if given is None else given!r:.60}: {what} {i} does not exist; there are {size} {what}s "
            f"(0 .. {size - 1}, or -{size} .. -1 from the end)."
        )
    return i % size


def indices(values: Any, size: int, option: str, what: str) -> list[int]:
    """A list of indices (a single int is a list of one); negatives count from the end."""
    if isinstance(values, (int, numbers.Integral)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, mx.array):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise OptionError(f"{option}={values!r:.60}: expected a list of {what} indices.")
    if not len(values):
        raise OptionError(f"{option}=[]: give at least one {what}, or leave it out for all.")
    return [index(v, size, option, what, given=values) for v in values]


def layers(value: Any, n_layers: int, option: str = "layers") -> list[int]:
    """The layers an analysis covers: None is every layer."""
    return list(range(n_layers)) if value is None else indices(value, n_layers, option, "layer")


def layer(value: Any, n_layers: int, option: str = "layer") -> int:
    return index(value, n_layers, option, "layer")


def positions(value: Any, length: int, option: str = "positions") -> list[int]:
    """Token positions of a prompt of ``length`` tokens."""
    return indices(value, length, option, "position")


def top_k(value: Any, vocab_size: int | None, option: str = "top_k") -> int:
    """How many top tokens: 1 .. vocab_size (no upper bound when the vocabulary is unknown)."""
    return integer(value, option, 1, vocab_size)


def choice(value: Any, allowed: Sequence[str], option: str) -> str:
    if value not in allowed:
        raise OptionError(f"{option}={value!r:.60}: choose one of {', '.join(map(repr, allowed))}.")
    return value


def prompts(value: Any, option: str) -> list[Any]:
    """One prompt or several, as a non-empty list (a prompt is a string or a list of ids)."""
    if isinstance(value, str) or (isinstance(value, Sequence) and value and all(isinstance(t, int) for t in value)):
        return [value]
    if isinstance(value, mx.array):
        return [value] if value.ndim == 1 else list(value)
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise OptionError(f"{option}={value!r:.60}: expected a prompt or a list of prompts.")
    if not value:
        raise OptionError(f"{option}=[]: give at least one prompt.")
    return list(value)


def token(value: Any, vocab_size: int | None, option: str) -> int:
    """A token id used to index the logits (an answer): in [0, vocab_size)."""
    return integer(value, option, 0, None if vocab_size is None else vocab_size - 1)


def metric(fn: Callable[[mx.array], mx.array] | None, option: str = "metric") -> Callable[[mx.array], mx.array] | None:
    """``fn`` checked on every call: logits (B, T, V) -> (B,) real values, one per row."""
    if fn is None:
        return None
    if not callable(fn):
        raise OptionError(f"{option}={fn!r:.60}: expected a function logits (B, T, V) -> (B,).")

    def checked(logits: mx.array) -> mx.array:
        values = fn(logits)
        if not isinstance(values, mx.array):
            raise OptionError(
                f"{option} {getattr(fn, '__name__', fn)!r} returned {type(values).__name__}; it must "
                f"return an mx.array of shape ({logits.shape[0]},), one value per batch row."
            )
        if values.shape != (logits.shape[0],) or not (mx.issubdtype(values.dtype, mx.floating) or mx.issubdtype(values.dtype, mx.integer)):
            raise OptionError(
                f"{option} {getattr(fn, '__name__', fn)!r} returned shape {tuple(values.shape)} "
                f"{str(values.dtype).removeprefix('mlx.core.')} for logits of shape {tuple(logits.shape)}; "
                f"it must return ({logits.shape[0]},) numbers, one value per batch row (e.g. "
                "logits[:, -1, a] - logits[:, -1, b])."
            )
        return values

    try:  # keep the metric's name and declarations (``reads_last``) on the checked one
        functools.update_wrapper(checked, fn)
    except (AttributeError, TypeError):
        pass
    if checked.__name__ == "checked":  # a callable object has no __name__ of its own
        checked.__name__ = type(fn).__name__
    return checked


def boundary(value: Any, n_layers: int, option: str = "layer") -> int:
    """A layer boundary 0 .. n_layers (the residual stream entering that layer; n_layers is
    after the last). None is n_layers; negative values count layers from the end (-1: entering
    the last layer)."""
    if value is None:
        return n_layers
    i = integer(value, option, -n_layers, n_layers)
    return i + n_layers if i < 0 else i


def pair(value: Any, option: str) -> tuple[Any, Any] | None:
    """Two things (a clean and a corrupted answer, ...), or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise OptionError(f"{option}={value!r:.60}: expected a pair (first, second).")
    return tuple(value)


def vectors(value: Any, width: int | None, option: str) -> mx.array:
    """An array of vectors (..., width): at least one, each ``width`` long (when known)."""
    if not isinstance(value, mx.array):
        try:
            value = mx.array(value)
        except (TypeError, ValueError, RuntimeError):
            raise OptionError(f"{option}: expected an mx.array of shape (..., {width or 'D'}), got {type(value).__name__}.") from None
    if value.ndim == 0 or value.size == 0 or (width is not None and value.shape[-1] != width):
        raise OptionError(
            f"{option} has shape {tuple(value.shape)}: expected (..., {width or 'D'}), one or more "
            f"vectors of the model's width."
        )
    if not mx.issubdtype(value.dtype, mx.floating):
        raise OptionError(f"{option} holds {str(value.dtype).removeprefix('mlx.core.')} values: expected floats.")
    return value
