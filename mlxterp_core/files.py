"""Reading and writing the files mlxterp writes and accepts.

Every reader raises an :class:`MlxterpError` naming the file and what was expected for a file
that is missing, truncated, not text, not JSON (TOML, safetensors) or of the wrong kind, never a
bare ``json.JSONDecodeError``, ``KeyError`` or MLX ``RuntimeError`` from deep inside.
``error`` picks the class raised (a plugin's own, e.g. ``SAEError``; :class:`FileFormatError`
by default) and ``advice``, appended to the message, says what to do about it.

The one writer, :func:`write_atomic`, writes a temporary file in the same folder and renames it
into place, so a crash or a full disk leaves the old file or the new one, never half of one; a
write that fails is a :class:`WriteError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import FileFormatError, MlxterpError, WriteError

# safetensors dtype codes -> the numpy dtype of their bytes (BF16: its bits; numpy has none)
_SAFETENSORS_BYTES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100_000_000  # the safetensors format's limit on a header's length


def read_text(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError, advice: str = "") -> str:
    """The text of ``path``; ``expected`` says what the file should be ("a saved LogitLensResult")."""
    path = _existing_file(path, expected, error, advice)
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


def read_toml(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError,
              advice: str = "") -> dict[str, Any]:
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


def safetensors_header(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError,
                       advice: str = "") -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> ``dtype``, ``shape``, ``data_offsets``; and
    ``__metadata__``) and the byte where its data starts: an 8-byte little-endian header
    length, then that many bytes of JSON. The header is checked against the file: every entry
    has a dtype, a shape and offsets of non-negative integers, and every tensor lies inside the
    file (one cut short is an error here, not a short read later)."""
    path = _existing_file(path, expected, error, advice)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            text = f.read(length) if length is not None and length <= min(size - 8, _MAX_HEADER) else b""
    except OSError as e:
        raise error(_say(f"{path} could not be read ({e.strerror or e}); expected {expected}.", advice)) from None
    if length is None or length > size - 8:
        what = f"{size} bytes" if length is None else f"a header of {length} bytes in a file of {size}"
        raise error(_say(f"{path} is truncated or not a safetensors file ({what}); expected {expected}.", advice))
    if length > _MAX_HEADER:
        raise error(_say(f"{path} is not a safetensors file (a header of {length} bytes, over the format's "
                         f"limit of {_MAX_HEADER}); expected {expected}.", advice))
    try:
        header = json.loads(text)
    except ValueError:  # UnicodeDecodeError too
        header = None
    if not isinstance(header, dict):
        raise error(_say(f"{path} is not a safetensors file (its header is not a JSON object); expected {expected}.", advice))
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            counts = [*shape, begin, stop]
            if not isinstance(code, str) or not all(isinstance(n, int) and n >= 0 for n in counts) or begin > stop:
                raise ValueError(name)
        except (TypeError, KeyError, ValueError):
            raise error(_say(f"{path} is corrupt: the header's entry for tensor {name!r} is malformed; "
                             f"expected {expected}.", advice)) from None
        end = max(end, stop)
    if 8 + length + end > size:
        raise error(_say(f"{path} is corrupt or truncated: {size} bytes, its header says {8 + length + end}; "
                         f"expected {expected}.", advice))
    return header, 8 + length


def read_safetensors(path: str | Path, expected: str, *, error: type[MlxterpError] = FileFormatError,
                     advice: str = "") -> dict[str, mx.array]:
    """The tensors of a safetensors file, by name. MLX reads the file where it can; a file it
    refuses is read here, so that float64 tensors (which MLX's reader does not take: a
    BatchTopK threshold, a whitening matrix) come back as float32, 0-d tensors included. A
    missing, truncated or foreign file, or a dtype nothing here reads, is an ``error`` naming
    the file and the tensor; ``expected`` says what the file should be ("SAE weights")."""
    header, start = safetensors_header(path, expected, error=error, advice=advice)
    path = Path(path).expanduser()
    try:
        return mx.load(str(path), format="safetensors")
    except Exception:  # MLX names neither the tensor nor the cause well: read it here, and say
        pass
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    tensors: dict[str, mx.array] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if code not in _SAFETENSORS_BYTES:
            raise error(_say(
                f"{path}: tensor {name!r} is {code}, which mlxterp cannot read (it reads "
                f"{', '.join(_SAFETENSORS_BYTES)}); convert it to float32.", advice
            ))
        dtype = np.dtype(_SAFETENSORS_BYTES[code])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise error(_say(
                f"{path} is corrupt: tensor {name!r} ({code}, shape {list(shape)}) needs {count * dtype.itemsize} "
                f"bytes, its header gives {end - begin}; expected {expected}.", advice
            ))
        value = np.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
        if code == "F64":
            value = value.astype(np.float32)
        array = mx.array(value)
        tensors[name] = array.view(mx.bfloat16) if code == "BF16" else array
    return tensors


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


def _existing_file(path: str | Path, expected: str, error: type[MlxterpError], advice: str) -> Path:
    """``path`` (user home expanded), which must be a file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise error(_say(f"{path}: no such file (expected {expected}).", advice))
    if not path.is_file():
        raise error(_say(f"{path} is not a file (expected {expected}).", advice))
    return path


def _say(message: str, advice: str) -> str:
    return f"{message} {advice}" if advice else message
