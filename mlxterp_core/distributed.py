"""Data-parallel helpers over ``mx.distributed`` (ring, NCCL, MPI; started by ``mlx.launch``).

Only collectives every backend has are used (``all_sum``, ``all_max``, ``all_gather``; NCCL has
no send/recv, the ring no split), with no stream argument, so each backend picks its own. Each
helper is one or two collectives: call them at the start and end of a job, never per item
(ranks may own different numbers of items; every rank must make the same collective calls).

Without ``mlx.launch`` the group is a singleton (rank 0 of 1) and every helper is a no-op, so
the same code runs in one process and in many.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import MlxterpError


class DistributedError(MlxterpError, RuntimeError):
    """Another rank failed, or the ranks disagree about the job."""


def world(group: Any = None) -> Any:
    """The group to use: ``group`` if given, else ``mx.distributed.init()`` (a singleton when
    the process was not started by ``mlx.launch``)."""
    if group is not None:
        return group
    return mx.distributed.init()


def all_ok(ok: bool, group: Any, what: str) -> None:
    """A barrier that also agrees on success: raise on every rank if any rank passes False."""
    if group.size() == 1:
        if not ok:
            raise DistributedError(f"{what} failed.")
        return
    failed = mx.distributed.all_sum(mx.array(0 if ok else 1, dtype=mx.int32), group=group).item()
    if failed:
        raise DistributedError(
            f"{what}: {failed} of {group.size()} ranks failed (rank {group.rank()} here); see "
            "the failing rank's error above."
        )


def barrier(group: Any) -> None:
    """Wait until every rank gets here (``all_sum`` of a scalar: no backend has a barrier)."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1, dtype=mx.int32), group=group))


def same_everywhere(digest: bytes, group: Any) -> bool:
    """Whether every rank passes the same (short) byte string, e.g. a job's sha256."""
    if group.size() == 1:
        return True
    mine = np.frombuffer(digest, dtype=np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group))
    return bool((gathered == mine[None]).all())


def gather_bytes(data: bytes, group: Any) -> list[bytes]:
    """Every rank's byte string, in rank order, on every rank (two collectives)."""
    if group.size() == 1:
        return [data]
    lengths = np.array(mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group))
    longest = int(lengths.max())
    mine = np.zeros((1, max(longest, 1)), dtype=np.uint8)
    mine[0, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(mine), group=group))
    return [gathered[r, : lengths[r]].tobytes() for r in range(group.size())]


def split(n: int, group: Any) -> range:
    """This rank's contiguous part of ``range(n)`` (balanced; earlier ranks take the extra)."""
    size, rank = group.size(), group.rank()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_rows(local: mx.array, n: int, group: Any) -> mx.array:
    """The (n, ...) array whose rows ``split(n, group)`` each rank computed as ``local``.

    Ranks pad their part to the longest part, ``all_gather`` once, and the padding is cut out,
    so the result is the rows in order, on every rank."""
    if group.size() == 1:
        return local
    parts = [split(n, _Rank(r, group.size())) for r in range(group.size())]
    longest = max(len(p) for p in parts)
    pad = longest - local.shape[0]
    if pad:
        local = mx.concatenate([local, mx.zeros((pad, *local.shape[1:]), dtype=local.dtype)])
    # NCCL has no bool: gather bools as uint8
    as_bool = local.dtype == mx.bool_
    gathered = mx.distributed.all_gather(local.astype(mx.uint8) if as_bool else local, group=group)
    rows = mx.concatenate([gathered[r * longest : r * longest + len(p)] for r, p in enumerate(parts)])
    return rows.astype(mx.bool_) if as_bool else rows


_SHARDED: weakref.WeakSet = weakref.WeakSet()  # models sharded across this launch's ranks


def model_parallel(model: Any) -> None:
    """Record that ``model`` is sharded across the ranks: while it lives, the launch is model
    parallel and :func:`map_rows` splits nothing (every rank takes part in every forward)."""
    _SHARDED.add(model)


def launch_mode(group: Any = None) -> str:
    """Which mode this process runs in: ``"single process"``; ``"data parallel"`` (``mlx.launch``
    with unsharded models: :func:`map_rows` and the cache split work across the ranks);
    ``"model parallel"`` (a model sharded across the ranks: every rank takes part in every
    forward pass of it)."""
    if len(_SHARDED):
        return "model parallel"
    return "single process" if world(group).size() == 1 else "data parallel"


def map_rows(fn: Callable[[Sequence], Any], items: Sequence, group: Any = None) -> Any:
    """``fn(items)``, a (len(items), ...) array (or a dict / tuple of them), computed with the
    items split across the ranks of ``group`` and gathered: every rank returns what one process
    computes alone.

    ``fn`` must compute each row from its own item only (as a batched sweep does); fewer items
    than ranks run everything on every rank. Outside ``mlx.launch`` this is ``fn(items)``, and
    so it is in a model-parallel launch (:func:`launch_mode`), where every rank takes part in
    every forward pass of a sharded model."""
    group = world(group)
    if group.size() == 1 or len(items) < group.size() or len(_SHARDED):
        return fn(items)
    part = split(len(items), group)
    local = fn(items[part.start : part.stop])
    mx.eval(local)
    return gather_tree(local, len(items), group)


def gather_tree(local: Any, n: int, group: Any) -> Any:
    """:func:`gather_rows` over every array of a dict / list / tuple of arrays."""
    if isinstance(local, dict):
        return {k: gather_tree(v, n, group) for k, v in local.items()}
    if isinstance(local, (list, tuple)):
        return type(local)(gather_tree(v, n, group) for v in local)
    if isinstance(local, mx.array):
        return gather_rows(local, n, group)
    return local


class _Rank:
    """A stand-in group with a given rank, for computing other ranks' parts."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def rank_of(group: Any) -> tuple[int, int]:
    return group.rank(), group.size()


__all__: Sequence[str] = ["world", "all_ok", "barrier", "same_everywhere", "gather_bytes", "split", "gather_rows", "gather_tree", "map_rows", "DistributedError", "launch_mode", "model_parallel"]
