"""Reading the files mlxterp writes and accepts: a missing, truncated, non-JSON (or non-TOML)
or wrong-kind file is a :class:`FileFormatError` naming the file and what was expected, never
a bare ``json.JSONDecodeError`` or ``KeyError`` from deep inside."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FileFormatError, MlxterpError, WriteError


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


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` so that a crash, an interrupt or a full disk leaves the old file (or
    none) and never half of one: a temporary file in the same folder (named with the target's
    suffix, which MLX's writers need), synced, renamed into place, the folder synced. ``data``
    is text (UTF-8), bytes, or a function that writes the file it is given (e.g.
    ``lambda tmp: mx.save_safetensors(str(tmp), tensors)``). A failed write is a
    :class:`WriteError` naming the file; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"writing {path} failed ({e.strerror or e}); the file there before (if any) is "
                         "unchanged. Free some space or choose another folder, then run it again.") from e
    except Exception as e:  # MLX's writers raise RuntimeError on a full disk
        if isinstance(e, MlxterpError):
            raise
        raise WriteError(f"writing {path} failed ({e}); the file there before (if any) is unchanged.") from e
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON, written with :func:`write_atomic`."""
    return write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Sync a folder's entries (a rename is durable once its folder is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
