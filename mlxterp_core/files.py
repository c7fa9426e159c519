"""Reading the files mlxterp writes and accepts: a missing, truncated, non-JSON (or non-TOML)
or wrong-kind file is a :class:`FileFormatError` naming the file and what was expected, never
a bare ``json.JSONDecodeError`` or ``KeyError`` from deep inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import FileFormatError


def read_text(path: str | Path, expected: str) -> str:
    """The text of ``path``; ``expected`` says what the file should be ("a saved LogitLensResult")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileFormatError(f"{path}: no such file (expected {expected}).")
    if not path.is_file():
        raise FileFormatError(f"{path} is not a file (expected {expected}).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not text (byte {e.start} is not UTF-8); expected {expected}.") from None
    except OSError as e:
        raise FileFormatError(f"{path} could not be read ({e.strerror or e}); expected {expected}.") from None


def read_json(path: str | Path, expected: str, kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (a dict by default)."""
    text = read_text(path, expected)
    if not text.strip():
        raise FileFormatError(f"{Path(path)} is empty; expected {expected} (JSON).")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated string")
        why = "it ends early (truncated?)" if truncated else f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise FileFormatError(f"{Path(path)} is not valid JSON ({why}); expected {expected}.") from None
    if not isinstance(data, kind):
        raise FileFormatError(
            f"{Path(path)} holds a JSON {type(data).__name__}, not the {kind.__name__} of {expected}."
        )
    return data


def read_toml(path: str | Path, expected: str) -> dict[str, Any]:
    """The TOML table in ``path``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    text = read_text(path, expected)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileFormatError(f"{Path(path)} is not valid TOML ({e}); expected {expected}.") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a crash or an
    interrupt leaves either the old file or the new one, never half of one."""
    import os
    import tempfile

    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
