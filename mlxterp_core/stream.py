"""The activation stream: one source of activations at sites for every consumer.

::

    corpus -> tokenized once (corpus.py) -> batches of token windows
        -> one forward per batch recording the sites, stopped after the last block they need
           (:func:`site_batches`: the windows and {site: (B, T, ...)}, plus the model's output
           when asked)
        -> rows {site: (n, d)} at the positions a trainer uses (:func:`trainable`)
        -> a mixing buffer (:class:`MixingBuffer`) -> shuffled batches of rows (:class:`Batches`)

or, from an :class:`~mlxterp_core.dataset.ActivationDataset`, the rows stored in its shards
(:class:`DatasetRows`), through the same policy and the same buffer. Readers: the cache writer
(every real token, in order), ``train_sae`` (shuffled rows of several sites from one forward),
SAE evaluation and top activations (rows in order), tuned-lens training and evaluation (rows
with the model's own logits), probe collection (one row per prompt).

Which rows are trained on is decided here and nowhere else (:func:`trainable`): every real
token except BOS tokens and the first position of each window. Padding is never a row. The
first position of a window has nothing before it, so the model treats it as an attention sink
whatever the token: on the default model its residual stream's norm is ~100x the others', and
that 1 token in 128 carries 98% of the stream's variance. A dataset stores every real token,
with flags (``bos``, ``offset``) that let its reader apply the same policy.

Resume: a row source has a position (batches or shards read), and a :class:`Batches` stream
has a state (its buffer's rows, what it has served, its random generator and the source's
position) that a checkpoint holds, so a resumed run sees exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from .errors import DatasetError, InputError

# standard names whose tensors are not one row per token
NOT_ROWS = {"attn.q_heads", "attn.k_heads", "attn.v_heads", "attn.z_heads", "attn.q_rot", "attn.k_rot", "attn.pattern"}


# -- which rows ---------------------------------------------------------------------------------


def trainable(windows) -> np.ndarray:
    """(B, T) bool: the positions of a batch of :class:`~mlxterp_core.corpus.Windows` that
    trainers train and evaluate on: real tokens, not BOS, not the first position of a window
    (the module doc says why)."""
    keep = windows.mask & ~windows.bos
    keep[:, 0] = False
    return keep


def trainable_stored(bos: np.ndarray, offset: np.ndarray, skip_bos: bool = True, skip_first: bool = True) -> np.ndarray:
    """The same policy over a dataset's stored rows (``bos`` flags, ``offset`` in the window);
    ``skip_bos`` / ``skip_first`` False keep those rows too."""
    keep = np.ones(len(bos), dtype=bool)
    if skip_bos:
        keep &= ~np.asarray(bos, dtype=bool)
    if skip_first:
        keep &= np.asarray(offset) != 0
    return keep


# -- sites --------------------------------------------------------------------------------------


@attrs.frozen
class Site:
    """One tensor the stream reads: its name, the raw site it is recorded at, how it is read
    from there (a schema view, or None), one row's shape, its dtype, and the block it is
    computed in (-1: before the first block; None: after the blocks, or unknown)."""

    name: str
    raw: str
    read: Callable[[mx.array], mx.array] | None
    shape: tuple[int, ...]
    dtype: mx.Dtype
    layer: int | None

    def value(self, recorded: dict[str, mx.array]) -> mx.array:
        x = recorded[self.raw]
        return self.read(x) if self.read is not None else x


def resolve_sites(model, names: Sequence[str], probe: mx.array, dtype: mx.Dtype | None = None,
                  seen: dict[str, mx.array] | None = None, meant: dict[str, list[str]] | None = None) -> list[Site]:
    """The tensors ``names`` mean (standard names, raw names, raw globs), in order, each
    checked on a short ``probe`` (1, T) forward pass to be one row per token; ``dtype``
    overrides their dtype; the raw records of the probe pass go into ``seen`` when given, and
    each name given -> the names of the sites it means into ``meant``."""
    from .names import parse
    from .sites import canonical_site, is_glob, layer_of, matches
    from .trace import Hooks, resolve_name

    asked: list[tuple[str, Any]] = []
    capture: list[str] = []
    for name in names:
        for resolved in resolve_name(model, name):
            if isinstance(resolved, str):  # a raw site (or glob): given so, or a module path without 'model.'
                asked.append((name, resolved))
                capture.append(resolved)
                continue
            if parse(resolved.name).sub in NOT_ROWS:
                raise DatasetError(
                    f"{name!r} ({resolved.name}) is not one row per token, so it cannot be read as "
                    "(rows, d); use the (B, T, H*D) name instead (e.g. 'layers[i].attn.q' or '.attn.z')."
                )
            asked.append((name, resolved))
            capture.append(resolved.site)
    with Hooks(model, capture=capture) as hooks:
        _, recorded = hooks(probe)
    if seen is not None:
        seen.update(recorded)
    length = probe.shape[1]
    found: dict[str, Site] = {}
    for name, resolved in asked:
        if not isinstance(resolved, str):
            candidates = [(resolved.name, resolved.site, resolved.read if resolved.view else None, layer_of(resolved.name))]
        else:
            keys = [k for k in recorded if matches(k, resolved)] if is_glob(resolved) else [canonical_site(resolved)]
            candidates = [(k, k, None, layer_of(k)) for k in keys]
        for stored, raw, read, layer in candidates:
            value = read(recorded[raw]) if read else recorded[raw]
            if not isinstance(value, mx.array) or value.ndim < 2 or tuple(value.shape[:2]) != (1, length):
                shape = tuple(value.shape) if isinstance(value, mx.array) else type(value).__name__
                raise DatasetError(
                    f"site {stored!r} (from {name!r}) has shape {shape} for 1 x {length} tokens: not one "
                    "row per token, so it cannot be read as (rows, d)."
                )
            width = int(np.prod(value.shape[2:], dtype=np.int64))
            if not mx.issubdtype(value.dtype, mx.floating):
                raise DatasetError(f"site {stored!r} holds {value.dtype} values, not activations.")
            found.setdefault(stored, Site(stored, raw, read, (width,), dtype or value.dtype, layer))
            if meant is not None:
                meant.setdefault(name, []).append(stored)
    return list(found.values())


def stop_for(model, sites: Sequence[Site], probe: mx.array | None = None,
             whole: dict[str, mx.array] | None = None) -> str | None:
    """Where a pass that reads ``sites`` can stop (for ``Hooks(stop_after=...)``), or None
    (run everything). With a ``probe`` (B, T) the stop is checked: a stopped pass must record
    every site, each equal to the whole pass's value (``whole``: raw site -> value, if already
    run); a model that computes its blocks in another order (or reuses one) runs whole."""
    from .sites import stop_name
    from .trace import Hooks

    stop = stop_name(s.layer for s in sites)
    if stop is None or probe is None:
        return stop
    raws = sorted({s.raw for s in sites})
    if whole is None or any(raw not in whole for raw in raws):
        with Hooks(model, capture=raws) as hooks:
            _, whole = hooks(probe)
    with Hooks(model, capture=raws, stop_after=stop) as hooks:
        _, stopped = hooks(probe)
    if any(raw not in stopped or not mx.array_equal(stopped[raw], whole[raw]).item() for raw in raws):
        return None
    return stop


# -- reading sites from forward passes ----------------------------------------------------------


class SiteReader:
    """Forward passes that record ``sites``, stopped after the last block they need (unless
    ``outputs``: then the model runs to the end and its output is returned too).
    ``read(inputs)`` gives ``({site name: (B, T, ...)}, output or None)``, lazy; the probes are
    installed for that pass only, so the caller may run other traces between reads. ``stop``
    is the stop :func:`stop_for` worked out."""

    def __init__(self, model, sites: Sequence[Site], *, outputs: bool = False, stop: str | None = None,
                 saes: Any = None, gather: bool = True):
        from .trace import Hooks

        self.sites = list(sites)
        capture = sorted({s.raw for s in self.sites})
        self.hooks = Hooks(model, capture=capture, saes=saes, stop_after=None if outputs else stop, gather=gather)

    def read(self, inputs: mx.array) -> tuple[dict[str, mx.array], Any]:
        """The sites (``gather=False`` on a sharded model: those this rank holds) and the output."""
        with self.hooks:
            output, recorded = self.hooks(inputs, evaluate=False)
        return {s.name: s.value(recorded) for s in self.sites if s.raw in recorded}, output


def site_batches(model, batches: Iterable, names: Sequence[str] | Sequence[Site], *, outputs: bool = False,
                 saes: Any = None) -> Iterator[tuple[Any, dict[str, mx.array], Any]]:
    """``(windows, {site: (B, T, ...)}, output)`` for each batch of token windows (or of
    prepared inputs: anything with ``.inputs`` or an mx.array), one forward pass each; the
    sites (names, resolved on the first batch; the result holds each under its resolved name
    and, where it means one site, under the name given too) in their own dtype, lazy;
    ``output`` is the model's output when ``outputs`` is set, else None (the forward stops
    early)."""
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return
    aliases: dict[str, str] = {}
    if names and isinstance(names[0], Site):
        sites = list(names)
        stop = None if outputs or saes is not None else stop_for(model, sites)
    else:
        probe = _inputs(first)[:1, : min(5, _inputs(first).shape[1])]
        whole: dict[str, mx.array] = {}
        meant: dict[str, list[str]] = {}
        sites = resolve_sites(model, names, probe, seen=whole, meant=meant)
        aliases = {given: found[0] for given, found in meant.items() if len(found) == 1 and given != found[0]}
        stop = None if outputs or saes is not None else stop_for(model, sites, probe, whole)
    reader = SiteReader(model, sites, outputs=outputs, stop=stop, saes=saes)
    for batch in itertools.chain([first], iterator):
        acts, output = reader.read(_inputs(batch))
        for given, name in aliases.items():
            acts[given] = acts[name]
        yield batch, acts, output


def _inputs(batch) -> mx.array:
    return batch if isinstance(batch, mx.array) else batch.inputs


def take_rows(acts: dict[str, mx.array], keep: np.ndarray) -> dict[str, mx.array]:
    """{site: (n, d)}: the rows of (B, T, ...) activations where ``keep`` (B, T) is True,
    in order (lazy)."""
    if keep.all():
        return {name: a.reshape(-1, int(np.prod(a.shape[2:], dtype=np.int64))) for name, a in acts.items()}
    index = mx.array(np.flatnonzero(keep.reshape(-1)).astype(np.int32))
    return {name: mx.take(a.reshape(-1, int(np.prod(a.shape[2:], dtype=np.int64))), index, axis=0)
            for name, a in acts.items()}


# -- sources of rows ----------------------------------------------------------------------------


class RowSource:
    """Chunks of rows ``{key: (n, ...)}`` (every key the same n) in a deterministic order;
    ``position`` (JSON) says how far it has read, and a source given a position by
    ``restore`` starts from there. ``repeat``: start again at the end (an endless source)."""

    def __init__(self, repeat: bool):
        self.repeat = repeat
        self._restored: dict[str, Any] | None = None

    @property
    def position(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, position: dict[str, Any]) -> None:
        self._restored = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


class TextRows(RowSource):
    """Rows at ``names`` traced from a corpus on the fly: the corpus tokenized once, cut into
    windows of ``context_size`` tokens, ``batch_size`` windows per forward pass (stopped
    after the last block needed), the :func:`trainable` rows of each pass one chunk
    (``skip_first=False``: window starts too). ``outputs``: the model runs to the end and each
    chunk also holds its output's rows under ``"output"`` (a language model's logits).
    ``encoding`` and ``errors`` decode corpus files (see :func:`~mlxterp_core.corpus.read_documents`)."""

    def __init__(self, model, corpus: Any, names: Sequence[str], *, context_size: int, batch_size: int,
                 repeat: bool = True, skip_first: bool = True, outputs: bool = False,
                 encoding: str = "utf-8", errors: str = "strict"):
        from .corpus import tokenize

        super().__init__(repeat)
        if model.tokenizer is None:
            raise InputError("reading activations from texts needs a model with a tokenizer.")
        self.model, self.names, self.outputs = model, list(names), outputs
        self.context_size, self.batch_size, self.skip_first = context_size, batch_size, skip_first
        self.tokens = tokenize(model, corpus, encoding=encoding, errors=errors)
        self.batches_read = 0

    @property
    def position(self) -> dict[str, Any]:
        return {"batches": self.batches_read}

    def windows(self) -> Iterator:
        return self.tokens.windows(self.context_size, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[dict[str, mx.array]]:
        skip = (self._restored or {}).get("batches", 0)
        self.batches_read = 0
        keep_all = not self.skip_first

        def epochs():
            while True:
                empty = True
                for windows in self.windows():
                    empty = False
                    self.batches_read += 1
                    if self.batches_read > skip:
                        yield windows
                if empty or not self.repeat:
                    return

        for windows, acts, output in site_batches(self.model, epochs(), self.names, outputs=self.outputs):
            keep = windows.mask & ~windows.bos if keep_all else trainable(windows)
            if keep.any():
                yield take_rows({**acts, "output": output} if self.outputs else acts, keep)


class DatasetRows(RowSource):
    """Rows of ``sites`` stored in an ActivationDataset, one shard a chunk, shards in a random
    order (each pass a new one, from ``rng``) or in dataset order; the :func:`trainable_stored`
    policy applied; ``with_index`` adds each row's index in the dataset under ``"index"`` (numpy).
    Rows come as MLX arrays in their stored dtype."""

    def __init__(self, dataset, sites: Sequence[str], *, rng: np.random.Generator | None, repeat: bool = False,
                 skip_bos: bool = True, skip_first: bool = True, with_index: bool = False):
        super().__init__(repeat)
        self.dataset, self.sites = dataset, [dataset.site_name(s) for s in sites]
        self.rng, self.skip_bos, self.skip_first, self.with_index = rng, skip_bos, skip_first, with_index
        self.passes, self.order, self.next = 0, [], 0  # whole passes read; this pass's shard order; its next shard

    @property
    def position(self) -> dict[str, Any]:
        return {"passes": self.passes, "order": list(self.order), "next": self.next}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        starts = np.cumsum([0] + [s["rows"] for s in ds.shards])
        start = self._restored or {"passes": 0, "order": [], "next": 0}
        self.passes, self.order, self.next = start["passes"], list(start["order"]), start["next"]
        while True:
            if not self.order:
                order = self.rng.permutation(len(ds.shards)) if self.rng is not None else range(len(ds.shards))
                self.order, self.next = [int(k) for k in order], 0
            while self.next < len(self.order):
                k = self.order[self.next]
                self.next += 1
                keep = trainable_stored(ds.shard_field(k, "bos"), ds.shard_field(k, "offset"), self.skip_bos, self.skip_first)
                chunk = {site: ds.shard_rows(k, site, keep, as_mx=True) for site in self.sites}
                if self.with_index:
                    chunk["index"] = np.arange(starts[k], starts[k + 1])[keep]
                yield chunk
            self.passes, self.order, self.next = self.passes + 1, [], 0
            if not self.repeat:
                return


class ArrayRows(RowSource):
    """Rows of arrays given in memory ({key: (N, d)}), ``chunk`` rows at a time."""

    def __init__(self, arrays: dict[str, Any], chunk: int = 8192, repeat: bool = True):
        super().__init__(repeat)
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise InputError(f"the activation arrays have different numbers of rows: {sorted(sizes)}.")
        self.arrays, self.chunk, self.rows = arrays, chunk, sizes.pop()
        self.chunks_read = 0

    @property
    def position(self) -> dict[str, Any]:
        return {"chunks": self.chunks_read}

    def __iter__(self) -> Iterator[dict[str, mx.array]]:
        skip = (self._restored or {}).get("chunks", 0)
        self.chunks_read = 0
        while True:
            for start in range(0, self.rows, self.chunk):
                self.chunks_read += 1
                if self.chunks_read > skip:
                    yield {k: a[start : start + self.chunk] for k, a in self.arrays.items()}
            if not self.repeat or self.rows == 0:
                return


# -- the mixing buffer --------------------------------------------------------------------------


class MixingBuffer:
    """Rows mixed before they are served, SAELens's way: chunks are held until ``size +
    batch_size`` rows are there, then all held rows are permuted and served in batches but
    ``max(size // 2, batch_size)``, which stay to mix with the next fill. Without a random
    generator nothing is permuted and rows are served as soon as a batch is full. Memory is
    bounded by about ``size + batch_size + one chunk`` rows. Rows are numpy or MLX arrays,
    as they come."""

    def __init__(self, batch_size: int, size: int, rng: np.random.Generator | None):
        self.batch_size, self.rng = batch_size, rng
        self.size = size if rng is not None else 0
        self.keep = max(size // 2, batch_size) if rng is not None else 0
        self.pending: list[dict[str, Any]] = []  # chunks added since the last fill, then the rows kept
        self.count = 0
        self.ready: dict[str, Any] = {}  # permuted rows being served
        self.served = 0

    def pop(self) -> dict[str, Any] | None:
        """The next batch, or None when a chunk must be added (or the buffer flushed)."""
        if not self.ready:
            return None
        n = len(next(iter(self.ready.values())))
        if self.served >= n:
            self.ready, self.served = {}, 0
            return None
        batch = {k: v[self.served : self.served + self.batch_size] for k, v in self.ready.items()}
        self.served += self.batch_size
        return batch

    def add(self, chunk: dict[str, Any]) -> None:
        n = len(next(iter(chunk.values())))
        if n:
            self.pending.append(chunk)
            self.count += n
        if self.count >= self.size + self.batch_size:
            self._fill(self.count - self.keep)

    def flush(self, drop_last: bool = False) -> None:
        """Serve everything held (the source has ended): full batches, and a last short one
        unless ``drop_last``."""
        served = self.count // self.batch_size * self.batch_size if drop_last else self.count
        self._fill(served, last=True)

    def _fill(self, served: int, last: bool = False) -> None:
        if not self.pending:
            return
        rows = {k: _concatenate([c[k] for c in self.pending]) for k in self.pending[0]}
        if self.rng is not None:
            order = self.rng.permutation(self.count)
            rows = {k: _take(v, order) for k, v in rows.items()}
        if not last:
            served = served // self.batch_size * self.batch_size
        self.ready, self.served = {k: v[:served] for k, v in rows.items()}, 0
        if isinstance(next(iter(rows.values())), mx.array):
            # computed once (the batches are slices of it), without waiting: the consumer's
            # steps are built while the device fills the buffer
            mx.async_eval(self.ready)
        rest = {k: v[served:] for k, v in rows.items()} if not last else {}
        self.count = self.count - served if not last else 0
        self.pending = [rest] if self.count else []

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        """(tensors, JSON) that :meth:`restore` rebuilds this buffer from exactly."""
        tensors, kinds = {}, {}
        ready = {k: v[self.served :] for k, v in self.ready.items()}
        held = {k: _concatenate([c[k] for c in self.pending]) for k in self.pending[0]} if self.pending else {}
        for part, rows in (("ready", ready), ("held", held)):
            for key, value in rows.items():
                tensors[f"{part}.{key}"] = value if isinstance(value, mx.array) else mx.array(value)
                kinds[key] = "mlx" if isinstance(value, mx.array) else str(value.dtype)
        info = {"count": self.count, "kinds": kinds, "parts": sorted({t.split(".", 1)[0] for t in tensors}),
                "rng": self.rng.bit_generator.state if self.rng is not None else None}
        return tensors, info

    def restore(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        kinds = info["kinds"]

        def rows(part):
            found = {t.split(".", 1)[1]: v for t, v in tensors.items() if t.startswith(part + ".")}
            return {k: v if kinds[k] == "mlx" else np.array(v, dtype=kinds[k]) for k, v in found.items()}

        self.ready, self.served = rows("ready"), 0
        held = rows("held")
        self.pending = [held] if held else []
        self.count = info["count"]
        if self.rng is not None and info["rng"] is not None:
            self.rng.bit_generator.state = info["rng"]


def _concatenate(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    return mx.concatenate(parts) if isinstance(parts[0], mx.array) else np.concatenate(parts)


def _take(rows: Any, order: np.ndarray) -> Any:
    return mx.take(rows, mx.array(order.astype(np.int32)), axis=0) if isinstance(rows, mx.array) else rows[order]


class Batches:
    """Batches of rows ``{key: (batch_size, ...)}`` from a :class:`RowSource` through a
    :class:`MixingBuffer` (``shuffle=False``: in source order); an iterator whose ``state()``
    a checkpoint holds and whose ``restore()`` resumes it exactly. ``convert`` maps each
    served batch (e.g. numpy rows to MLX arrays in their stored dtype)."""

    def __init__(self, source: RowSource, batch_size: int, *, buffer_rows: int = 65_536, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, rng: np.random.Generator | None = None,
                 convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        rng = rng if rng is not None else np.random.default_rng(seed)
        self.source = source
        self.buffer = MixingBuffer(batch_size, buffer_rows, rng if shuffle else None)
        self.drop_last, self.convert = drop_last, convert
        self._chunks: Iterator | None = None
        self._ended = False

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._chunks is None:
            self._chunks = iter(self.source)
        while True:
            batch = self.buffer.pop()
            if batch is not None:
                return self.convert(batch) if self.convert is not None else batch
            if self._ended:
                raise StopIteration
            chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
                self.buffer.flush(self.drop_last)
            else:
                self.buffer.add(chunk)

    def state(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        tensors, info = self.buffer.state()
        return tensors, {"buffer": info, "source": self.source.position}

    def restore(self, tensors: dict[str, mx.array], info: dict[str, Any]) -> None:
        if self._chunks is not None:
            raise InputError("restore a stream before reading from it.")
        self.buffer.restore(tensors, info["buffer"])
        self.source.restore(info["source"])
