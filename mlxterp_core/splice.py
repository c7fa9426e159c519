"""Splices: objects that replace the tensor at a site by a function of it, exposing named
intermediate values as sites of their own (a sparse autoencoder is one; the core knows no
kind).

A splice is any object with these attributes (a protocol, nothing to subclass)::

    site: str                   # the name whose tensor it replaces ('layers.8.output')
    reads: str | None           # a site read earlier in the pass (a transcoder's input), or None
    prefix: str                 # its sub-sites are named f"{site}.{prefix}.{sub}"
    sub_sites: tuple[str, ...]  # ('pre', 'features', 'recons', 'error') for an SAE
    def splice(self, x, visit, source) -> mx.array: ...

``splice`` gets the tensor at ``site`` (as the standard name reads it), a function
``visit(sub, value) -> value`` and the tensor at ``reads`` (or None), and returns the tensor that
flows on (same shape and dtype as ``x``). Every intermediate value it passes through ``visit``
is recorded and intervened on under its sub-site name exactly as a module's output is:
``layers.8.output.sae.features`` can be captured, edited with ``iv.*``, patched and
differentiated. ``visit`` returns the value unchanged (the same object) when nothing edits it.

Give splices to ``model.trace(..., saes=[...])`` / ``model.run`` (``transcoders=`` is the same
argument), or attach them for a block with ``with model.saes(sae, ...):`` (every trace,
generation and analysis in the block runs with them). An object with a ``splices`` list stands
for its splices (a set of transcoders splices one per layer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from .errors import InterventionError, UnknownNameError
from .names import is_raw


def dotted(name: str) -> str:
    """``layers[8].output`` -> ``layers.8.output``."""
    return re.sub(r"\[(-?\d+|\*)\]", r".\1", name.strip())


class Splices:
    """The splices of one set of hooks: their sub-site names, and their raw edits."""

    def __init__(self, model, splices: Sequence[Any]):
        self.model = model
        # the same object attached (model.saes) and given (saes=) splices once
        self.splices = list({id(s): s for s in splices}.values())
        self.by_name: dict[str, Any] = {}  # virtual sub-site name -> splice
        self.heads: list[tuple[Any, str, Any, Any]] = []  # (splice, head name, resolved site, resolved reads)
        for splice in self.splices:
            for attribute in ("site", "prefix", "sub_sites", "splice"):
                if not hasattr(splice, attribute):
                    raise InterventionError(
                        f"{type(splice).__name__} is not a splice: it has no {attribute!r} (see mlxterp_core.splice)."
                    )
            resolved = self._resolve(splice.site)
            reads = None if getattr(splice, "reads", None) is None else self._resolve(splice.reads)
            head = resolved.name if resolved is not None else splice.site
            for other, other_head, *_ in self.heads:
                if other_head == head and other.prefix == splice.prefix:
                    raise InterventionError(
                        f"two splices at {head} with the same prefix {splice.prefix!r}: splice one per site."
                    )
            self.heads.append((splice, head, resolved, reads))
            for sub in splice.sub_sites:
                self.by_name[f"{head}.{splice.prefix}.{sub}"] = splice

    def _resolve(self, name: str):
        """The Resolved of a standard name, or None for a raw site name."""
        if is_raw(name):
            return None
        found = self.model.architecture_or_raise(name).resolve(name)
        if len(found) != 1:
            raise UnknownNameError(f"a splice replaces one site; {name!r} names {len(found)}.")
        return found[0]

    def name(self, name: str) -> str | None:
        """The sub-site name ``name`` refers to (any spelling of the site), or None."""
        if not self.by_name:
            return None
        text = dotted(name)
        if text in self.by_name:
            return text
        for splice, head, *_ in self.heads:
            marker = f".{splice.prefix}."
            if marker not in text:
                continue
            site, _, sub = text.rpartition(marker)
            if sub not in splice.sub_sites:
                continue
            try:
                canonical = site if is_raw(site) else self.model.architecture_or_raise(site).resolve(site)[0].name
            except UnknownNameError:
                continue
            if canonical == head:
                return f"{head}.{splice.prefix}.{sub}"
        return None

    def edits(self, edit_type, recorder: Callable[[], Any]) -> list:
        """One raw Edit per splice; ``recorder()`` is the Recorder of the running pass."""
        edits = []
        for splice, head, resolved, reads in self.heads:
            prefix = f"{head}.{splice.prefix}"

            def apply(x, site, seen, splice=splice, resolved=resolved, reads=reads, prefix=prefix):
                source = None
                if reads is not None:
                    source = reads.read(seen[reads.site])

                def visit(sub: str, value: mx.array) -> mx.array:
                    return recorder().visit(f"{prefix}.{sub}", value)

                def replace(value: mx.array) -> mx.array:
                    return splice.splice(value, visit, source)

                if resolved is None:
                    return replace(x)
                return resolved.edit(replace)[1](x, seen)

            if resolved is not None and resolved.needs and reads is not None:
                raise InterventionError(
                    f"a splice at {head} cannot also read {splice.reads}: that site is written through another one."
                )
            site = splice.site if resolved is None else (resolved.write_site or resolved.site)
            needs = reads.site if reads is not None else (resolved.needs if resolved is not None else None)
            edits.append(edit_type(key=f"{prefix} (splice)", site=site, apply=apply, needs=needs))
        return edits

    def keys(self) -> list[str]:
        return [f"{head}.{splice.prefix} (splice)" for splice, head, *_ in self.heads]


def splice_list(saes: Any) -> list[Any]:
    """``saes=`` as given -> a list of splices: one splice, a list of them, or an object that
    stands for several (a set of transcoders: anything with a ``splices`` list), in any mix."""
    if saes is None:
        return []
    if isinstance(saes, (list, tuple)):
        return [s for item in saes for s in splice_list(item)]
    group = getattr(saes, "splices", None)
    if group is not None and not hasattr(saes, "splice"):
        return list(group)
    return [saes]


__all__ = ["Splices", "dotted", "splice_list"]
