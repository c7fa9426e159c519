"""nnsight-style access in a trace block: ``model.layers[3].self_attn.output.save()``.

``model.layers`` is a list of views of the model's blocks. A view passes attributes and calls on
to its module (outside a trace too: ``model.layers[3].self_attn.n_heads``); its ``output`` and
``input`` are what the module returned and received in the innermost running ``with
model.trace(...)`` block, read from that trace's records (the forward pass ran when the block
started). Views install nothing on the model: they only read records.

Upstream mlxterp's docs also write ``model.layers[i].attn.output`` for models whose attention
module is ``self_attn``: a block name with no module of that name (``attn``, ``mlp``, ``ln1``,
``ln2``, ``resid_mid``) reads the standard name (``layers[i].attn``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import mlx.nn as nn

from .architecture import read_attribute
from .errors import TraceError, did_you_mean
from .trace import active_traces

if TYPE_CHECKING:
    from .model import InterpretableModel
    from .trace import Trace

STANDARD_PARTS = ("attn", "mlp", "ln1", "ln2", "resid_mid")


def current_trace(model: InterpretableModel, what: str) -> Trace:
    """The innermost trace whose ``with`` block is running, or a TraceError about ``what``."""
    active = active_traces(model)
    if not active:
        raise TraceError(
            f"{what} is only available inside a `with model.trace(...)` block: the forward pass runs when "
            "the block starts. After the block, read trace.activations[...] or trace.saved_values."
        )
    return active[-1]


class Output:
    """``.output`` (or ``.input``) of the model or of a view: ``.save()`` returns the array from
    the innermost running trace and keeps it in that trace's ``saved_values`` under ``key``;
    ``.value`` returns it without keeping it; other attributes (``.shape``) are the array's."""

    def __init__(self, model: InterpretableModel, key: str, read: Callable[[Trace], Any], shown: str):
        self._model, self._key, self._read, self._shown = model, key, read, shown

    def save(self) -> Any:
        trace = current_trace(self._model, self._shown)
        value = self._read(trace)
        trace.saved_values[self._key] = value
        return value

    @property
    def value(self) -> Any:
        return self._read(current_trace(self._model, self._shown))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __getitem__(self, index: Any) -> Any:
        return self.value[index]

    def __repr__(self) -> str:
        return f"Output({self._shown}; .save() inside a trace block)"


class _View:
    """What views share: ``output`` and ``input``, and no assignments to them."""

    __slots__ = ("_model", "_key")

    def _site_output(self, site: str, port: str) -> Output:
        shown = f"{_shown(self._key)}.{port}"
        current_trace(self._model, shown)  # fail here, outside a block, rather than at .save()
        return Output(self._model, f"{self._key}.{port}", lambda trace: trace.activations[site], shown)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input"):
            site = self._key if not isinstance(self, ModuleView) else self._site + (":input" if name == "input" else "")
            raise TraceError(
                f"{_shown(self._key)}.{name} = ...: mlxterp runs the forward pass when the `with` block starts, "
                "so an assignment in it comes too late. Give the change up front: model.trace(..., "
                f"interventions={{'{site}': iv.replace_with(value)}}) (docs/guide/migrating.md)."
            )
        if not isinstance(self, ModuleView):
            raise AttributeError(f"{self!r} has no attributes to set")
        setattr(self._module, name, value)


class ModuleView(_View):
    """A module of the model as ``model.layers[i]...`` reaches it (see the module doc)."""

    __slots__ = ("_module", "_site", "_block")

    def __init__(self, model: InterpretableModel, module: nn.Module, site: str, key: str, block: bool = False):
        for name, value in (("_model", model), ("_module", module), ("_site", site), ("_key", key), ("_block", block)):
            object.__setattr__(self, name, value)

    @property
    def output(self) -> Output:
        """What the module returned in the running trace (its first element, for a tuple)."""
        return self._site_output(self._site, "output")

    @property
    def input(self) -> Output:
        """The module's first positional argument in the running trace."""
        return self._site_output(self._site + ":input", "input")

    def __getattr__(self, name: str) -> Any:
        module = self._module
        child = module.get(name) if not name.startswith("_") else None
        if isinstance(child, nn.Module):
            return ModuleView(self._model, child, f"{self._site}.{name}", f"{self._key}.{name}")
        if isinstance(child, (list, tuple)) and child and all(isinstance(m, nn.Module) for m in child):
            return [ModuleView(self._model, m, f"{self._site}.{name}.{i}", f"{self._key}.{name}.{i}") for i, m in enumerate(child)]
        try:
            return getattr(module, name)
        except AttributeError:
            if self._block and name in STANDARD_PARTS and self._model.architecture is not None:
                return NameView(self._model, f"{self._key}.{name}")
            raise AttributeError(
                f"{type(module).__name__} at {self._site} has no attribute {name!r}."
                + did_you_mean(name, [k for k, v in module.items() if isinstance(v, nn.Module)])
            ) from None

    def __call__(self, *args, **kwargs) -> Any:
        return self._module(*args, **kwargs)

    def __dir__(self) -> list[str]:
        return sorted({*dir(self._module), "output", "input"})

    def __repr__(self) -> str:
        return f"<{type(self._module).__name__} at {self._site}>"


class NameView(_View):
    """A standard block name the block has no module of (``model.layers[3].attn`` where the
    attention module is ``self_attn``): its ``output`` is the standard name's tensor."""

    __slots__ = ()

    def __init__(self, model: InterpretableModel, key: str):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_key", key)

    @property
    def output(self) -> Output:
        return self._site_output(self._key, "output")

    def __getattr__(self, name: str) -> NameView:
        if name.startswith("_"):
            raise AttributeError(name)
        return NameView(self._model, f"{self._key}.{name}")  # layers.3.attn.q

    def __repr__(self) -> str:
        return f"<standard name {self._key}>"


def _shown(key: str) -> str:
    """How user code reaches a view: ``layers.3.self_attn`` -> ``model.layers[3].self_attn``."""
    return "model." + re.sub(r"^layers\.(\d+)", r"layers[\1]", key)


class LayerList(Sequence):
    """``model.layers``: views of the model's blocks (the list at ``path``, relative to the
    wrapped module), indexed, sliced, iterated and sized like the list itself."""

    def __init__(self, model: InterpretableModel, path: str):
        self._model, self._path = model, path

    def _blocks(self) -> list:
        return read_attribute(self._model.model, self._path)

    def __len__(self) -> int:
        return len(self._blocks())

    def __getitem__(self, index: int | slice) -> ModuleView | list[ModuleView]:
        blocks = self._blocks()
        if isinstance(index, slice):
            return [self[i] for i in range(len(blocks))[index]]
        i = range(len(blocks))[index]  # negative indices count from the end; IndexError past it
        return ModuleView(self._model, blocks[i], f"model.{self._path}.{i}", f"layers.{i}", block=True)

    def __setitem__(self, index: int, module: nn.Module) -> None:
        self._blocks()[index] = module

    def __repr__(self) -> str:
        return f"LayerList({len(self)} blocks at model.{self._path})"
