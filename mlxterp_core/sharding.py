"""Models sharded across processes by mlx-lm (tensor and pipeline parallelism over
``mx.distributed``), traced, intervened on and analysed with the same standard names, the same
global layer and head indices and the same numbers as the unsharded model.

Under ``mlx.launch`` every rank runs the same script (SPMD). mlx-lm splits a model two ways:

- **tensor parallelism** (``Model.shard(group)``): in every block the query, key and value
  projections and the MLP's gate and up projections become ``AllToShardedLinear`` (rank r keeps
  a contiguous block of output columns: its heads, its MLP columns), the output and down
  projections ``ShardedToAllLinear`` (an ``all_sum`` after a local matmul); a mixture of
  experts is cut inside every expert and sums its output itself. The residual stream, the norms
  and the unembedding are the same on every rank.
- **pipeline parallelism** (``model.model.pipeline(group)``): rank r runs a contiguous range of
  blocks (rank 0 the last ones), receives the residual stream from rank r + 1 and sends it to
  rank r - 1; every rank embeds and unembeds.

**The plan** (:class:`Sharding`, ``model.sharding``) is read from the modules after sharding and
checked once on a short run, so a family mlx-lm learns to shard later works where its layout
matches. Tensor: 4 tokens run through the sharded model and through an unsharded twin built
lazily from the model's own arguments (never evaluated: only its shapes are read). A site whose
shape differs from the twin's along one axis, by the number of ranks, is a *block* of that axis
(this rank's heads or columns, blocks in rank order); a site of the twin's shape is *replicated*
when it is bitwise the same on every rank, else a *partial sum* (inside a mixture of experts,
before its ``all_sum``). Pipeline: the ranks' layer ranges; a site of block i lives on the rank
that runs block i, every other site on every rank, which the short run checks.

**A forward pass** (``Hooks.__call__`` -> :meth:`Sharding.forward`): every rank builds its lazy
graph; the ranks agree, in one small collective, that they asked for the same thing (names,
interventions, inputs) and that none failed, else every rank raises (the SPMD rule, never a
hang: a rank that stops taking part ends after ``MLXTERP_SHARD_TIMEOUT`` seconds, 600 by
default, with a message); what was recorded is moved once: tensor, one ``all_gather`` for every
block record and one ``all_sum`` for every partial sum (replicated records move nothing);
pipeline, one ``all_gather`` of every stage's records (their names and shapes come with the
agreement); then one ``mx.eval``. ``Hooks(..., gather=False)`` keeps every record where it was
computed, for analyses that reduce where the data lives (:meth:`Sharding.combine` moves only
their small results).

**Interventions** run where the data lives. On a replicated site every rank applies the edit. On
a block site an elementwise edit (``iv.zero_out``, ``scale``, ``add_vector``, ``replace_with``,
``replace_where``, ``clamp``, ``compose`` of them, restricted to rows, positions and global
heads) runs on this rank's block with its operands cut to match, without communication; any
other function gathers the whole tensor, applies the function on every rank (it must be
deterministic: the same seeds everywhere) and keeps this rank's block, whose gradient is
gathered back (attribution patching works under tensor parallelism). On a partial sum the ranks
sum, rank 0 holds the edited whole and the others zero. Under pipeline parallelism only the rank
running a block sees its sites, so it alone applies their edits. Gradients cannot cross a
pipeline (``send`` / ``recv`` have none).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import distributed
from .architecture import Architecture, find_schema, linear_input_width, model_type, read_attribute
from .distributed import DistributedError
from .interventions import block_of
from .schema import ArchitectureSchema
from .module_probes import walk_modules
from .sites import MODEL_OUTPUT, PATTERN_PORT, canonical_site, is_glob, matches, module_part

MODES = ("tensor", "pipeline")
TESTED = {"tensor": ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe"), "pipeline": ("qwen2", "qwen3_moe")}
"""The families whose sharded models the tests check against the unsharded model, per mode."""
PROBE_IDS = [0, 1, 2, 3]  # the short run that checks the plan
_SHARDED_LINEARS = (nn.AllToShardedLinear, nn.ShardedToAllLinear, nn.QuantizedAllToShardedLinear,
                    nn.QuantizedShardedToAllLinear)


class ShardingError(DistributedError):
    """A sharded model mlxterp cannot interpret, or ranks that broke the SPMD rule."""


def families_text() -> str:
    return "; ".join(f"{mode} parallel: {', '.join(names)}" for mode, names in TESTED.items())


def timeout() -> float:
    """Seconds a rank waits for the others at one of mlxterp's collectives before it exits."""
    return float(os.environ.get("MLXTERP_SHARD_TIMEOUT", "600"))


# -- sharding a module, and finding out how one is sharded -------------------------------------


def shard(module: nn.Module, mode: str, group: Any = None) -> None:
    """Shard an mlx-lm model in place the way mlx-lm does: ``"tensor"`` (``Model.shard``) or
    ``"pipeline"`` (``model.model.pipeline``) over ``group`` (default: the world)."""
    group = distributed.world(group)
    kind = model_type(module) or type(module).__name__
    if mode == "tensor":
        if not callable(getattr(module, "shard", None)):
            raise ShardingError(
                f"mlx-lm cannot shard this {kind} model by tensor parallelism (its Model has no shard()). "
                f"Families mlxterp interprets sharded: {families_text()}."
            )
        _check_divisible(module, group.size())
        module.shard(group)
    elif mode == "pipeline":
        inner = getattr(module, "model", None)
        if not callable(getattr(inner, "pipeline", None)):
            raise ShardingError(
                f"mlx-lm cannot pipeline this {kind} model (its inner model has no pipeline()). "
                f"Families mlxterp interprets sharded: {families_text()}."
            )
        inner.pipeline(group)
    else:
        raise ShardingError(f"shard={mode!r}: choose 'tensor' or 'pipeline' (or None: not sharded).")


def _check_divisible(module: nn.Module, size: int) -> None:
    """Tensor parallelism gives every rank whole heads: mlx-lm divides the head counts by the
    number of ranks without checking (a remainder breaks the model later, at a reshape)."""
    args = getattr(module, "args", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(args, field, None)
        if isinstance(count, int) and count % size:
            raise ShardingError(
                f"{field}={count} does not divide by {size} ranks, so tensor parallelism cannot give every "
                "rank whole heads: use a number of ranks that divides it, or shard='pipeline' where the family "
                f"supports it ({families_text()})."
            )


def sharded(module: nn.Module) -> tuple[str, Any] | None:
    """``(mode, group)`` of a module mlx-lm has sharded, or None."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and getattr(inner, "pipeline_size", 1) > 1:
        return "pipeline", mx.distributed.init()  # mlx-lm's pipeline talks over the world group
    for _, child in module.named_modules():
        if isinstance(child, _SHARDED_LINEARS):
            return "tensor", child.group
        group = getattr(child, "sharding_group", None)
        if group is not None:
            return "tensor", group
    return None


# -- the architecture with global counts --------------------------------------------------------


class ShardedArchitecture(Architecture):
    """The architecture of a sharded model in the unsharded model's terms: all heads, all
    layers (``layers[i]`` is None on a pipeline rank that does not run block i), the MLP's whole
    width. Block facts are read from a block this rank runs."""

    def __init__(self, schema: ArchitectureSchema, root: nn.Module, plugin: str, plan: Sharding):
        self.schema, self.plugin, self.root, self.load_report = schema, plugin, root, None
        self.plan = plan
        try:
            layers = list(read_attribute(root, schema.layers))
            layers += [None] * (plan.n_layers - len(layers))
            self.layers = layers
            self._own = layers[plan.first_layer]
            attention = read_attribute(self._own, schema.attention.module)
            heads = int(read_attribute(attention, schema.attention.n_heads))
            kv = int(read_attribute(attention, schema.attention.n_kv_heads)) if schema.attention.n_kv_heads else heads
            if heads < 1 or kv < 1:
                raise ValueError(f"this rank holds {heads} query and {kv} key/value heads: the head counts do not "
                                 f"divide by the {plan.size} ranks")
            self.n_heads = heads  # this rank's, to read the head width
            self.head_dim = self._read_head_dim(attention)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise ShardingError(
                f"schema {schema.family!r} (plugin {plugin}) does not fit this sharded {type(root).__name__}: "
                f"{type(e).__name__}: {e}."
            ) from e
        self.n_heads, self.n_kv_heads = heads * plan.factor, kv * plan.factor
        self.n_layers = plan.n_layers

    @property
    def _block(self) -> nn.Module:
        """A block this rank runs (the base reads layers[0], which a pipeline rank may not hold)."""
        return self._own

    def _input_width(self, linear: nn.Module) -> int | None:
        """The whole input width: a sharded linear layer (not an ``nn.Linear``) holds this rank's
        slice of it."""
        if not isinstance(linear, _SHARDED_LINEARS):
            return linear_input_width(linear)
        width = linear.weight.shape[-1] * 32 // linear.bits if hasattr(linear, "bits") else linear.weight.shape[-1]
        return int(width) * self.plan.factor

    def _exists(self, layer: int, site: str) -> bool:
        path = re.split(r"[#:]", site, maxsplit=1)[0]
        try:
            return isinstance(read_attribute(self.layers[layer] or self._own, path), nn.Module)
        except (AttributeError, KeyError, IndexError):
            return False

    def number(self, value, owner: Any) -> float:
        return super().number(value, self._own if owner is None else owner)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f"; {self.plan.describe()})"


# -- records: where they live, how they move ---------------------------------------------------


@attrs.frozen
class Layout:
    """How a tensor-parallel rank holds a site: ``"replicated"``; ``"block"``: a block of axis
    ``axis`` (counted from the end), blocks in rank order; ``"partial"``: a partial sum."""

    kind: str
    axis: int | None = None


REPLICATED = Layout("replicated")


def _transported(x: mx.array) -> mx.array:
    return x.astype(mx.uint8) if x.dtype == mx.bool_ else x


def gather_blocks(blocks: list[tuple[mx.array, int]], group: Any) -> list[mx.array]:
    """The whole tensors of which each rank holds ``(block, axis)``: blocks of axis ``axis``,
    in rank order. One ``all_gather`` per dtype, whatever the number of tensors (lazy)."""
    size = group.size()
    out: list[mx.array | None] = [None] * len(blocks)
    by_dtype: dict[Any, list[int]] = {}
    for i, (x, _) in enumerate(blocks):
        by_dtype.setdefault(x.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        flat = mx.concatenate([_transported(blocks[i][0]).reshape(-1) for i in members])
        parts = mx.distributed.all_gather(flat[None], group=group)  # (size, total)
        offset = 0
        for i in members:
            x, axis = blocks[i]
            n = x.size
            piece = parts[:, offset : offset + n].reshape(size, *x.shape)
            offset += n
            at = axis % x.ndim
            whole = mx.moveaxis(piece, 0, at).reshape(*x.shape[:at], size * x.shape[at], *x.shape[at + 1 :])
            out[i] = whole.astype(mx.bool_) if dtype == mx.bool_ else whole
    return out  # type: ignore[return-value]


def sum_partials(parts: list[mx.array], group: Any) -> list[mx.array]:
    """The sums over ranks of partial sums, one ``all_sum`` per dtype (lazy)."""
    out: list[mx.array | None] = [None] * len(parts)
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(parts):
        by_dtype.setdefault(x.dtype, []).append(i)
    for members in by_dtype.values():
        total = mx.distributed.all_sum(mx.concatenate([parts[i].reshape(-1) for i in members]), group=group)
        offset = 0
        for i in members:
            out[i] = total[offset : offset + parts[i].size].reshape(parts[i].shape)
            offset += parts[i].size
    return out  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _block_taker(axis: int, rank: int, size: int, group: Any) -> Callable[[mx.array], mx.array]:
    """``whole -> this rank's block of axis``, whose gradient is gathered from every rank (the
    whole tensor's cotangent is then the same everywhere, as the unsharded model's)."""

    @mx.custom_function
    def take(whole: mx.array) -> mx.array:
        width = whole.shape[axis] // size
        index = [slice(None)] * whole.ndim
        index[axis % whole.ndim] = slice(rank * width, (rank + 1) * width)
        return whole[tuple(index)]

    @take.vjp
    def take_vjp(primals, cotangent, output):
        return gather_blocks([(cotangent, axis)], group)[0]

    return take


def exchange(data: dict[str, Any], group: Any, what: str) -> list[dict[str, Any]]:
    """Every rank's JSON-able ``data``, in rank order, on every rank (two small collectives)."""
    with watchdog(what, group.rank()):
        blobs = distributed.gather_bytes(json.dumps(data).encode(), group)
    try:
        return [json.loads(blob) for blob in blobs]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardingError(
            f"the ranks are out of step at {what}: what another rank sent is not what this one expected, so "
            "an earlier collective ran on some ranks only (every rank must make the same calls: the SPMD rule)."
        ) from None


# -- the watchdog: a rank that stops taking part ends the others, with a message -----------------


class _Watchdog:
    def __init__(self):
        self.deadline: float | None = None
        self.what, self.rank = "", 0
        self.thread: threading.Thread | None = None

    @contextmanager
    def guard(self, what: str, rank: int):
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="mlxterp-shard-watchdog", daemon=True)
            self.thread.start()
        outer = self.deadline, self.what
        self.deadline, self.what, self.rank = time.monotonic() + timeout(), what, rank
        try:
            yield
        finally:
            self.deadline, self.what = outer

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(
                    f"mlxterp: rank {self.rank} waited {timeout():.0f} s for the other ranks at {self.what}: "
                    "another rank is not taking part. Every rank must make the same calls with the same "
                    "arguments (the SPMD rule, docs/guide/sharded.md); exiting.\n"
                )
                sys.stderr.flush()
                os._exit(3)


_WATCHDOG = _Watchdog()
watchdog = _WATCHDOG.guard


# -- the plan --------------------------------------------------------------------------------


class Sharding:
    """How a sharded model's tensors are spread over the ranks: ``model.sharding``.

    Attributes:
        mode: ``"tensor"`` or ``"pipeline"``.
        group, rank, size: the ``mx.distributed`` group and this process's place in it.
        n_layers, n_heads: the model's layers and query heads (all of them).
        layers: the layers this rank runs (all under tensor parallelism); ``heads()`` the heads.
        owners: the rank that runs each layer (pipeline; every rank runs every layer under tensor).
    """

    def __init__(self, mode: str, group: Any, module: nn.Module, schema: ArchitectureSchema):
        self.mode, self.group = mode, group
        self.rank, self.size = group.rank(), group.size()
        self.schema = schema
        self.layouts: dict[str, Layout] = {}
        self.local: Architecture | None = None  # tensor: this rank's view (its own head counts)
        self.n_heads = 0  # the model's query heads (all ranks'), set with the architecture
        self._local_names: dict[str, Any] = {}  # tensor: standard name -> its Resolved in this rank's terms
        self._views: dict[tuple, int | None] = {}  # tensor: the standard axis a rank holds a block of
        self._listings: dict[bytes, list[dict]] = {}  # pipeline: the stages' records, by their digests
        self._layer_prefix = f"model.{schema.layers}."
        if mode == "pipeline":
            inner = module.model
            mine = mx.array([[inner.start_idx, inner.end_idx]], dtype=mx.int32)
            with watchdog("the pipeline's layer ranges", self.rank):
                ranges = np.array(mx.distributed.all_gather(mine, group=group))
            self.n_layers = int(ranges[:, 1].max())
            self.owners = [next(r for r in range(self.size) if ranges[r, 0] <= i < ranges[r, 1]) for i in range(self.n_layers)]
            self.layers = range(int(ranges[self.rank, 0]), int(ranges[self.rank, 1]))
        else:
            self.n_layers = len(read_attribute(module, schema.layers))
            self.owners = list(range(self.n_layers))  # unused: every rank runs every layer
            self.layers = range(self.n_layers)

    @property
    def factor(self) -> int:
        """Heads (and MLP columns) of the whole model per rank's share: the number of ranks
        under tensor parallelism, 1 under pipeline parallelism."""
        return self.size if self.mode == "tensor" else 1

    @property
    def first_layer(self) -> int:
        return self.layers.start

    @property
    def can_stop(self) -> bool:
        """Whether a forward pass may stop early (``Hooks(stop_after=...)``): under pipeline
        parallelism a stage that stopped would leave the next one waiting."""
        return self.mode == "tensor"

    def describe(self) -> str:
        if self.mode == "tensor":
            return f"tensor parallel over {self.size} ranks (rank {self.rank})"
        return (f"pipeline parallel over {self.size} ranks (rank {self.rank} runs layers "
                f"{self.layers.start}-{self.layers.stop - 1})")

    def __repr__(self) -> str:
        return f"Sharding({self.describe()})"

    def owner(self, layer: int) -> int | None:
        """The rank that runs block ``layer`` (pipeline); None under tensor parallelism."""
        return self.owners[layer] if self.mode == "pipeline" else None

    def heads(self) -> range:
        """The global query heads this rank holds (all of them under pipeline parallelism)."""
        if self.mode == "pipeline":
            return range(self.n_heads)
        per = self.n_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def layer_of(self, site: str) -> int | None:
        """The block a recorded site (raw, or a splice's sub-site) is computed in, or None."""
        if site.startswith(self._layer_prefix):
            head = site[len(self._layer_prefix):].split(".", 1)[0]
            head = re.split(r"[#:]", head, maxsplit=1)[0]
            return int(head) if head.isdigit() else None
        match = re.match(r"^layers\.(\d+)(?=$|\.)", site)
        return int(match.group(1)) if match else None

    def probed(self, names: list[str], root: nn.Module) -> list[str]:
        """The names of ``names`` whose modules this rank runs (a pipeline stage runs only its
        blocks; what the others record reaches it after the pass)."""
        if self.mode == "tensor":
            return names
        kept = []
        paths = None
        for name in names:
            if is_glob(name):
                if paths is None:
                    paths = [path for path, _ in walk_modules(root)[1:]]
                part = module_part(name)
                if any(fnmatch.fnmatchcase(path, part) for path in paths):
                    kept.append(name)
                continue
            layer = self.layer_of(name)
            if layer is None or layer in self.layers:
                kept.append(name)
        return kept

    # -- interventions --------------------------------------------------------------------

    def edits(self, hooks, edits: list) -> list:
        """The edits of a set of hooks as they run on this rank (see the module doc)."""
        if self.mode == "pipeline":
            for edit in edits:
                if edit.needs is None:
                    continue
                here, there = self.layer_of(edit.site), self.layer_of(edit.needs)
                if here is not None and there is not None and self.owners[here] != self.owners[there]:
                    raise ShardingError(
                        f"{edit.key} at layer {here} reads {edit.needs} (layer {there}), which rank "
                        f"{self.owners[there]} runs, not rank {self.owners[here]}: under pipeline parallelism an "
                        "edit can read only its own stage's sites."
                    )
            return edits
        return [attrs.evolve(edit, apply=self._tensor_apply(edit)) for edit in edits]

    def _tensor_apply(self, edit) -> Callable:
        original = edit.apply

        def apply(x: mx.array, site: str, seen: Mapping) -> mx.array:
            layout = self.layouts.get(site, REPLICATED)
            if edit.needs is not None:  # what it reads earlier in the pass, whole
                seen = _WholeSeen(seen, self)
            if layout.kind == "replicated":
                return original(x, site, seen)
            if layout.kind == "block":
                local = self._local_edit(edit, site, x, layout.axis)
                if local is not None:
                    return local(x, seen)
                whole = gather_blocks([(x, layout.axis)], self.group)[0]
                return _block_taker(layout.axis, self.rank, self.size, self.group)(original(whole, site, seen))
            whole = sum_partials([x], self.group)[0]
            edited = original(whole, site, seen)
            if self.rank == 0:
                return edited  # the ranks' sum is the edit
            # zeros that still depend on the edit: every rank must run the sum above
            return mx.depends(mx.zeros_like(edited), edited)

        return apply

    def _local_edit(self, edit, site: str, x: mx.array, axis: int) -> Callable | None:
        """The edit on this rank's block alone, or None when it needs the whole tensor."""
        from .trace import checked

        if edit.fn is None:  # a splice: it sees the whole tensor
            return None
        if edit.resolved is None:  # a raw site: the block's axis is the raw one
            width = x.shape[axis]
            fn = block_of(edit.fn, axis % x.ndim, self.rank * width, (self.rank + 1) * width, width * self.size, x.ndim)
            return None if fn is None else (lambda raw, seen: checked(fn, site, edit.key)(raw))
        resolved = edit.resolved
        local = self._local_resolved(resolved.name)
        std_axis = self._standard_axis(resolved, local, x, axis)
        if std_axis is None:
            return None
        shape = local.read(x).shape  # lazy: only the shape is read
        width, ndim = shape[std_axis], len(shape)
        fn = block_of(edit.fn, std_axis, self.rank * width, (self.rank + 1) * width, width * self.size, ndim)
        if fn is None:
            return None
        _, raw_edit = local.edit(checked(fn, resolved.name, edit.key))
        return raw_edit

    def _local_resolved(self, name: str):
        found = self._local_names.get(name)
        if found is None:
            found = self._local_names[name] = self.local.resolve(name)[0]
        return found

    def _standard_axis(self, resolved, local, x: mx.array, axis: int) -> int | None:
        """The axis of the standard tensor of which this rank holds a block, checked once per
        name and layout on a small synthetic tensor: the local view of each rank's block, side
        by side, must be the whole view of the whole tensor (views reshape, slice and swap the
        axes they know; the others are 2 wide here)."""
        at = axis % x.ndim
        key = (re.sub(r"^layers\.\d+\.", "", resolved.name), x.ndim, at, x.shape[at], x.shape[-1])
        if key not in self._views:
            shape = [2] * x.ndim
            shape[-1] = x.shape[-1]
            shape[at] = x.shape[at] * self.size
            whole = mx.arange(int(np.prod(shape)), dtype=mx.int32).reshape(shape)
            view = resolved.read(whole)
            blocks = [local.read(b) for b in mx.split(whole, self.size, axis=at)]
            found = None
            if view.ndim == blocks[0].ndim:
                differ = [a for a in range(view.ndim) if view.shape[a] != blocks[0].shape[a]]
                if len(differ) == 1 and blocks[0].shape[differ[0]] * self.size == view.shape[differ[0]]:
                    if mx.array_equal(mx.concatenate(blocks, axis=differ[0]), view).item():
                        found = differ[0]
            self._views[key] = found
        return self._views[key]

    # -- a forward pass on every rank -------------------------------------------------------

    def forward(self, hooks, args: tuple, kwargs: dict, edit: bool, evaluate: bool) -> tuple[Any, dict]:
        """One forward pass of ``hooks`` on every rank (see the module doc)."""
        digest, described = self._request(hooks, args, kwargs, edit)
        error: Exception | None = None
        output = None
        try:
            output = hooks._forward(args, kwargs, edit)
        except Exception as e:  # noqa: BLE001  every rank must hear of it before anything runs
            error = e
        recorder = hooks._recorder
        hooks._last_output = output
        if self.mode == "tensor":
            self._agree(digest, described, error)
            recorded = self._gather_tensor(recorder.recorded) if hooks.gather else recorder.recorded
        else:
            recorded = self._share_pipeline(hooks, digest, described, error)
        recorder.recorded = recorded
        hooks._check_captured()
        if evaluate:
            with watchdog("a forward pass", self.rank):
                mx.eval(output, list(recorded.values()))
        return output, recorded

    def _request(self, hooks, args: tuple, kwargs: dict, edit: bool) -> tuple[bytes, str]:
        """What this pass asks for, as a digest (and its text, for messages): the names, the
        interventions, the splices, the inputs' shapes and contents, the cache's length."""
        static = getattr(hooks, "_shard_request", None)
        if static is None:
            static = {
                "capture": hooks._capture,
                "interventions": [[e.key, e.site] for e in hooks._edits],
                "stop": hooks.stop_site,
                "gather": hooks.gather,
            }
            hooks._shard_request = static
        inputs = [_describe(a) for a in args]
        extra = {k: _describe(v) for k, v in sorted(kwargs.items())}
        text = json.dumps({**static, "edit": edit, "inputs": inputs, "options": extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).digest(), text

    def _agree(self, digest: bytes, described: str, error: Exception | None, own: bytes = b"") -> np.ndarray:
        """Raise on every rank unless every rank built the same pass without error (one small
        collective; a second, only when they do not, to say why). ``own``: 32 bytes of this
        rank's own to share in the same collective; the (size, 65) bytes every rank sent."""
        mine = np.zeros((1, 65), dtype=np.uint8)
        mine[0, 0] = error is None
        mine[0, 1:33] = np.frombuffer(digest, dtype=np.uint8)
        mine[0, 33:33 + len(own)] = np.frombuffer(own, dtype=np.uint8)
        if self.size > 1:
            with watchdog("the agreement before a forward pass", self.rank):
                every = np.array(mx.distributed.all_gather(mx.array(mine), group=self.group))
        else:
            every = mine
        if every[:, 0].all() and (every[:, 1:33] == every[0, 1:33]).all():
            return every
        reports = exchange({"error": _error_text(error), "request": described}, self.group, "an error report")
        self._raise(reports, error)

    def _raise(self, reports: list[dict], error: Exception | None) -> None:
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
        if error is not None:
            raise error
        if failed:
            rank, text = failed[0]
            raise DistributedError(f"rank {rank} failed building this forward pass, so no rank runs it: {text}")
        requests = [rep["request"] for rep in reports]
        mine = json.loads(requests[self.rank])
        differing = []
        for r, other in enumerate(requests):
            theirs = json.loads(other)
            for key in mine:
                if mine[key] != theirs.get(key) and key not in differing:
                    differing.append(key)
        shown = "; ".join(f"rank {r}: " + ", ".join(f"{k}={_short(json.loads(q).get(k))}" for k in differing)
                          for r, q in enumerate(requests))
        raise ShardingError(
            f"the ranks asked for different forward passes ({', '.join(differing)} differ): {shown}. On a sharded "
            "model every rank must make the same calls with the same arguments (the SPMD rule): branch on the rank "
            "only to print or save results, never around a trace or an analysis."
        )

    def _gather_tensor(self, recorded: dict[str, Any]) -> dict[str, Any]:
        blocks, partials = [], []
        for name, value in recorded.items():
            layout = self.layouts.get(name)
            if layout is None or not isinstance(value, mx.array) or layout.kind == "replicated":
                continue
            (blocks if layout.kind == "block" else partials).append(name)
        if not blocks and not partials:
            return recorded
        out = dict(recorded)
        for name, whole in zip(blocks, gather_blocks([(recorded[n], self.layouts[n].axis) for n in blocks], self.group)):
            out[name] = whole
        for name, whole in zip(partials, sum_partials([recorded[n] for n in partials], self.group)):
            out[name] = whole
        return out

    def _share_pipeline(self, hooks, digest: bytes, described: str, error: Exception | None) -> dict[str, Any]:
        recorder = hooks._recorder
        recorded = recorder.recorded
        output = hooks._last_output
        mine = {name: value for name, value in recorded.items()
                if isinstance(value, mx.array) and self.layer_of(name) is not None}
        reached = [entry for entry in hooks._capture or []
                   if (any(matches(site, entry) for site in recorded) if is_glob(entry) else canonical_site(entry) in recorded)]
        # what this stage holds after the pass: its records' names and shapes, the interventions
        # that ran here, the capture entries reached here (the same for every pass of a request
        # of the same shapes: the ranks send a digest of it with the agreement, and the whole of
        # it only when some rank's differs from the last time)
        listing = {"records": [[name, list(value.shape), _dtype_name(value.dtype)] for name, value in mine.items()],
                   "fired": sorted(recorder.fired), "reached": reached}
        own = hashlib.sha256(json.dumps(listing).encode()).digest()
        every = self._agree(digest, described, error, own)
        key = every[:, 33:].tobytes()
        listings = self._listings.get(key)
        if listings is None:
            listings = exchange(listing, self.group, "the stages' records") if self.size > 1 else [listing]
            if len(self._listings) >= 64:
                self._listings.clear()
            self._listings[key] = listings
        for other in listings:
            recorder.fired.update(other["fired"])
            recorder.elsewhere.update(e for e in other["reached"] if e not in reached)
        share = hooks.gather and self.size > 1
        if not share or not isinstance(output, mx.array):
            # the stages' graphs differ, so nothing is left for later evaluations to order
            with watchdog("a forward pass", self.rank):
                mx.eval(output, list(recorded.values()))
            if not share:
                return recorded
        # after the pass (the stages' sends, receives and mlx-lm's all_gather) on every rank
        # alike, also on a rank that shares nothing: the sharing depends on the model's output
        after = output if isinstance(output, mx.array) else None
        shared, buffers = _share_owned(mine, [r["records"] for r in listings], self.rank, self.group, after=after)
        with watchdog("a forward pass", self.rank):
            mx.eval(output, list(recorded.values()), buffers)
        return {**recorded, **shared}

    # -- results computed where the data lives ----------------------------------------------

    def combine(self, parts: dict[str, mx.array], axis: int | None = None) -> dict[str, mx.array]:
        """Small results computed where the data lives, the same on every rank.

        Tensor parallelism: every rank holds every key, each its block of ``axis`` (per-head
        scores of its heads, say): the blocks side by side, in rank order (one ``all_gather``
        per dtype); ``axis=None``: the results are replicated already. Pipeline parallelism:
        each rank holds the keys of the layers it runs: every key on every rank (the names and
        shapes, then one ``all_gather`` per dtype)."""
        if self.size == 1:
            return dict(parts)
        with watchdog("results before sharing them", self.rank):
            mx.eval(list(parts.values()))  # whatever they depend on runs first, on every rank alike
        if self.mode == "tensor":
            if axis is None:
                return dict(parts)
            names = list(parts)
            wholes = gather_blocks([(parts[n], axis) for n in names], self.group)
            return dict(zip(names, wholes))
        meta = [[name, list(value.shape), _dtype_name(value.dtype)] for name, value in parts.items()]
        reports = exchange({"records": meta}, self.group, "sharing results")
        return {**parts, **_share_owned(parts, [r["records"] for r in reports], self.rank, self.group)[0]}


class _WholeSeen(Mapping):
    """The values seen earlier in a tensor-parallel pass, each whole when read (a rank's block of
    heads or columns gathered, a partial sum summed)."""

    def __init__(self, seen: Mapping, plan: Sharding):
        self._seen, self._plan = seen, plan

    def __getitem__(self, site: str) -> mx.array:
        value, layout = self._seen[site], self._plan.layouts.get(site, REPLICATED)
        if layout.kind == "block":
            return gather_blocks([(value, layout.axis)], self._plan.group)[0]
        if layout.kind == "partial":
            return sum_partials([value], self._plan.group)[0]
        return value

    def __iter__(self):
        return iter(self._seen)

    def __len__(self) -> int:
        return len(self._seen)


def _share_owned(mine: dict[str, mx.array], listed: list[list], rank: int, group: Any,
                 after: Any = None) -> tuple[dict[str, mx.array], list[mx.array]]:
    """Every rank's ``mine`` (listed by every rank as [name, shape, dtype]) on every rank: one
    ``all_gather`` per dtype, each rank's tensors flattened one after the other and padded to
    the longest rank's (exact: no arithmetic). A rank that receives nothing must still take
    part: without ``after`` the gathers are evaluated here; with it (an array) they run after
    it, and the gathered buffers are returned too: evaluate them with the records, at once.
    Returns (name -> tensor received, the gathered buffers)."""
    dtypes = sorted({d for records in listed for _, _, d in records})
    shared: dict[str, mx.array] = {}
    buffers: list[mx.array] = []
    for dtype_name in dtypes:
        dtype = getattr(mx, dtype_name)
        lengths = [sum(int(np.prod(s, dtype=np.int64)) for _, s, d in records if d == dtype_name) for records in listed]
        longest = max(lengths)
        if longest == 0:
            continue
        parts = [_transported(mine[name]).reshape(-1) for name, _, d in listed[rank] if d == dtype_name]
        flat = mx.concatenate(parts) if parts else mx.zeros((0,), dtype=mx.uint8 if dtype == mx.bool_ else dtype)
        if flat.size < longest:
            flat = mx.concatenate([flat, mx.zeros((longest - flat.size,), dtype=flat.dtype)])
        if isinstance(after, mx.array):
            flat = mx.depends(flat, after)
        every = mx.distributed.all_gather(flat[None], group=group)  # (size, longest)
        if after is None:
            with watchdog("sharing records", rank):
                mx.eval(every)  # on every rank, whether or not it receives anything
        else:
            buffers.append(every)  # evaluated with the records, on every rank
        for other, records in enumerate(listed):
            if other == rank:
                continue
            offset = 0
            for name, shape, d in records:
                if d != dtype_name:
                    continue
                n = int(np.prod(shape, dtype=np.int64))
                value = every[other, offset : offset + n].reshape(shape)
                shared[name] = value.astype(mx.bool_) if dtype == mx.bool_ else value
                offset += n
    return shared, buffers


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _describe(value: Any) -> Any:
    """A JSON-able description of an argument of a forward pass, contents included for arrays
    (token ids: small) and the length of a KV cache."""
    if isinstance(value, mx.array):
        data = np.array(value.astype(mx.float32) if value.dtype == mx.bfloat16 else value)
        return [list(value.shape), _dtype_name(value.dtype), hashlib.sha256(data.tobytes()).hexdigest()[:16]]
    if isinstance(value, (list, tuple)):
        if value and all(hasattr(v, "offset") for v in value):  # a KV cache: a stage holds its layers'
            offset = getattr(value[0], "offset", None)
            return ["cache", offset if isinstance(offset, int) else None]
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    offset = getattr(value, "offset", None)
    return [type(value).__name__, offset if isinstance(offset, int) else None]


def _error_text(error: Exception | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"[:2000]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


# -- wrapping: the plan, checked on a short run ------------------------------------------------


def attach(model, schema: ArchitectureSchema | None = None) -> None:
    """Give ``model`` (an InterpretableModel of a sharded module) its global architecture and
    its plan, checked on a short run (collectives: every rank must wrap the model)."""
    module = model.model
    mode, group = sharded(module)
    found = ("schema=", schema) if schema is not None else find_schema(module)
    if found is None:
        raise ShardingError(
            f"no mlxterp family recognises this sharded {type(module).__name__} (model_type="
            f"{model_type(module)!r}), so its standard names and its plan are unknown. Families mlxterp "
            f"interprets sharded: {families_text()}."
        )
    plugin, schema = found
    plan = Sharding(mode, group, module, schema)
    model.architecture = ShardedArchitecture(schema, module, plugin, plan)
    plan.n_heads = model.architecture.n_heads
    if mode == "tensor":
        plan.local = Architecture(schema, module, plugin)
        plan.layouts = _tensor_layouts(model, plan)
    else:
        _check_pipeline(model, plan)
    _same_random_state(plan)
    model.sharding = plan
    distributed.model_parallel(model)


def _same_random_state(plan: Sharding) -> None:
    """Give every rank rank 0's MLX random state: unseeded random edits (``iv.noise``) and
    sampling then draw the same numbers everywhere, as the SPMD rule needs (a rank that draws
    more than the others still drifts: seed what only some ranks do)."""
    if plan.size == 1:
        return
    mine = mx.array(np.array(_random_key(), dtype=np.uint32)[None])
    with watchdog("sharing the random state", plan.rank):
        every = np.array(mx.distributed.all_gather(mine, group=plan.group))
    _set_random_key(*every[0])


def _random_key() -> tuple[int, int]:
    """MLX's global random key, as the two 32-bit words ``mx.random.seed`` rebuilds it from."""
    high, low = mx.random.state[0].tolist()
    return int(high), int(low)


def _set_random_key(high: int, low: int) -> None:
    mx.random.seed(int(high) << 32 | int(low))  # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]


def _probe_names(model, layers) -> list[str]:
    """Every site of a plain forward (a glob) and the attention patterns of ``layers``."""
    schema = model.architecture.schema
    names = ["model.*", MODEL_OUTPUT]
    if schema.attention.pattern:
        names += [f"model.{schema.layers}.{i}.{schema.attention.module}{PATTERN_PORT}" for i in layers]
    return names


class _Twin:
    """The unsharded model, built lazily from the sharded one's arguments, as Hooks see a model:
    its sites' shapes are the whole tensors' shapes (it is never evaluated)."""

    architecture = None
    sharding = None
    attached_saes = ()

    def __init__(self, module: nn.Module):
        self.model = module


def _tensor_layouts(model, plan: Sharding) -> dict[str, Layout]:
    from .trace import Hooks

    module = model.model
    args = getattr(module, "args", None)
    if args is None:
        raise ShardingError(f"{type(module).__name__} has no mlx-lm args, from which the unsharded shapes are read.")
    key = _random_key()  # the twin's random weights must not move the user's seed
    try:
        twin = type(module)(args)
    finally:
        _set_random_key(*key)
    names = _probe_names(model, range(plan.n_layers))
    probe = mx.array([PROBE_IDS])
    with Hooks(_Twin(twin), capture=names) as hooks:
        _, shapes = hooks(probe, evaluate=False)
    shapes = {name: tuple(value.shape) for name, value in shapes.items() if isinstance(value, mx.array)}
    del twin
    with Hooks(model, capture=names) as hooks:
        _, local = hooks(probe)
    local = {name: value for name, value in local.items() if isinstance(value, mx.array)}
    if set(local) != set(shapes):
        extra, missing = sorted(set(local) - set(shapes)), sorted(set(shapes) - set(local))
        raise ShardingError(f"the sharded model's sites differ from the unsharded model's (only sharded: {extra[:3]}, "
                            f"only unsharded: {missing[:3]}): mlxterp cannot map this sharding. {families_text()}.")
    layouts: dict[str, Layout] = {}
    same = []
    for name, value in local.items():
        whole = shapes[name]
        if tuple(value.shape) == whole:
            same.append(name)
            continue
        differ = [a for a in range(value.ndim) if value.ndim == len(whole) and value.shape[a] != whole[a]]
        if len(differ) != 1 or value.shape[differ[0]] * plan.size != whole[differ[0]]:
            raise ShardingError(f"site {name} has shape {tuple(value.shape)} on rank {plan.rank} and {whole} unsharded: "
                                f"not one block of one axis per rank, so mlxterp cannot map it. {families_text()}.")
        layouts[name] = Layout("block", differ[0] - value.ndim)
    if same and plan.size > 1:
        prints = mx.stack([_fingerprint(local[name]) for name in same])[None]
        with watchdog("checking the plan", plan.rank):
            every = np.array(mx.distributed.all_gather(prints, group=plan.group))
        for k, name in enumerate(same):
            equal = np.array_equal(every[:, k], np.broadcast_to(every[0, k], every[:, k].shape), equal_nan=True)
            layouts[name] = REPLICATED if equal else Layout("partial")
    else:
        layouts.update({name: REPLICATED for name in same})
    return layouts


def _fingerprint(x: mx.array) -> mx.array:
    x = x.astype(mx.float32).reshape(-1)
    weights = (mx.arange(x.size) % 7 + 1).astype(mx.float32)
    return mx.stack([x.sum(), (x * weights).sum(), mx.abs(x).max() if x.size else mx.array(0.0)])


def _check_pipeline(model, plan: Sharding) -> None:
    """The short run: every site of block i recorded on the rank that runs it, and only there;
    every other site on every rank."""
    from .trace import Hooks

    with Hooks(model, capture=_probe_names(model, plan.layers)) as hooks:
        _, local = hooks(mx.array([PROBE_IDS]))
    names = sorted(local)
    reports = exchange({"sites": names}, plan.group, "checking the plan")
    problems = []
    for rank, report in enumerate(reports):
        for name in report["sites"]:
            layer = plan.layer_of(name)
            if layer is not None and plan.owners[layer] != rank:
                problems.append(f"{name} recorded on rank {rank}, but rank {plan.owners[layer]} runs layer {layer}")
    shared = set.intersection(*(set(n for n in r["sites"] if plan.layer_of(n) is None) for r in reports))
    for rank, report in enumerate(reports):
        extra = [n for n in report["sites"] if plan.layer_of(n) is None and n not in shared]
        problems += [f"{n} recorded on rank {rank} only" for n in extra[:2]]
    covered = {plan.layer_of(n) for r in reports for n in r["sites"]} - {None}
    problems += [f"no rank ran layer {i}" for i in range(plan.n_layers) if i not in covered][:2]
    if problems:
        raise ShardingError("the pipeline does not hold its sites where its layer ranges say: " + "; ".join(problems[:4])
                            + f". {families_text()}.")


__all__ = ["Sharding", "ShardingError", "ShardedArchitecture", "Layout", "shard", "sharded", "attach", "gather_blocks",
           "sum_partials", "exchange", "MODES", "TESTED"]
