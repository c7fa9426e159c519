"""Reading and writing the files mlxterp writes and accepts.

Every reader gives an :class:`MlxterpError` naming the file and what was expected for a file
that is missing, truncated, not text, not JSON (TOML, safetensors, npz) or of the wrong kind,
never a bare ``json.JSONDecodeError``, ``KeyError`` or MLX ``RuntimeError`` from deep inside.
``error`` picks the subclass (a plugin's own, e.g. ``SAEError``; :class:`FileFormatError` by
default) and ``advice`` is appended to the message: what to do about it.

Every writer writes a temporary file in the same folder and renames it into place, so a crash
or a full disk leaves the old file or the new one, never half of one; a write that fails is a
:class:`FileWriteError` naming the file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FileFormatError, FileWriteError, MlxterpError

TENSOR_FORMATS = {".safetensors": "safetensors", ".npz": "npz"}


def existing_file(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError, advice: str = "") -> Path:
    """``path`` (user home expanded), which must be a file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise error(_say(f"{path}: no such file (expected {expected}).", advice))
    if not path.is_file():
        raise error(_say(f"{path} is not a file (expected {expected}).", advice))
    return path


def read_text(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError, advice: str = "") -> str:
    """The text of ``path``; ``expected`` says what the file should be ("a saved LogitLensResult")."""
    path = existing_file(path, expected, error=error, advice=advice)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(_say(f"{path} is not text (byte {e.start} is not UTF-8); expected {expected}.", advice)) from None
    except OSError as e:
        raise error(_say(f"{path} could not be read ({e.strerror or e}); expected {expected}.", advice)) from None


def read_json(path: str | Path, expected: str, kind: type = dict, *, error: type[MlxterpError] = FileFormatError,
              advice: str = "") -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (a dict by default)."""
    text = read_text(path, expected, error=error, advice=advice)
    path = Path(path).expanduser()
    if not text.strip():
        raise error(_say(f"{path} is empty; expected {expected} (JSON).", advice))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated string")
        why = "it ends early (truncated?)" if truncated else f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise error(_say(f"{path} is not valid JSON ({why}); expected {expected}.", advice)) from None
    if not isinstance(data, kind):
        raise error(_say(f"{path} holds a JSON {type(data).__name__}, not the {kind.__name__} of {expected}.", advice))
    return data


def read_toml(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError, advice: str = "") -> dict[str, Any]:
    """The TOML table in ``path``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    text = read_text(path, expected, error=error, advice=advice)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(_say(f"{Path(path)} is not valid TOML ({e}); expected {expected}.", advice)) from None


def read_tensors(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError,
                 advice: str = "") -> dict[str, Any]:
    """The named tensors (mx.arrays) of a ``.safetensors`` or ``.npz`` file. MLX checks the
    header and every tensor's extent against the file's size here; the data is read lazily."""
    import mlx.core as mx

    path = existing_file(path, expected, error=error, advice=advice)
    form = TENSOR_FORMATS.get(path.suffix)
    if form is None:
        raise error(_say(f"{path} is not a {' or '.join(TENSOR_FORMATS)} file; expected {expected}.", advice))
    try:
        found = mx.load(str(path), format=form)
    except (RuntimeError, ValueError, OSError) as e:  # what MLX raises for short or foreign files
        raise error(_say(f"{path} is corrupt or truncated: it cannot be read as {form} ({e}); expected {expected}.",
                         advice)) from None
    if not isinstance(found, dict):
        raise error(_say(f"{path} holds a single array, not named tensors; expected {expected}.", advice))
    return found


def write_atomic(path: str | Path, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(temporary)`` on a temporary file beside ``path``, then rename it to ``path``:
    a crash, an interrupt or a full disk leaves either the old file or the new one, never half
    of one. A failed write is a :class:`FileWriteError` naming ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
        temporary.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise FileWriteError(
            f"{path} could not be written ({why}); the file that was there (if any) is unchanged. "
            "Free some space or fix the folder, then run again."
        ) from e
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_tensors_atomic(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write named mx.arrays to the safetensors file ``path`` atomically (see :func:`write_atomic`)."""
    import mlx.core as mx

    def write(temporary: Path) -> None:
        mx.save_safetensors(str(temporary), tensors, metadata=metadata)

    return write_atomic(path, write, suffix=".safetensors")  # mx.save_safetensors wants the extension


def _say(message: str, advice: str) -> str:
    return f"{message} {advice}" if advice else message
