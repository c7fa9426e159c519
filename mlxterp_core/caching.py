"""``model.cache_activations``: run a corpus through the model and write an activation dataset.

The pipeline::

    corpus -> tokenized once (corpus.tokenize) -> token windows -> the activation stream
    (stream.SiteReader: one forward per batch, stopped after the last block needed) -> rows of
    real tokens -> background writer -> shards + manifest (dataset.py)

Work is planned before anything runs: the windows are counted from the tokenized corpus (kept:
the run reads the same ids), cut into batches, and consecutive batches into shards; the plan
depends only on the corpus and the settings. A rank of an ``mlx.launch`` job (see :mod:`mlxterp_core.distributed`) owns shards
``k`` with ``k % size == rank``, so no activation crosses between processes and any number of
processes writes the same files. A shard is the unit of work and of loss: it is written to a
temporary file, synced, checksummed, renamed into place, then recorded in the rank's journal; a
rerun skips shards whose file matches its journal checksum and re-makes the rest. Rank 0 writes
``manifest.json`` last, after a collective check that every rank finished.

A model sharded across the ranks (:mod:`mlxterp_core.sharding`) needs every rank in every
forward pass, so there every rank runs every batch, and the rank that holds a site writes it:
under tensor parallelism rank 0 writes every shard (the residual stream is on every rank; a
sharded site is gathered once per batch); under pipeline parallelism each rank writes the sites
of the layers it runs (and rank 0 the others) into its own part of every shard, so no
activation crosses the network.

One writer per folder: every rank holds an advisory lock (``writer-rank{rank}.lock``, naming
its holder) while it writes, so a second job writing the same folder is refused before it
changes anything; the system releases a lock when its process dies.

What is in this file: :func:`cache_activations` (settings, fingerprint, the ranks' agreement,
the writer lock, then :func:`_write`: :func:`_run` for this rank's shards and
:func:`_write_manifest`); the plan (:func:`_plan`, :func:`_shards`); the folder
(:func:`_lock_folder`, :func:`_prepare_folder`, journals, :func:`_verified`); the identity of model and tokenizer in the manifest
(:func:`model_identity`, :func:`tokenizer_identity`); the work (:func:`_run`, a background
:class:`_Writer` thread, :func:`_batch_rows` from the stream, :func:`_finish` publishing a
shard). The format and its reader are :mod:`~mlxterp_core.dataset`'s; the ``mlxterp cache``
command is the tools plugin's.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import distributed, options
from .corpus import DEFAULT_BATCH_SIZE, Windows, tokenize
from .dataset import (
    FORMAT,
    MANIFEST,
    ROW_FIELDS,
    SETTINGS,
    VERSION,
    ActivationDataset,
    DatasetError,
    ShardFile,
    dtype_code,
    sha256_file,
)
from .errors import MlxterpError, OptionError
from .files import read_json, write_json
from .inputs import pad_id
from .stream import Site, SiteReader, resolve_sites, stop_for, take_rows

SHARD_BYTES = 256 << 20  # default shard size: bounds the RAM per shard and the work lost per crash
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_OURS = re.compile(r"^(manifest\.json|cache\.json|journal-rank\d+\.jsonl|shard-\d+(-rank\d+)?\.safetensors|writer-rank\d+\.lock)(\.tmp)?$")
_LOCK = re.compile(r"^writer-rank\d+\.lock$")


def cache_activations(
    model: Any,
    corpus: str | Path | Iterable[str],
    sites: str | list[str],
    out: str | Path,
    *,
    context_size: int = 128,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str | mx.Dtype | None = None,
    overwrite: bool = False,
    packing: bool = True,
    prepend_bos: bool = True,
    max_tokens: int | None = None,
    shard_tokens: int | None = None,
    progress: bool | None = None,
    group: Any = None,
    encoding: str = "utf-8",
    errors: str = "strict",
) -> ActivationDataset | None:
    """Run ``corpus`` through the model and write the activations at ``sites`` to ``out``.

    Args:
        model: an InterpretableModel with a tokenizer.
        corpus: a text file (one document per line), a .jsonl file with a "text" field, a
            folder of .txt files, or an iterable of strings (see mlxterp_core.corpus).
        sites: standard names ('layers[6]', 'layers[*].output', 'layers[3].mlp.act'), raw names
            ('model.model.layers.6.mlp') or raw globs; each matched site becomes one (rows, d)
            tensor. Per-head (B, H, T, D) views and attention patterns are not per-token rows.
        out: the dataset folder (created; an unfinished cache there is resumed).
        context_size: tokens per window.
        batch_size: windows per forward pass.
        dtype: stored dtype, 'float32', 'float16' or 'bfloat16'; None keeps each site's own.
        overwrite: delete an existing dataset in ``out`` and start afresh.
        packing: pack documents into full windows (True) or one document per window (False).
        prepend_bos: start every document with the tokenizer's BOS token.
        max_tokens: cache at most this many tokens (a prefix of the corpus).
        shard_tokens: about how many tokens per shard (default: shards of ~256 MiB).
        progress: False hides the tqdm bar (tokens, tokens/s, time left), shown by default
            when stderr is a terminal.
        group: an ``mx.distributed`` group (default: ``mx.distributed.init()``, a singleton
            unless started by ``mlx.launch``).
        encoding: the text encoding of corpus files (see ``read_documents``).
        errors: what to do with bytes that do not decode ("strict": a CorpusError).

    Returns:
        The :class:`ActivationDataset` (None on a rank that cannot see rank 0's folder).
    """
    started = time.perf_counter()
    group = distributed.world(group)
    rank = group.rank()
    out = Path(out).expanduser()
    names = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, (list, tuple)) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"sites must be a site name or a non-empty list of names, got {sites!r:.80}.")
    for option, value in (("packing", packing), ("prepend_bos", prepend_bos)):
        if not isinstance(value, bool):
            raise OptionError(f"{option}={value!r:.40}: expected True or False.")
    shard_tokens = None if shard_tokens is None else options.integer(shard_tokens, "shard_tokens", 1)
    stored = _stored_dtype(dtype)
    # tokenized once: the plan keeps the ids
    tokens = tokenize(model, corpus, prepend_bos=prepend_bos, max_tokens=max_tokens, encoding=encoding, errors=errors)
    windows = dict(context_size=context_size, batch_size=batch_size, packing=packing)

    plan_rows, corpus_id = _plan(tokens, windows)
    first = next(tokens.windows(**windows))
    probe = mx.array(first.tokens[:1, : min(5, int(first.lengths[0]))])
    whole: dict[str, mx.array] = {}
    site_list = resolve_sites(model, names, probe, stored, whole)
    stop = stop_for(model, site_list, probe, whole)
    writers = _writers(model, site_list)  # site -> the rank that writes it (None: shards split by rank)
    written_by = sorted(set(writers.values())) if writers else []
    bytes_per_token = sum(int(np.prod(s.shape)) * s.dtype.size for s in site_list) + 21
    if shard_tokens is None:
        shard_tokens = max(1, SHARD_BYTES // bytes_per_token)
    shard_batches = max(1, round(shard_tokens / (batch_size * context_size)))
    shards = _shards(plan_rows, shard_batches)

    settings = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(model),
        "tokenizer": tokenizer_identity(model.tokenizer),
        "sites": [{"name": s.name, "raw": s.raw, "shape": list(s.shape), "dtype": _dtype_name(s.dtype)} for s in site_list],
        "context_size": context_size,
        "batch_size": batch_size,
        "packing": packing,
        "prepend_bos": prepend_bos,
        "max_tokens": max_tokens,
        "shard_batches": shard_batches,
        "corpus": corpus_id,
    }
    if len(written_by) > 1:  # a shard in parts, one per writing rank
        settings["parts"] = {str(r): [s.name for s in site_list if writers[s.name] == r] for r in written_by}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if not distributed.same_everywhere(bytes.fromhex(fingerprint), group):
        raise distributed.DistributedError(
            "the ranks of this job disagree about the cache (model, corpus or settings differ "
            "between processes); give every rank the same command and files."
        )

    lock = None
    try:
        # every rank takes its writer lock before rank 0 touches the folder: a second job
        # writing here is refused before anything is changed
        lock = _together(group, f"locking {out}", f"another rank could not lock {out}; see its error.",
                         lambda: _lock_folder(out, rank))
        return _write(model, tokens, windows, site_list, stop, shards, settings, fingerprint, out, overwrite,
                      group, progress, started, writers)
    finally:
        _unlock_folder(lock)


def _write(model, tokens, windows, site_list, stop, shards, settings, fingerprint, out, overwrite, group,
           progress, started, writers) -> ActivationDataset | None:
    """Prepare the folder, write this rank's shards (``writers``: the rank that writes each
    site of a sharded model, None to split the shards by rank), then (rank 0) the manifest."""
    rank, size = group.rank(), group.size()
    _together(group, f"preparing {out}", f"rank 0 could not prepare {out}; see its error.",
              (lambda: _prepare_folder(out, settings, fingerprint, overwrite)) if rank == 0 else None)
    if rank != 0 and (out / SETTINGS).is_file():
        _check_settings(out, _read_settings(out / SETTINGS), settings)

    if writers is None:  # data parallel: shards split by rank
        mine, part, my_sites = [k for k in range(len(shards)) if k % size == rank], None, site_list
    else:  # model parallel: every rank in every batch, each writing its sites
        my_sites = [s for s in site_list if writers[s.name] == rank]
        mine = list(range(len(shards))) if my_sites else []
        part = rank if "parts" in settings else None  # a shard in parts: this rank's file of each
    done = _verified(out, fingerprint, mine, part)
    todo = [k for k in mine if k not in done]
    compute = todo if writers is None else sorted({k for blob in distributed.gather_bytes(json.dumps(todo).encode(), group)
                                                   for k in json.loads(blob)})
    ok, error = True, None
    written: dict[int, dict] = {}
    try:
        written = _run(model, tokens, windows, site_list, stop, shards, compute, set(todo), out, fingerprint,
                       rank, size, progress, my_sites, part)
    except (MlxterpError, OSError) as e:
        ok, error = False, e
    except BaseException:
        raise  # KeyboardInterrupt etc.: the finished shards are kept; rerun to resume
    entries = {**done, **written}
    try:
        distributed.all_ok(ok, group, "caching activations")
    except distributed.DistributedError:
        if isinstance(error, OSError):
            raise DatasetError(
                f"writing to {out} failed: {error}. Finished shards are kept: free space (or fix "
                "the folder) and rerun the same command to resume."
            ) from error
        raise error or distributed.DistributedError("another rank failed while caching; rerun to resume.") from None

    # every rank's journal entries reach rank 0, shared filesystem or not
    everything = distributed.gather_bytes(json.dumps(list(entries.values())).encode(), group)

    def manifest():
        merged = [e for blob in everything for e in json.loads(blob)]
        _write_manifest(out, settings, fingerprint, shards, merged, time.perf_counter() - started)

    _together(group, "writing the manifest", "rank 0 could not write the manifest; rerun to resume.",
              manifest if rank == 0 else None, errors=(MlxterpError, OSError))
    return ActivationDataset(out) if (out / MANIFEST).is_file() else None


def _together(group, doing: str, others: str, action=None, errors=(MlxterpError,)):
    """Run ``action`` on this rank (None: nothing to do here), then agree on every rank that it
    went well: this rank's own error is raised where it failed, a DistributedError saying
    ``others`` on the ranks where it did not. Returns what ``action`` returned."""
    result, error = None, None
    if action is not None:
        try:
            result = action()
        except errors as e:
            error = e
    try:
        distributed.all_ok(error is None, group, doing)
    except distributed.DistributedError:
        raise error or distributed.DistributedError(others) from None
    return result


def _stored_dtype(dtype: Any) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("mlx.core.") in DTYPES:
        return DTYPES[dtype.removeprefix("mlx.core.")]
    raise DatasetError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or None: each site's own dtype).")


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _plan(tokens, windows) -> tuple[list[int], dict]:
    """Real tokens per batch, and the identity of the token stream (count and sha256)."""
    digest = hashlib.sha256()
    rows, documents = [], -1
    for batch in tokens.windows(**windows):
        mask = batch.mask
        for field in (batch.tokens, batch.document, batch.position):
            digest.update(np.ascontiguousarray(field[mask]).tobytes())
        rows.append(batch.n_tokens)
        documents = max(documents, int(batch.document.max()))
    if not rows:
        raise DatasetError("the corpus gives no tokens; pass some text.")
    return rows, {"tokens": int(sum(rows)), "documents": documents + 1, "sha256": digest.hexdigest()}


def _shards(rows: list[int], shard_batches: int) -> list[dict]:
    shards, token = [], 0
    for k, first in enumerate(range(0, len(rows), shard_batches)):
        last = min(first + shard_batches, len(rows))
        n = int(sum(rows[first:last]))
        shards.append({"shard": k, "file": f"shard-{k:06d}.safetensors", "batches": [first, last], "rows": n, "tokens": [token, token + n]})
        token += n
    return shards


def model_identity(model) -> dict[str, Any]:
    """What identifies the model's activations: class, family, weights and their sha256 (and,
    for a model sharded across the ranks, how: every rank's part of the weights counts)."""
    from .architecture import model_type

    report = model.load_report or {}
    arch = model.architecture
    source = report.get("file") or report.get("directory") or report.get("repo")
    identity = {
        "class": type(model.model).__name__,
        "model_type": model_type(model.model),
        "family": arch.family if arch else None,
        "n_layers": arch.n_layers if arch else None,
        "weights": report.get("weights", "as given"),
        "weights_sha256": _weights_sha256(model, source),
    }
    sharding = getattr(model, "sharding", None)
    if sharding is not None:
        identity["sharding"] = f"{sharding.mode} parallel over {sharding.size} ranks"
    return identity


def _writers(model, site_list: list[Site]) -> dict[str, int] | None:
    """For a sharded model, the rank that writes each site: rank 0 under tensor parallelism,
    the rank that runs the site's layer under pipeline parallelism (rank 0 for sites outside
    the blocks); None for a model that is not sharded."""
    sharding = getattr(model, "sharding", None)
    if sharding is None:
        return None
    writers = {}
    for site in site_list:
        layer = sharding.layer_of(site.raw)
        writers[site.name] = sharding.owner(layer) if sharding.mode == "pipeline" and layer is not None else 0
    return writers


_HASHES: dict[tuple, str] = {}


def _weights_sha256(model, source: str | None) -> str:
    """sha256 of the weights file (or of a directory's .safetensors / .gguf files, in name
    order), else of the parameters as they are in memory."""
    path = Path(source) if source else None
    sharding = getattr(model, "sharding", None)
    if sharding is not None and not (path is not None and path.exists()):
        from .distributed import gather_bytes

        mine = _weights_sha256_in_memory(model)  # this rank's part: the parts in rank order
        return hashlib.sha256(b"".join(gather_bytes(mine.encode(), sharding.group))).hexdigest()
    if path is not None and path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf")) if path.is_dir() else [path]
        key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if key not in _HASHES:
            _HASHES[key] = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest() if len(files) > 1 else sha256_file(files[0])
        return _HASHES[key]
    return _weights_sha256_in_memory(model)


def _weights_sha256_in_memory(model) -> str:
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    for name, value in tree_flatten(model.model.parameters()):
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        mx.eval(value)
        digest.update(memoryview(value.view(mx.uint8) if value.dtype == mx.bfloat16 else value).cast("B"))
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """The tokenizer's class, special ids, and the sha256 of its serialised form where it has one."""
    from .inputs import vocab_size

    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", inner)
    serial = backend.to_str() if hasattr(backend, "to_str") else None
    return {
        "class": type(inner).__name__,
        "vocab_size": vocab_size(tokenizer),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_id": pad_id(tokenizer),
        "sha256": hashlib.sha256(serial.encode()).hexdigest() if serial else None,
    }


# -- the folder ------------------------------------------------------------------------------


def _lock_folder(out: Path, rank: int) -> tuple[Path, int] | None:
    """Hold this rank's writer lock on ``out`` (creating the folder): an advisory ``flock`` on
    ``writer-rank{rank}.lock``, whose content names the holder. Two jobs writing one folder both
    have a rank 0, so the second is refused at once (the ranks of one job lock different files).
    The system releases the lock when its process exits, killed or not, so a lock file left
    behind never blocks a later run. Returns (path, descriptor), or None where the OS or the
    filesystem has no flock."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file; cache_activations needs a folder (a new or empty one).")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer per folder is then up to the user
        fcntl = None
    path, fd = out / f"writer-rank{rank}.lock", None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return None
        while fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise DatasetError(_refusal(out, path, holder)) from None
            except OSError as e:
                os.close(fd)
                warnings.warn(f"{path} cannot be locked ({e.strerror}): make sure no other process writes to {out}.", stacklevel=3)
                return None
            if not _same_file(path, fd):  # its holder released and removed it after we opened it
                os.close(fd)
                fd = None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        raise DatasetError(f"{out} cannot be written ({e.strerror or e}); choose a folder you can write to (nothing was written).") from None
    return path, fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _unlock_folder(lock: tuple[Path, int] | None) -> None:
    if lock is not None:
        path, fd = lock
        path.unlink(missing_ok=True)  # removed while still held: no one can lock the old file after us
        os.close(fd)


def _holder(fd: int, wait: float = 2.0) -> dict | None:
    """Who holds the lock, as its file names them. The holder writes its name just after taking
    the lock, so a writer refused in that instant reads an empty file, or the name a killed
    writer left behind: read again, briefly, until the file names a living process."""
    end = time.monotonic() + wait
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            pid, host, _ = int(info["pid"]), info["host"], info["started"]
        except (ValueError, KeyError, TypeError, OSError):
            info = None
        else:
            if host != socket.gethostname() or _alive(pid):
                return info
        if time.monotonic() > end:
            return None
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        pass
    return True


def _refusal(out: Path, path: Path, info: dict | None) -> str:
    if info is None:
        who = "a process that is just starting"
    else:
        who = (f"process {info['pid']} on {info['host']}, started {info['started']}"
               + (f" ({info['command']})" if info.get("command") else ""))
    return (
        f"{out} is being written by another process: {who}. Two writers in one folder would corrupt it, "
        "so this one stopped before changing anything. Wait for that process to finish and rerun this "
        "call (it resumes, or finds the dataset done), stop that process, or write to another folder. "
        f"(The lock is {path.name}; the system releases it when that process exits, even if it is killed.)"
    )


def _read_settings(path: Path) -> dict:
    return read_json(path, "the settings of an activation dataset", error=DatasetError,
                     advice="Use another folder, or overwrite=True (--overwrite) to replace it.")


def _prepare_folder(out: Path, settings: dict, fingerprint: str, overwrite: bool) -> None:
    """Rank 0, holding the lock: make sure ``out`` is empty, or holds this very cache (to
    resume), or is cleared. Lock files stay: each is held by a rank of this job."""
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    ours = [p for p in entries if _OURS.match(p.name) and not _LOCK.match(p.name)]
    foreign = [p for p in entries if not _OURS.match(p.name)]
    existing = next((p for p in (out / SETTINGS, out / MANIFEST) if p.is_file()), None)
    if foreign and existing is None:
        raise DatasetError(
            f"{out} holds files that are not an mlxterp activation dataset ({', '.join(p.name for p in foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder (nothing was written)."
        )
    if overwrite:
        for p in ours:
            p.unlink()
    elif existing is not None:
        _check_settings(out, _read_settings(existing), settings)
    for p in out.glob("*.tmp"):  # a killed run's half-written file
        p.unlink()
    if overwrite or not (out / SETTINGS).is_file():
        write_json(out / SETTINGS, {**settings, "fingerprint": fingerprint})


def _check_settings(out: Path, existing: dict, settings: dict) -> None:
    differ = [k for k in settings if existing.get(k) != settings[k]]
    if not differ:
        return
    lines = []
    for key in differ:
        old, new = existing.get(key), settings[key]
        if key == "sites":
            old = [s["name"] + ":" + s["dtype"] for s in old or []]
            new = [s["name"] + ":" + s["dtype"] for s in new]
        lines.append(f"{key}: the folder has {_short(old)}, this call asks for {_short(new)}")
    raise DatasetError(
        f"{out} holds a different activation dataset ({'; '.join(lines)}). Use another folder, or "
        "overwrite=True (--overwrite) to replace it; nothing was written."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _journal_entries(out: Path, fingerprint: str) -> dict[tuple[int, int | None], dict]:
    """(shard, part) -> the last journal entry of that file (part None: a whole shard)."""
    entries: dict[tuple[int, int | None], dict] = {}
    for path in sorted(out.glob("journal-rank*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
                continue
            shard, part = entry.get("shard"), entry.get("part")
            if isinstance(shard, int) and (part is None or isinstance(part, int)):
                entries[shard, part] = entry
    return entries


def _shard_file(k: int, part: int | None) -> str:
    return f"shard-{k:06d}.safetensors" if part is None else f"shard-{k:06d}-rank{part}.safetensors"


def _verified(out: Path, fingerprint: str, mine: list[int], part: int | None = None) -> dict[int, dict]:
    """This rank's shards (or its parts of them) that are on disk and match their journal checksum."""
    journal = _journal_entries(out, fingerprint)
    done = {}
    for k in mine:
        entry = journal.get((k, part))
        path = out / _shard_file(k, part)
        if entry is None or not path.is_file():
            continue
        if path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256"):
            done[k] = entry
        else:
            # stacklevel: the caller of model.cache_activations (through cache_activations and _write)
            warnings.warn(f"{path.name} does not match its recorded checksum: re-making it.", stacklevel=5)
    return done


def _write_manifest(out, settings, fingerprint, shards, entries, seconds) -> None:
    import mlxterp_core

    parts = settings.get("parts")
    by_file = {(e["shard"], e.get("part")): e for e in entries}
    wanted = [(s["shard"], None if parts is None else int(r)) for s in shards for r in (parts or [None])]
    missing = sorted({k for k, r in wanted if (k, r) not in by_file})
    if missing:
        raise DatasetError(f"shards {missing[:5]} of {out} were not written; rerun the same command to finish them.")
    listed = []
    for s in shards:
        if parts is None:
            e = by_file[s["shard"], None]
            listed.append({**s, "sha256": e["sha256"], "bytes": e["bytes"], "rank": e["rank"], "host": e["host"]})
            continue
        files = []
        for r, names in parts.items():
            e = by_file[s["shard"], int(r)]
            files.append({"file": _shard_file(s["shard"], int(r)), "sites": names, "sha256": e["sha256"],
                          "bytes": e["bytes"], "rank": e["rank"], "host": e["host"]})
        first = files[0]
        listed.append({**s, "file": first["file"], "sha256": first["sha256"], "bytes": sum(f["bytes"] for f in files),
                       "rank": first["rank"], "host": first["host"], "parts": files})
    n_tokens = sum(s["rows"] for s in shards)
    manifest = {
        **settings,
        "complete": True,
        "fingerprint": fingerprint,
        "n_tokens": n_tokens,
        "row_fields": ROW_FIELDS,
        "shards": listed,
        "software": {"mlx": mx.__version__, "mlxterp": mlxterp_core.__version__},
        "last_run": {"seconds": round(seconds, 3)},
    }
    write_json(out / MANIFEST, manifest)


# -- the work --------------------------------------------------------------------------------


class _Writer:
    """A background thread that runs write tasks in order, so the model never waits on the
    disk; ``put`` blocks when ``depth`` tasks are waiting (bounding memory), and re-raises the
    first error a task raised."""

    def __init__(self, depth: int = 2):
        self.tasks: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="mlxterp-cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (task := self.tasks.get()) is not None:
            if self.error is None:
                try:
                    task()
                except BaseException as e:  # noqa: BLE001  handed to the main thread
                    self.error = e

    def put(self, task: Callable[[], None]) -> None:
        self.check()
        self.tasks.put(task)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.tasks.put(None)
        self.thread.join()
        self.check()


def _run(model, tokens, windows, site_list, stop, shards, compute, write, out, fingerprint, rank, size, progress,
         my_sites=None, part=None):
    """Compute the batches of the shards ``compute`` and write this rank's sites (``my_sites``,
    default all) of the shards ``write`` (or its ``part`` of them); their journal entries."""
    from .progress import progress_bar

    todo = list(compute)
    if not todo:
        return {}
    todo_set = set(todo)
    my_sites = site_list if my_sites is None else my_sites
    sharding = getattr(model, "sharding", None)
    staged = sharding is not None and sharding.mode == "pipeline"
    read_sites = my_sites if staged else site_list  # a stage reads what it holds; the rest all of it
    batch_shard = {}
    for s in shards:
        for b in range(*s["batches"]):
            batch_shard[b] = s["shard"]
    total = sum(shards[k]["rows"] for k in todo if k in write) if my_sites else 0
    label = "caching" + (f" rank {rank}/{size}" if size > 1 else "")
    bar = progress_bar(total, label, progress is not False, unit="tok")
    journal = out / f"journal-rank{rank}.jsonl"
    host = socket.gethostname()
    written: dict[int, dict] = {}
    writer = _Writer()
    current: dict[str, Any] = {}
    opened: set[ShardFile] = set()  # files not yet published (the writer removes finished ones)
    state = {"row": 0}

    def dispatch(batch: Windows, rows: dict[str, Any]) -> None:
        """Hand a computed batch to the writer, opening and closing its shard's file."""
        nonlocal current
        k = batch_shard[batch.index]
        shard = shards[k]
        if batch.index == shard["batches"][0]:
            file = ShardFile(out / _shard_file(k, part), _layout(my_sites, shard["rows"]), {"format": FORMAT, "shard": str(k), "fingerprint": fingerprint})
            current = {"file": file, "shard": k, "started": time.perf_counter()}
            opened.add(file)
            state["row"] = 0
        mx.eval(list(rows.values()))
        rows = {**{s.name: rows[s.name] for s in my_sites}, **_batch_fields(batch)}
        file, row = current["file"], state["row"]
        writer.put(lambda: _write_batch(file, row, rows))
        state["row"] += batch.n_tokens
        bar.update(batch.n_tokens)
        if batch.index == shard["batches"][1] - 1:
            entry = {"fingerprint": fingerprint, "shard": k, "rank": rank, "host": host}
            if part is not None:
                entry["part"] = part
            started = current["started"]
            writer.put(lambda: _finish(file, entry, journal, written, started, opened))
            current = {}

    try:
        reader = SiteReader(model, site_list, stop=stop, gather=not staged)
        pending = None
        for batch in tokens.windows(**windows):
            if batch_shard[batch.index] not in todo_set:
                continue
            rows = _batch_rows(reader, batch, read_sites)
            mx.async_eval(list(rows.values()))  # computes while the previous batch is handed on
            if batch_shard[batch.index] not in write or not my_sites:
                continue  # this rank takes part in the forward pass; another writes the shard
            if pending is not None:
                dispatch(*pending)
            pending = (batch, rows)
        if pending is not None:
            dispatch(*pending)
        writer.close()
    except BaseException:
        writer.error = writer.error or RuntimeError("cancelled")  # the thread skips what is queued
        writer.tasks.put(None)
        writer.thread.join()
        for file in opened:
            file.discard()
        raise
    finally:
        bar.close()
    return written


def _layout(site_list: list[Site], rows: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    layout = {s.name: (dtype_code(s.dtype), (rows, *s.shape)) for s in site_list}
    layout.update({name: (code, (rows,)) for name, code in ROW_FIELDS.items()})
    return layout


def _batch_rows(reader, batch: Windows, site_list: list[Site]) -> dict[str, mx.array]:
    """Site name -> the (n_tokens, d) rows of the batch's real tokens (lazy)."""
    acts, _ = reader.read(batch.inputs)
    rows = take_rows(acts, batch.mask)
    return {s.name: _stored(rows[s.name].astype(s.dtype)) for s in site_list}


def _stored(x: mx.array) -> mx.array:
    return x.view(mx.uint16) if x.dtype == mx.bfloat16 else x


def _batch_fields(batch: Windows) -> dict[str, np.ndarray]:
    mask = batch.mask
    n, t = batch.tokens.shape
    fields = {
        "tokens": batch.tokens[mask],
        "document": batch.document[mask],
        "position": batch.position[mask],
        "window": np.broadcast_to(np.arange(batch.first_window, batch.first_window + n, dtype=np.int32)[:, None], (n, t))[mask],
        "offset": np.broadcast_to(np.arange(t, dtype=np.int32)[None, :], (n, t))[mask],
        "bos": batch.bos[mask],
    }
    return {name: np.ascontiguousarray(values) for name, values in fields.items()}


def _write_batch(file: ShardFile, row: int, rows: dict[str, Any]) -> None:
    for name, values in rows.items():
        file.write_rows(name, row, values)


def _finish(file: ShardFile, entry: dict, journal: Path, written: dict, started: float, opened: set) -> None:
    digest, size = file.finish()
    opened.discard(file)
    entry = {**entry, "sha256": digest, "bytes": size, "seconds": round(time.perf_counter() - started, 3)}
    with open(journal, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    written[entry["shard"]] = entry
