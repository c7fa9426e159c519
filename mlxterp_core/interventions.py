"""Interventions: functions ``array -> array`` that edit an activation while the model runs.

Give them to ``model.trace(..., interventions={name: intervention})``. Any callable that takes
the activation and returns an array of the same shape and dtype works; the ones here also
keep the dtype of the activation and can be restricted to batch rows, token positions and
attention heads with ``.at(...)``::

    iv.scale(0.5)                               # halve the whole activation
    iv.zero_out.at(positions=2)                 # zero token position 2 only
    iv.add_vector(v).at(rows=[0], positions=-1) # steer the last position of row 0
    iv.zero_out.at(heads=[3], n_heads=9)        # zero head 3 of a (B, T, H*D) activation

Axis conventions: a 3-d activation is (B, T, F) with F = H*D when heads are asked for; a 4-d
activation is a per-head view (B, H, T, D), as queries, keys and values are inside attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import attrs
import mlx.core as mx

from .errors import InterventionError

Index = Union[int, Sequence[int], slice, None]
ActivationFn = Callable[[mx.array], mx.array]

__all__ = [
    "Intervention",
    "zero_out",
    "scale",
    "add_vector",
    "replace_with",
    "clamp",
    "noise",
    "compose",
    "InterventionComposer",
    "restrict",
    "replace_where",
    "Elementwise",
]


def _axis_mask(spec: Index, size: int, what: str) -> mx.array | None:
    """Boolean (size,) mask of the indices in ``spec``; None means 'all'."""
    if spec is None:
        return None
    if isinstance(spec, slice):
        chosen = list(range(size))[spec]
    elif isinstance(spec, int):
        chosen = [spec]
    else:
        chosen = [int(i) for i in spec]
    keep = [False] * size
    for i in chosen:
        if not -size <= i < size:
            raise InterventionError(f"{what} {i} is out of range for an axis of size {size}.")
        keep[i] = True
    return mx.array(keep)


def _indices(spec: Index, size: int, what: str) -> list[int]:
    """The indices ``spec`` chooses on an axis of ``size``, counted from 0."""
    mask = _axis_mask(spec, size, what)
    return list(range(size)) if mask is None else [i for i, keep in enumerate(mask.tolist()) if keep]


def _keep_dtype(y: mx.array, like: mx.array) -> mx.array:
    return y if y.dtype == like.dtype else y.astype(like.dtype)


@attrs.frozen
class Elementwise:
    """``op(x, *operands)``, where each output element depends only on the same element of
    ``x`` and of the operands (arrays or numbers that broadcast against ``x``).

    Such an edit can run on any block of ``x`` with the matching blocks of its operands, which
    is how an intervention on a head or a column of a model sharded by tensor parallelism runs
    where that head lives, without communication (:meth:`block`)."""

    op: Callable[..., mx.array]
    operands: tuple = ()

    def __call__(self, x: mx.array) -> mx.array:
        return self.op(x, *self.operands)

    def block(self, axis: int, start: int, stop: int, size: int, ndim: int) -> Elementwise | None:
        """The same edit on the block ``start:stop`` of axis ``axis`` (of ``size`` in the whole
        ``ndim``-d activation); None when an operand cannot be cut there."""
        operands = []
        for value in self.operands:
            if not isinstance(value, mx.array) or value.ndim < ndim - axis:
                operands.append(value)  # a number, or broadcast along that axis
                continue
            at = value.ndim - (ndim - axis)
            if value.shape[at] == size:
                index = [slice(None)] * value.ndim
                index[at] = slice(start, stop)
                operands.append(value[tuple(index)])
            elif value.shape[at] == 1:
                operands.append(value)
            else:
                return None
        return Elementwise(self.op, tuple(operands))


def block_of(fn: Callable, axis: int, start: int, stop: int, size: int, ndim: int) -> Callable | None:
    """``fn`` as an edit of the block ``start:stop`` of axis ``axis`` of an ``ndim``-d
    activation (``size`` along that axis), or None when it is not elementwise there (then it
    needs the whole activation)."""
    method = getattr(fn, "block", None)
    if method is None:
        return None
    return method(axis % ndim, start, stop, size, ndim)


@attrs.frozen
class Intervention:
    """An activation edit, optionally restricted to rows, positions and heads.

    Calling it applies ``fn`` and, where a restriction is set, keeps the original values
    everywhere outside the chosen rows / positions / heads.
    """

    fn: ActivationFn
    description: str
    rows: Index = None
    positions: Index = None
    heads: Index = None
    n_heads: int | None = None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.fn(x)
        if self.rows is None and self.positions is None and self.heads is None:
            return y
        return mx.where(self._mask(x), y, x)

    def at(
        self,
        positions: Index = None,
        rows: Index = None,
        heads: Index = None,
        n_heads: int | None = None,
    ) -> Intervention:
        """The same edit, applied only at these token positions, batch rows and heads.

        ``heads`` on a (B, T, H*D) activation needs ``n_heads`` (standard names such as
        ``layers[i].attn.z`` supply it themselves); on a (B, H, T, D) view it does not.
        """
        return attrs.evolve(
            self,
            positions=positions if positions is not None else self.positions,
            rows=rows if rows is not None else self.rows,
            heads=heads if heads is not None else self.heads,
            n_heads=n_heads if n_heads is not None else self.n_heads,
        )

    def block(self, axis: int, start: int, stop: int, size: int, ndim: int) -> Intervention | None:
        """This edit on the block ``start:stop`` of axis ``axis`` (see :func:`block_of`), its
        restrictions in that block's terms (global heads become the block's own); None when it
        cannot run on a block there."""
        fn = block_of(self.fn, axis, start, stop, size, ndim)
        if fn is None:
            return None
        rows_axis, positions_axis = 0, {4: 2, 3: 1}.get(ndim)
        if (axis == rows_axis and self.rows is not None) or (axis == positions_axis and self.positions is not None):
            return None
        heads, n_heads = self.heads, self.n_heads
        if heads is not None:
            if ndim == 4 and axis == 1:  # (B, H, T, D): the block holds heads start..stop
                chosen = _indices(heads, size, "head")
                heads, n_heads = [h - start for h in chosen if start <= h < stop], None
            elif ndim == 3 and axis == 2 and n_heads and size % n_heads == 0:  # (B, T, H*D)
                width = size // n_heads
                if start % width or stop % width:
                    return None
                chosen = _indices(heads, n_heads, "head")
                first, last = start // width, stop // width
                heads, n_heads = [h - first for h in chosen if first <= h < last], last - first
            else:
                return None
        return attrs.evolve(self, fn=fn, heads=heads, n_heads=n_heads)

    def _mask(self, x: mx.array) -> mx.array:
        if x.ndim == 4:  # per-head view (B, H, T, D)
            batch, n_heads, length, _ = x.shape
            rows = _axis_mask(self.rows, batch, "row")
            heads = _axis_mask(self.heads, n_heads, "head")
            positions = _axis_mask(self.positions, length, "position")
            mask = mx.ones(x.shape[:3], dtype=mx.bool_)
            if rows is not None:
                mask = mask & rows[:, None, None]
            if heads is not None:
                mask = mask & heads[None, :, None]
            if positions is not None:
                mask = mask & positions[None, None, :]
            return mask[..., None]
        if x.ndim == 3:  # (B, T, F)
            batch, length, features = x.shape
            rows = _axis_mask(self.rows, batch, "row")
            positions = _axis_mask(self.positions, length, "position")
            mask = mx.ones((batch, length, 1), dtype=mx.bool_)
            if rows is not None:
                mask = mask & rows[:, None, None]
            if positions is not None:
                mask = mask & positions[None, :, None]
            if self.heads is not None:
                mask = mask & self._feature_mask(features)[None, None, :]
            return mask
        if self.positions is not None or self.heads is not None:
            raise InterventionError(
                f"positions/heads need a (B, T, F) or (B, H, T, D) activation; this one has "
                f"shape {tuple(x.shape)}. Restrict it with rows= only."
            )
        rows = _axis_mask(self.rows, x.shape[0], "row")
        return rows.reshape((-1,) + (1,) * (x.ndim - 1))

    def _feature_mask(self, features: int) -> mx.array:
        if self.n_heads is None:
            raise InterventionError(
                f"heads= on a (B, T, {features}) activation needs n_heads= to split the last "
                "axis into heads: use .at(heads=..., n_heads=H), or a per-head standard name."
            )
        if features % self.n_heads:
            raise InterventionError(
                f"n_heads={self.n_heads} does not divide the last axis ({features})."
            )
        head_dim = features // self.n_heads
        heads = _axis_mask(self.heads, self.n_heads, "head")
        return mx.repeat(heads, head_dim)

    def __repr__(self) -> str:
        where = [
            f"{k}={getattr(self, k)!r}"
            for k in ("rows", "positions", "heads")
            if getattr(self, k) is not None
        ]
        return self.description + (f".at({', '.join(where)})" if where else "")


def restrict(
    fn: ActivationFn,
    positions: Index = None,
    rows: Index = None,
    heads: Index = None,
    n_heads: int | None = None,
) -> Intervention:
    """Restrict any callable ``array -> array`` to rows, positions and heads."""
    base = fn if isinstance(fn, Intervention) else Intervention(fn, getattr(fn, "__name__", repr(fn)))
    return base.at(positions=positions, rows=rows, heads=heads, n_heads=n_heads)


zero_out = Intervention(Elementwise(mx.zeros_like), "zero_out")
"""Set the activation to zero."""


def scale(factor: float | mx.array) -> Intervention:
    """Multiply the activation by ``factor`` (a number or a broadcastable array)."""
    return Intervention(Elementwise(_scaled, (factor,)), f"scale({factor!r})")


def _scaled(x: mx.array, factor) -> mx.array:
    return _keep_dtype(x * factor, x)


def add_vector(vector) -> Intervention:
    """Add ``vector`` (broadcast against the activation, e.g. (D,), (T, D) or (B, T, D))."""
    vector = mx.array(vector)
    return Intervention(Elementwise(_added, (vector,)), f"add_vector(shape={tuple(vector.shape)})")


def _added(x: mx.array, vector: mx.array) -> mx.array:
    _fits(vector, x, "add_vector")
    return x + vector.astype(x.dtype)


def replace_with(value, align: str | None = None) -> Intervention:
    """Replace the activation with ``value`` (an array of its shape, or broadcastable to it).

    ``align="end"`` or ``"start"``: a value of another number of positions (a run of another
    prompt) replaces the positions the two share counted from that end, the rest kept; without
    it (or ``"strict"``) that is an error. The time axis is axis 1 of (B, T, D), 2 of a
    per-head (B, H, T, D) and 0 of (T, D)."""
    value = mx.array(value)
    if align not in (None, "strict", "start", "end"):
        raise InterventionError(f"align={align!r}: use 'end', 'start' or 'strict'.")
    description = f"replace_with(shape={tuple(value.shape)}" + (f", align={align!r})" if align else ")")
    if align in ("start", "end"):  # positions counted from one end: not elementwise along time

        def replace(x: mx.array) -> mx.array:
            axis = _time_axis(x)
            if value.ndim == x.ndim >= 2 and value.shape[axis] != x.shape[axis]:
                return _aligned(value.astype(x.dtype), x, axis, align)
            return _replaced(x, value)

        return Intervention(replace, description)
    return Intervention(Elementwise(_replaced, (value,)), description)


def _time_axis(x: mx.array) -> int:
    """The positions' axis: 1 of (B, T, D), 2 of a per-head (B, H, T, D), 0 of (T, D)."""
    return 2 if x.ndim == 4 else x.ndim - 2


def _replaced(x: mx.array, value: mx.array) -> mx.array:
    _fits(value, x, "replace_with", _time_axis(x) if value.ndim == x.ndim >= 2 else None)
    return mx.broadcast_to(value.astype(x.dtype), x.shape)


def replace_where(mask, value) -> Intervention:
    """Take ``value`` where ``mask`` is True and keep the activation elsewhere (both broadcast
    against it): the row-wise patches of activation patching, one cell per batch row."""
    mask, value = mx.array(mask), mx.array(value)
    return Intervention(Elementwise(_where, (mask, value)), f"replace_where(shape={tuple(value.shape)})")


def _where(x: mx.array, mask: mx.array, value: mx.array) -> mx.array:
    return mx.where(mask, value.astype(x.dtype), x)


def _aligned(value: mx.array, x: mx.array, axis: int, align: str) -> mx.array:
    """``x`` with the positions it shares with ``value`` (counted from ``align``'s end) replaced."""
    n = min(value.shape[axis], x.shape[axis])

    def part(a: mx.array, start: int, stop: int) -> mx.array:
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, stop)
        return a[tuple(index)]

    if align == "end":
        kept, new = part(x, 0, x.shape[axis] - n), part(value, value.shape[axis] - n, value.shape[axis])
        new = mx.broadcast_to(new, part(x, x.shape[axis] - n, x.shape[axis]).shape)
        return mx.concatenate([kept, new], axis=axis)
    kept, new = part(x, n, x.shape[axis]), part(value, 0, n)
    new = mx.broadcast_to(new, part(x, 0, n).shape)
    return mx.concatenate([new, kept], axis=axis)


def _fits(value: mx.array, x: mx.array, what: str, time_axis: int | None = None) -> None:
    """An InterventionError in the user's terms when ``value`` does not broadcast to the
    activation ``x``'s shape (the result must keep that shape)."""
    shape = tuple(value.shape)
    if len(shape) <= x.ndim and all(a in (1, b) for a, b in zip(reversed(shape), reversed(x.shape))):
        return
    others = [(a, b) for k, (a, b) in enumerate(zip(shape, x.shape)) if k != time_axis]
    if time_axis is not None and all(a in (1, b) for a, b in others):  # only the number of positions differs
        raise InterventionError(
            f"{what} has {shape[time_axis]} positions (shape {shape}); the activation has {x.shape[time_axis]} "
            f"(shape {tuple(x.shape)}). Pass align='end' (or 'start') to replace the positions they share, "
            "counted from that end."
        )
    if value.ndim == 1:
        raise InterventionError(f"{what} has {shape[0]} values; the activation has width {x.shape[-1]} "
                                f"(shape {tuple(x.shape)}). Give a vector of {x.shape[-1]} values.")
    raise InterventionError(f"{what} has shape {shape}, which does not broadcast to the activation's "
                            f"shape {tuple(x.shape)}.")


def clamp(min=None, max=None, *, min_val=None, max_val=None) -> Intervention:  # noqa: A002 - the original API's names
    """Clip the activation to ``[min, max]`` (either bound may be None); ``min_val`` and
    ``max_val`` are upstream mlxterp's names for the same bounds."""
    if (min is not None and min_val is not None) or (max is not None and max_val is not None):
        raise InterventionError("clamp: give each bound once (min= or min_val=, max= or max_val=).")
    min, max = min if min_val is None else min_val, max if max_val is None else max_val  # noqa: A001
    if min is None and max is None:
        raise InterventionError("clamp needs at least one of min= and max=.")
    return Intervention(Elementwise(mx.clip, (min, max)), f"clamp({min!r}, {max!r})")


def noise(std: float = 0.1, seed: int | None = None) -> Intervention:
    """Add Gaussian noise of standard deviation ``std``.

    With ``seed`` the noise is the same on every call (reproducible); without it, it comes
    from MLX's global random state (``mx.random.seed``).
    """
    key = None if seed is None else mx.random.key(seed)

    def add_noise(x: mx.array) -> mx.array:
        return x + std * mx.random.normal(x.shape, dtype=x.dtype, key=key)

    return Intervention(add_noise, f"noise(std={std!r}, seed={seed!r})")


@attrs.define
class InterventionComposer:
    """Interventions applied in turn: ``InterventionComposer().add(f).add(g).build()`` (what
    :func:`compose` starts)."""

    steps: list[ActivationFn] = attrs.Factory(list)

    def add(self, fn: ActivationFn) -> InterventionComposer:
        self.steps.append(fn)
        return self

    def build(self) -> Intervention:
        steps = tuple(self.steps)
        if not steps:
            raise InterventionError("compose() needs at least one .add(...) before .build().")
        return Intervention(_Steps(steps), "compose(" + ", ".join(map(repr, steps)) + ")")


@attrs.frozen
class _Steps:
    """Edits applied one after the other (an elementwise chain where every step is one)."""

    steps: tuple

    def __call__(self, x: mx.array) -> mx.array:
        for step in self.steps:
            x = step(x)
        return x

    def block(self, axis: int, start: int, stop: int, size: int, ndim: int) -> _Steps | None:
        steps = [block_of(step, axis, start, stop, size, ndim) for step in self.steps]
        return None if any(step is None for step in steps) else _Steps(tuple(steps))


def compose() -> InterventionComposer:
    """Chain interventions: ``compose().add(scale(0.5)).add(noise(0.1)).build()``."""
    return InterventionComposer()


def __getattr__(name: str):
    """Intervention types from plugins (the ``mlxterp_interventions`` hook): ``iv.<name>``."""
    if name.startswith("__"):  # the import system's own questions (__path__, ...)
        raise AttributeError(name)
    from .plugins import intervention_types

    found = intervention_types()
    if name in found:
        return found[name]
    raise AttributeError(
        f"mlxterp.interventions has no {name!r}; built in: {', '.join(__all__)}"
        + (f"; from plugins: {', '.join(found)}" if found else "")
    )
