"""Activation datasets on disk: safetensors shards, a manifest, and the reader.

A dataset is a folder::

    manifest.json               written last: model, tokenizer, sites, shards with checksums
    cache.json                  the run's settings, written first (a resume checks against it)
    shard-000000.safetensors    per site a (rows, d) tensor named by the site; per row
    shard-000001.safetensors    'tokens', 'document', 'position' (in the document), 'window',
    ...                         'offset' (in the window), int32, and 'bos' (bool)
    journal-rank0.jsonl         one line per finished shard (the resume's record)

A model split across processes by pipeline parallelism writes each site on the rank that runs
its layer: a shard is then several files, ``shard-000000-rank1.safetensors`` ..., each with the
row fields and its rank's sites, listed as the shard's ``parts`` in the manifest; the reader
finds every site in its part, so nothing else changes.

Rows are the real tokens of the windows (:mod:`mlxterp_core.corpus`) in order; padding is
never written. Shards are ordinary safetensors files (``mx.load``, ``safetensors`` and
SAELens-style tools read them); they are written here with positioned writes so that a batch's
rows go to disk as soon as they are computed, and bfloat16 needs no extra package.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import options
from .errors import DatasetError, MlxterpError
from .files import fsync_dir, read_json, read_safetensors, safetensors_header, sha256_file
from .views import Display, short

MANIFEST = "manifest.json"
SETTINGS = "cache.json"
FORMAT = "mlxterp-activations"
VERSION = 1
ROW_FIELDS = {"tokens": "I32", "document": "I32", "position": "I32", "window": "I32", "offset": "I32", "bos": "BOOL"}

# safetensors dtype codes <-> (numpy dtype used for the bytes, mx dtype)
_CODES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: its bits, viewed in MLX
    "I32": (np.int32, mx.int32),
    "I64": (np.int64, mx.int64),
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}
_MX_CODES = {mx_dtype: code for code, (_, mx_dtype) in _CODES.items()}


class RowIndexError(DatasetError, IndexError):
    """A row index past the rows of a dataset (an IndexError too, so iteration stops there)."""


def dtype_code(dtype: mx.Dtype) -> str:
    if dtype not in _MX_CODES:
        raise DatasetError(f"cannot store {dtype} activations; use float32, float16 or bfloat16.")
    return _MX_CODES[dtype]


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class ShardFile:
    """A safetensors file written in place: the header first, then rows at their offsets.

    ``tensors`` maps name -> (dtype code, shape); the layout is fixed up front, so rows can be
    written in any order as they are computed. ``finish`` syncs, checksums and renames the
    temporary file to ``path`` (atomic publish); ``discard`` removes it.
    """

    def __init__(self, path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, (code, shape) in tensors.items():
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_CODES[code][0]).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + size]}
            row = size // shape[0] if shape and shape[0] else 0
            self.offsets[name] = (start, row)
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self.size = self.data_start + start
        self.fd = os.open(self.tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate") and self.size:
                os.posix_fallocate(self.fd, 0, self.size)  # a full disk fails here, not later
            _pwrite(self.fd, memoryview(struct.pack("<Q", len(text)) + text), 0)
        except BaseException:
            self.discard()
            raise

    def write_rows(self, name: str, first_row: int, data: Any) -> None:
        start, row_bytes = self.offsets[name]
        view = memoryview(data).cast("B")
        _pwrite(self.fd, view, self.data_start + start + first_row * row_bytes)

    def finish(self) -> tuple[str, int]:
        """Publish the file; its sha256 and size."""
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return digest, self.size

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


REMAKE = ("Rerun the cache_activations call (or `mlxterp cache` command) that made the dataset: it "
          "re-makes damaged and missing shards. ds.verify() lists every damaged shard.")


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A shard's safetensors header (name -> dtype/shape/offsets) and where its data starts,
    checked against the file (:func:`~mlxterp_core.files.safetensors_header`): a shard cut
    short is an error here, not a short read or a SIGBUS later."""
    if not path.exists():
        raise DatasetError(f"{path} is missing. {REMAKE}")
    header, start = safetensors_header(path, "a shard of an activation dataset", error=DatasetError, advice=REMAKE)
    unknown = sorted({e["dtype"] for name, e in header.items() if name != "__metadata__"} - set(_CODES))
    if unknown:
        raise DatasetError(f"{path} is damaged: dtype {unknown[0]} is not one a shard holds. {REMAKE}")
    return header, start


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DatasetError(f"{path} could not be opened ({e.strerror or e}). {REMAKE}") from None


def _read_into(fd: int, path: Path, buffer: np.ndarray, offset: int) -> None:
    """Fill ``buffer`` with the file's bytes from ``offset``. Positioned reads, not a memory
    map: a file that shrank is a DatasetError here, where a map of it would die of SIGBUS."""
    view = memoryview(buffer).cast("B")
    while view:
        read = os.preadv(fd, [view], offset)
        if read == 0:
            raise DatasetError(f"{path} is truncated: it ends at byte {offset}. {REMAKE}")
        view, offset = view[read:], offset + read


class _Tensor:
    """One tensor of one shard on disk: (rows, *row_shape) values of a numpy dtype at ``start``."""

    def __init__(self, path: Path, entry: dict[str, Any], data_start: int):
        self.path = path
        self.dtype = np.dtype(_CODES[entry["dtype"]][0])
        self.rows, *row_shape = entry["shape"]
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.start = data_start + entry["data_offsets"][0]
        if entry["data_offsets"][1] - entry["data_offsets"][0] != self.rows * self.row_bytes:
            raise ValueError("its size is not its shape's")

    def __len__(self) -> int:
        return self.rows

    def read(self, first: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``first`` .. ``stop`` (one positioned read), into ``out`` when given."""
        stop = self.rows if stop is None else stop
        out = np.empty((stop - first, *self.row_shape), self.dtype) if out is None else out
        if out.size:
            fd = _open(self.path)
            try:
                _read_into(fd, self.path, out, self.start + first * self.row_bytes)
            finally:
                os.close(fd)
        return out

    def take(self, rows: np.ndarray, out: np.ndarray) -> None:
        """The rows at the sorted indices ``rows``, into ``out``: the span they cover in one
        read when they are dense enough, else one read per row."""
        span = int(rows[-1] - rows[0]) + 1
        if span * self.row_bytes <= max(1 << 20, 8 * len(rows) * self.row_bytes):
            out[:] = self.read(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]
            return
        fd = _open(self.path)
        try:
            for i, row in enumerate(rows.tolist()):
                _read_into(fd, self.path, out[i], self.start + row * self.row_bytes)
        finally:
            os.close(fd)


class SiteRows:
    """The rows of one tensor of a dataset, shard by shard, indexed as one array.

    ``rows[i]``, ``rows[a:b]`` and ``rows[index_array]`` return mx.arrays (reading only the
    rows asked for, with positioned reads); ``len(rows)`` is the number of rows;
    ``rows.shape``/``rows.dtype``.
    """

    def __init__(self, dataset: ActivationDataset, name: str):
        self._parts = [dataset._tensor(k, name) for k in range(len(dataset.shards))]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        first = dataset._header(0, name)[0][name]
        self.dtype = _CODES[first["dtype"]][1]
        self.shape = (int(self._starts[-1]), *first["shape"][1:])
        self._np_dtype = np.dtype(_CODES[first["dtype"]][0])

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self, index: Any) -> np.ndarray:
        """The rows at ``index`` (an int, a slice, or a 1-D array of ints or of n bools) as
        numpy (bfloat16 as its uint16 bits)."""
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise RowIndexError(f"row {index} does not exist: there are {n} rows (0 .. {n - 1}, or -{n} .. -1 from the end).")
            k = int(np.searchsorted(self._starts, i, side="right") - 1)
            return self._parts[k].read(i - self._starts[k], i - self._starts[k] + 1)[0]
        if isinstance(index, slice):
            try:
                start, stop, step = index.indices(n)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"rows[{index!r:.60}]: {e}.") from None
            if step == 1:
                out = np.empty((max(stop - start, 0), *self.shape[1:]), self._np_dtype)
                for k, part in enumerate(self._parts):
                    a, b = max(start, self._starts[k]), min(stop, self._starts[k + 1])
                    if a < b:
                        part.read(int(a - self._starts[k]), int(b - self._starts[k]), out[a - start : b - start])
                return out
            index = np.arange(start, stop, step)
        index = _row_indices(index, n)
        out = np.empty((len(index), *self.shape[1:]), self._np_dtype)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        for k in np.unique(shard):
            where = np.flatnonzero(shard == k)
            local = index[where] - self._starts[k]
            order = np.argsort(local, kind="stable")  # sequential reads within a shard
            rows = np.empty((len(where), *self.shape[1:]), self._np_dtype)
            self._parts[k].take(local[order], rows)
            out[where[order]] = rows
        return out

    def __getitem__(self, index: Any) -> mx.array:
        return _to_mx(self.numpy(index), self.dtype)


def _row_indices(index: Any, n: int) -> np.ndarray:
    """An index array (1-D ints, negatives from the end, or n bools) as int64 rows in [0, n)."""
    try:
        array = np.asarray(np.array(index) if isinstance(index, mx.array) else index)
    except (ValueError, TypeError):
        array = np.asarray(None)
    if array.dtype == np.bool_ and array.shape == (n,):
        return np.flatnonzero(array)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DatasetError(f"rows[{index!r:.60}]: index rows with an int, a slice, a 1-D array of ints, or {n} bools.")
    rows = array.astype(np.int64)
    bad = (rows < -n) | (rows >= n)
    if bad.any():
        raise RowIndexError(f"row {rows[bad][0]} does not exist: there are {n} rows (0 .. {n - 1}, or -{n} .. -1 from the end).")
    return np.where(rows < 0, rows + n, rows)


def _to_mx(rows: np.ndarray, dtype: mx.Dtype) -> mx.array:
    array = mx.array(rows)
    return array.view(mx.bfloat16) if dtype == mx.bfloat16 else array


class ActivationDataset(Display):
    """A cached activation dataset (written by ``model.cache_activations``), read lazily.

    Attributes:
        path: the dataset folder.
        manifest: the parsed manifest.json.
        sites: the cached site names, in manifest order.
        n_tokens: rows per site (real tokens; padding is never stored).
        shards: the manifest's shard entries.

    ``ds[site]`` (or ``ds.rows(site)``) is a :class:`SiteRows` over all shards;
    ``ds.tokens``, ``ds.document``, ``ds.position``, ``ds.offset``, ``ds.bos`` are the per-row fields.
    ``ds.batches(site, batch_size)`` streams shuffled (rows, d) batches with bounded memory.
    A damaged shard (missing, cut short, overwritten) is a DatasetError naming it when it is
    read; ``ds.verify()`` checks them all.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                " It holds an unfinished cache: rerun the same cache_activations call (or "
                "`mlxterp cache` command) to finish it."
                if (self.path / SETTINGS).is_file()
                else ""
            )
            raise DatasetError(f"no activation dataset at {self.path}: {MANIFEST} is missing.{hint}")
        advice = "Rerun the cache_activations call (or `mlxterp cache` command) that made it to rewrite it."
        self.manifest = read_json(manifest_path, f"the manifest of an {FORMAT} dataset", error=DatasetError, advice=advice)
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise DatasetError(f"{manifest_path} is not a complete {FORMAT} manifest. {advice}")
        try:
            self.sites: list[str] = [str(s["name"]) for s in self.manifest["sites"]]
            self.shards: list[dict[str, Any]] = self.manifest["shards"]
            self.n_tokens: int = int(self.manifest["n_tokens"])
            files = [part for s in self.shards for part in (s["parts"] if "parts" in s else [s])]
            if not self.shards or not all(isinstance(f["file"], str) and "/" not in f["file"] for f in files):
                raise ValueError("no shards")
            if not all(isinstance(p["sites"], list) for s in self.shards if "parts" in s for p in s["parts"]):
                raise ValueError("parts without sites")
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{manifest_path} is damaged: it lacks the sites, shards or n_tokens of a manifest. {advice}") from None
        self._headers: dict[str, tuple[dict, int]] = {}

    def _summary(self) -> str:
        entries = self.manifest["sites"]
        shown = ", ".join(f"{s['name']} ({'x'.join(map(str, s['shape']))} {s['dtype']})" for s in entries[:2])
        more = ", ..." if len(entries) > 2 else ""
        documents = self.manifest.get("corpus", {}).get("documents")
        source = f" from {documents} documents" if documents is not None else ""
        family = self.manifest.get("model", {}).get("family")
        model = f", {family} model" if family else ""
        shards = f"{len(self.shards)} shard{'s' * (len(self.shards) != 1)}"
        return (f"{short(str(self.path), 60)}, {len(self.sites)} site{'s' * (len(self.sites) != 1)}: {shown}{more}; "
                f"{self.n_tokens} tokens{source} in {shards}{model}")

    def keys(self) -> list[str]:
        """The cached site names (``ds[name]`` reads one)."""
        return list(self.sites)

    def __contains__(self, name: object) -> bool:
        try:
            self.site_name(name)  # type: ignore[arg-type]
        except (DatasetError, TypeError):
            return False
        return True

    def site_name(self, name: str) -> str:
        """The stored name for ``name`` (standard names in any spelling: 'layers[3]')."""
        if name in self.sites or name in ROW_FIELDS:
            return name
        from .names import is_raw, parse

        if not is_raw(name):
            try:
                canonical = str(parse(name))
            except MlxterpError:
                canonical = None
            if canonical in self.sites:
                return canonical
        from .errors import did_you_mean

        raise DatasetError(f"no site {name!r} in the dataset at {self.path}; it has {len(self.sites)}: "
                           f"{', '.join(self.sites[:6])}{', ...' if len(self.sites) > 6 else ''}." + did_you_mean(name, self.sites))

    def site_info(self, site: str) -> dict[str, Any]:
        """The manifest entry of a site: name, raw site, shape of one row, dtype."""
        name = self.site_name(site)
        return next(s for s in self.manifest["sites"] if s["name"] == name)

    def files(self, k: int) -> list[str]:
        """The files of shard ``k``: one, or one per part (see the module doc)."""
        parts = self.shards[k].get("parts")
        return [p["file"] for p in parts] if parts else [self.shards[k]["file"]]

    def _file(self, k: int, name: str) -> str:
        """The file of shard ``k`` that holds tensor ``name`` (the row fields are in every part)."""
        for part in self.shards[k].get("parts") or ():
            if name in part["sites"]:
                return part["file"]
        return self.files(k)[0]

    def _header(self, k: int, name: str | None = None) -> tuple[dict, int]:
        file = self.files(k)[0] if name is None else self._file(k, name)
        if file not in self._headers:
            self._headers[file] = read_header(self.path / file)
        return self._headers[file]

    def _tensor(self, k: int, name: str) -> _Tensor:
        header, data_start = self._header(k, name)
        path = self.path / self._file(k, name)
        if name not in header:
            raise DatasetError(f"{path} has no tensor {name!r}: it is not a shard of this dataset. {REMAKE}")
        try:
            return _Tensor(path, header[name], data_start)
        except (ValueError, TypeError, KeyError):
            raise DatasetError(f"{path} is damaged: the header entry of {name!r} is not a (rows, ...) tensor. {REMAKE}") from None

    def rows(self, site: str) -> SiteRows:
        return SiteRows(self, self.site_name(site))

    def __getitem__(self, site: str) -> SiteRows:
        return self.rows(site)

    @property
    def tokens(self) -> np.ndarray:
        """(n_tokens,) int32 token id of each row."""
        return self._field("tokens")

    @property
    def document(self) -> np.ndarray:
        """(n_tokens,) int32 document index of each row."""
        return self._field("document")

    @property
    def position(self) -> np.ndarray:
        """(n_tokens,) int32 index of each row's token within its document (BOS = 0)."""
        return self._field("position")

    @property
    def offset(self) -> np.ndarray:
        """(n_tokens,) int32 index of each row's token within its window (0: the first)."""
        return self._field("offset")

    @property
    def bos(self) -> np.ndarray:
        """(n_tokens,) bool, True where the row's token is a BOS token."""
        return self._field("bos")

    def _field(self, name: str) -> np.ndarray:
        return self.rows(name).numpy(slice(None))

    def load_shard(self, k: int) -> dict[str, mx.array]:
        """Every tensor of shard ``k`` (lazy, through ``mx.load``)."""
        k = options.index(k, len(self.shards), "k", "shard")
        tensors: dict[str, mx.array] = {}
        for file in reversed(self.files(k)):  # the first part's row fields last: they are the same
            tensors.update(read_safetensors(self.path / file, f"shard {k} of the dataset at {self.path}",
                                            error=DatasetError, advice=REMAKE))
        return tensors

    def verify(self) -> dict[str, str]:
        """The damaged shard files: file name -> what is wrong ("missing", "truncated: ...",
        "checksum mismatch: ..."); empty when every file is as the manifest records it (a shard
        in parts is checked part by part)."""
        problems = {}
        for entry in (part for shard in self.shards for part in (shard.get("parts") or [shard])):
            path = self.path / entry["file"]
            if not path.is_file():
                problems[entry["file"]] = "missing"
            elif path.stat().st_size != entry.get("bytes", path.stat().st_size):
                size = path.stat().st_size
                problems[entry["file"]] = f"{'truncated' if size < entry['bytes'] else 'too long'}: {size} bytes, the manifest records {entry['bytes']}"
            elif sha256_file(path) != entry.get("sha256"):
                problems[entry["file"]] = "checksum mismatch: its sha256 is not the manifest's (the file was changed)"
        return problems

    def shard_field(self, k: int, name: str) -> np.ndarray:
        """Per-row field ``name`` ('bos', 'offset', ...) of shard ``k``, as numpy."""
        return self._tensor(k, name).read()

    def shard_rows(self, k: int, site: str, keep: np.ndarray | None = None, as_mx: bool = False):
        """The rows of ``site`` in shard ``k`` (where ``keep`` is True), read into memory: numpy
        (bfloat16 as its uint16 bits), or with ``as_mx`` an mx.array in the stored dtype."""
        name = self.site_name(site)
        rows = self._tensor(k, name).read()
        rows = rows if keep is None or keep.all() else rows[keep]
        return _to_mx(rows, getattr(mx, self.site_info(name)["dtype"])) if as_mx else rows

    def batches(
        self,
        site: str | Sequence[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        *,
        skip_bos: bool = True,
        skip_first: bool = True,
        buffer_rows: int = 1 << 18,
        drop_last: bool = False,
        with_index: bool = False,
        repeat: bool = False,
    ):
        """Batches of rows of ``site``: (batch_size, d) mx.arrays in the stored dtype (a list
        of sites: dicts {site: rows}, the same rows of every site).

        With ``shuffle`` (deterministic given ``seed``): shards are visited in a random order and
        their rows are mixed in a buffer of about ``buffer_rows`` rows, of which half is served
        before the buffer is refilled (the SAELens recipe, :class:`~mlxterp_core.stream.MixingBuffer`);
        memory stays bounded by the buffer and one shard. Without it, rows come in dataset order.
        BOS rows are left out unless ``skip_bos=False``, and so is the first position of every
        window unless ``skip_first=False`` (the policy of :func:`mlxterp_core.stream.trainable`).
        ``with_index`` yields ``(batch, row_indices)`` so that ``ds.tokens[row_indices]`` etc.
        line up with the batch. ``repeat`` starts again (a new shard order) at the end.

        The result is an iterator with ``state()`` / ``restore()`` (see
        :class:`~mlxterp_core.stream.Batches`), so a trainer's checkpoint can resume it exactly.
        """
        from .stream import Batches, DatasetRows

        sites = [site] if isinstance(site, str) else list(site)
        names = [self.site_name(s) for s in sites]
        seed = None if seed is None else options.integer(seed, "seed", 0)
        buffer_rows = options.integer(buffer_rows, "buffer_rows", 1)
        rng = np.random.default_rng(seed)
        source = DatasetRows(self, names, rng=rng if shuffle else None, repeat=repeat,
                             skip_bos=skip_bos, skip_first=skip_first, with_index=with_index)

        def convert(batch: dict[str, Any]):
            out = batch[names[0]] if isinstance(site, str) else {name: batch[name] for name in names}
            return (out, batch["index"]) if with_index else out

        return Batches(source, batch_size, buffer_rows=buffer_rows, shuffle=shuffle, drop_last=drop_last,
                       rng=rng, convert=convert)
