"""Exceptions raised by mlxterp. Every message says what was wrong and what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MlxterpError(Exception):
    """Base class of every error mlxterp raises on purpose."""


class UnknownNameError(MlxterpError, KeyError):
    """A raw or standard name that this model (or this trace) does not have.

    Subclasses KeyError so that ``name in trace.activations`` style code keeps working,
    but prints its message plainly instead of KeyError's quoted repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InterventionError(MlxterpError):
    """An intervention raised, returned the wrong shape or dtype, or never ran."""


class InputError(MlxterpError, ValueError):
    """Inputs to a trace that cannot be run: text without a tokenizer, an empty prompt, ..."""


class OptionError(InputError):
    """An option out of its range or of the wrong kind: ``top_k=0``, ``positions=[50]`` on a
    10-token prompt, ``max_tokens=-3``, a metric returning the wrong shape, ..."""


class FileFormatError(MlxterpError, ValueError):
    """A file that is missing, truncated, not the format expected, or of another kind."""


class FileWriteError(MlxterpError, OSError):
    """A file that could not be written (a full disk, no permission); the file that was there is
    kept whole."""


class TraceError(MlxterpError, RuntimeError):
    """A trace used out of order: ``model.output`` outside a trace, nested traces, ..."""


class CorpusError(MlxterpError, ValueError):
    """A corpus that cannot be read: missing file, empty corpus, a JSONL line without "text"."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates most similar to ``name``, best first (for 'did you mean' messages)."""
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if not found:
        # Long dotted paths defeat difflib's ratio; fall back to a shared-suffix match.
        tail = name.rsplit(".", 1)[-1]
        found = [c for c in pool if c.endswith(tail)][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Closest names: a, b, c.' or '' when nothing is close."""
    found = closest(name, candidates)
    return f" Closest names: {', '.join(found)}." if found else ""
