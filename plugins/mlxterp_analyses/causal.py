"""Causal reuse: re-enter the corrupted forward pass where a patch first changes anything.

A patch at block l, position p changes nothing before block l and, attention being causal,
nothing at positions before p. So a patched row starts from the corrupted run's residual stream
entering block l, runs positions p.. only, with the corrupted run's keys and values for the
positions before p in mlx-lm KV caches, and is unembedded only at the positions the metric reads.

Blocks are called the way the model calls them. A dry run of the model on positions p.. (each
block replaced by the identity, stopped at the final norm) records the arguments the model gives
each block (masks, caches, whatever the family passes), and each block is then called with those,
a batch of rows and a batched copy of its cache. The blocks, the final norm and the unembedding
come from the architecture schema; interventions inside a block go through ``Hooks`` and the
standard names, exactly as in a whole forward pass.

Exactness is checked, not assumed: the first batch of a sweep and the one of its latest start
carry an unpatched control row whose logits must reproduce the corrupted run's. A model whose
caches are not plain KV caches (sliding windows, state-space layers), whose blocks do not take
the cache they are given, or that fails the check raises :class:`CannotReuse`, and the sweep
runs whole forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx

from mlxterp.plugin import interventions, read_attribute
from mlxterp.plugin import probes_installed
from mlxterp.plugin import Activations, Hooks


class CannotReuse(Exception):
    """This model or sweep cannot be re-entered exactly: run whole forward passes instead."""


@attrs.frozen(eq=False)
class Row:
    """One patched row of a sweep, as the re-entered pass sees it.

    ``layer``: the first block the row runs (``n_layers``: none, straight to the final norm).
    ``start``: the first position the patch can change. ``mask``: where the row is patched,
    over all target positions, (T, 1) or (H, T, 1) per head (None: nowhere). With ``source``
    (1, T, D) the row's residual stream entering ``layer`` is the corrupted one with ``source``
    where ``mask`` holds; without, block ``layer`` is patched inside (at the sweep's site).
    """

    index: int  # position in the sweep's list of cells; -1 for the control row
    layer: int
    start: int
    mask: mx.array | None = None
    source: mx.array | None = None

    @property
    def inside(self) -> bool:
        return self.mask is not None and self.source is None


class CorruptedRun:
    """The corrupted prompt run once, with what re-entering it needs: the residual stream
    entering every block, the keys and values of every block, the logits, and (per start
    position, from a dry run) the arguments the model passes to each block."""

    def __init__(self, model, ids: list[int]):
        from mlx_lm.models.cache import ConcatenateKVCache, KVCache, make_prompt_cache

        if model.sharding is not None and model.sharding.mode == "pipeline":
            raise CannotReuse("a pipeline-parallel model runs its blocks only through its own forward pass")
        arch = model.architecture
        try:
            kinds = {type(c) for c in make_prompt_cache(model.model)}
        except Exception as e:  # not an mlx-lm model
            raise CannotReuse(f"no mlx-lm prompt cache: {e}") from e
        if kinds != {KVCache} or len(arch.layers) != arch.n_layers:
            raise CannotReuse(f"caches {sorted(k.__name__ for k in kinds)} are not plain KV caches")
        self.model, self.ids, self.n_layers = model, ids, arch.n_layers
        self.caches = [ConcatenateKVCache() for _ in range(arch.n_layers)]
        names = [f"layers.{i}.input" for i in range(arch.n_layers)] + [f"layers.{arch.n_layers - 1}.output"]
        try:
            with Hooks(model, capture=names) as hooks:
                logits, recorded = hooks(mx.array([ids]), cache=self.caches)
        except TypeError as e:
            raise CannotReuse(f"the model does not take a cache: {e}") from e
        acts = Activations(recorded, model)
        # states[i]: the residual stream entering block i (1, T, D); states[n_layers]: leaving the last
        self.states = [acts[name] for name in names]
        self.logits = logits
        self._calls: dict[int, list[tuple[tuple, dict, Any]]] = {}

    @property
    def length(self) -> int:
        return len(self.ids)

    def prefix_cache(self, layer: int, start: int, rows: int):
        """A cache holding the corrupted keys and values of positions < ``start``, for ``rows`` rows."""
        from mlx_lm.models.cache import ConcatenateKVCache

        cache = ConcatenateKVCache()
        if start > 0:
            keys, values = self.caches[layer].state
            keys, values = keys[..., :start, :], values[..., :start, :]
            cache.state = (mx.broadcast_to(keys, (rows, *keys.shape[1:])), mx.broadcast_to(values, (rows, *values.shape[1:])))
        return cache

    def block_calls(self, start: int) -> list[tuple[tuple, dict, Any]]:
        """Per block: the positional and keyword arguments the model passes it when it runs
        positions ``start..`` after a cache of the positions before, and that cache."""
        if start in self._calls:
            return self._calls[start]
        arch = self.model.architecture
        caches = [self.prefix_cache(i, start, 1) for i in range(self.n_layers)]
        calls: list[tuple[tuple, dict, Any] | None] = [None] * self.n_layers

        def record(i):
            def probe(call, module, args, kwargs):
                calls[i] = (args, kwargs, caches[i])
                return args[0]  # the identity: only the arguments are wanted

            return probe

        def stop(call, module, args, kwargs):
            raise _DryRunDone

        targets = [(layer, record(i)) for i, layer in enumerate(arch.layers)]
        targets.append((read_attribute(arch.root, arch.schema.final_norm), stop))
        try:
            with probes_installed(targets):
                self.model.model(mx.array([self.ids[start:]]), cache=caches)
        except _DryRunDone:
            pass
        except Exception as e:
            raise CannotReuse(f"the dry run failed: {type(e).__name__}: {e}") from e
        for i, found in enumerate(calls):
            if found is None or not _mentions(found, caches[i]):
                raise CannotReuse(f"block {i} was not called with its cache")
        self._calls[start] = calls
        return calls


class _DryRunDone(Exception):
    pass


def _mentions(call: tuple[tuple, dict, Any], cache) -> bool:
    args, kwargs, _ = call
    return any(a is cache for a in args[1:]) or any(v is cache for v in kwargs.values())


def _swap(call: tuple[tuple, dict, Any], hidden: mx.array, cache) -> tuple[tuple, dict]:
    """The recorded arguments with the hidden state and the cache replaced."""
    args, kwargs, recorded = call
    args = (hidden, *(cache if a is recorded else a for a in args[1:]))
    kwargs = {k: cache if v is recorded else v for k, v in kwargs.items()}
    return args, kwargs


def run_rows(
    run: CorruptedRun,
    rows: list[Row],
    sub: str,
    sources: dict[int, mx.array],
    reads: int | None,
) -> mx.array:
    """Logits (n, R, V) of ``rows``, in the order given, at the last R = ``reads`` positions
    (None: all; positions before the batch's start are the corrupted run's). The batch runs
    positions from its earliest start on. ``sources[layer]``: the clean activation at
    ``layers[layer].<sub>`` re-indexed to target positions, for patches inside blocks. Lazy.
    """
    model, arch = run.model, run.model.architecture
    start = min(r.start for r in rows)
    calls = run.block_calls(start)
    order = sorted(rows, key=lambda r: r.layer)
    per_head = sub.endswith("_heads")
    hidden, active = None, []
    for layer in range(order[0].layer, arch.n_layers + 1):
        entering = [r for r in order if r.layer == layer]
        if entering:
            base = run.states[layer][:, start:]
            new = mx.concatenate([_entering(r, base, start) for r in entering])
            hidden = new if hidden is None else mx.concatenate([hidden, new])
            active += entering
        if layer == arch.n_layers:
            break
        if hidden is None:
            continue
        args, kwargs = _swap(calls[layer], hidden, run.prefix_cache(layer, start, hidden.shape[0]))
        inside = [r for r in entering if r.inside]
        if inside:
            source = sources[layer][:, :, start:] if per_head else sources[layer][:, start:]
            blank = mx.zeros_like(_from(inside[0].mask, start))
            mask = mx.stack([_from(r.mask, start) if r.layer == layer and r.inside else blank for r in active])

            patch = interventions.replace_where(mask, source)  # elementwise: runs where a head lives
            with Hooks(model, {f"layers.{layer}.{sub}": patch}, capture=[]) as hooks:
                out = hooks.call(arch.layers[layer], *args, **kwargs)
            hooks.check_reached()
        else:
            out = arch.layers[layer](*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    span = hidden.shape[1]
    wanted = run.length if reads is None else reads
    logits = arch.unembed(arch.final_norm(hidden[:, -min(wanted, span):]))
    if wanted > span:  # positions before the start: the corrupted run's logits
        before = run.logits[:, run.length - wanted : start].astype(logits.dtype)
        logits = mx.concatenate([mx.broadcast_to(before, (logits.shape[0], *before.shape[1:])), logits], axis=1)
    back = {id(r): i for i, r in enumerate(active)}
    return logits[mx.array([back[id(r)] for r in rows])]


def _from(mask: mx.array, start: int) -> mx.array:
    """A row's mask over positions ``start..`` (time is the second-last axis)."""
    return mask[..., start:, :]


def _entering(row: Row, base: mx.array, start: int) -> mx.array:
    if row.source is None or row.mask is None:
        return base
    return mx.where(_from(row.mask, start), row.source[:, start:].astype(base.dtype), base)


def check_control(run: CorruptedRun, control: mx.array, reads: int | None) -> None:
    """Fail unless an unpatched row's logits (1, R, V) reproduce the corrupted run's."""
    wanted = run.length if reads is None else reads
    want = run.logits[:, run.length - wanted :].astype(mx.float32)
    scale = max(1.0, mx.abs(want).max().item())
    tolerance = 1e-3 if run.logits.dtype == mx.float32 else 5e-2
    error = mx.abs(control.astype(mx.float32) - want).max().item()
    if not error <= tolerance * scale:
        raise CannotReuse(f"re-entering the corrupted run changed its logits by {error:.3g}")


def rows_per_batch(span: int, reads: int, width: int, n_layers: int, vocab: int, budget: int) -> int:
    """Rows per batch from a rough per-row estimate: the logits read, a dozen residual-width
    activations per block and position, and the batched keys and values, in float32."""
    per_row = 4 * (reads * vocab + span * n_layers * width * 14)
    return max(1, min(1024, budget // per_row))


LAYER_CALL_COST = 24
"""What one block call costs beyond its rows, in rows x positions through a block (reading the
block's weights; measured 22-35 on a 2-core CPU for a 135M model): batches trade it against
recomputing positions that did not change."""


def start_batches(rows: list[Row], per_batch: Callable[[int], int], length: int, n_layers: int) -> list[list[Row]]:
    """The rows cut into batches; a batch runs positions from its earliest start on, with at
    most ``per_batch(span)`` rows. Rows of neighbouring starts share a batch where the block
    calls saved outweigh the positions recomputed (a small dynamic programme over starts).
    Batches are independent of one another: a distributed sweep can hand each rank a share.
    """
    groups: dict[int, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.start, []).append(row)
    starts = sorted(groups)

    def cost(first: int, last: int) -> float:  # starts[first..last] as batches from starts[first]
        span = length - starts[first]
        members = [r for s in starts[first : last + 1] for r in groups[s]]
        chunks = -(-len(members) // per_batch(span))
        blocks = sum(n_layers - r.layer for r in members) * span
        return blocks + chunks * LAYER_CALL_COST * (n_layers - min(r.layer for r in members))

    best = [0.0] + [float("inf")] * len(starts)  # best[j]: starts[:j] batched
    cut = [0] * (len(starts) + 1)
    for j in range(1, len(starts) + 1):
        for i in range(j):
            total = best[i] + cost(i, j - 1)
            if total < best[j]:
                best[j], cut[j] = total, i
    spans, j = [], len(starts)
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    batches = []
    for i, j in reversed(spans):
        members = sorted((r for s in starts[i:j] for r in groups[s]), key=lambda r: r.layer)
        size = per_batch(length - starts[i])
        batches += [members[k : k + size] for k in range(0, len(members), size)]
    return batches
