"""SAE architectures: one module each, and the registry that finds them by name.

An architecture module says what is specific to it; whatever it leaves out is the standard
(ReLU) SAE's rule, from :mod:`.base`. The names a module may define:

identity
    ``name`` (required): what ``cfg.json``'s ``architecture`` says and what ``train_sae``'s
    ``architecture=`` takes; ``aliases``: other names it answers to; ``transcoder``: True when it
    reads one site and writes another (``d_out``, no ``b_dec`` on the input).
inference (an architecture without ``activation`` is trained only, saved as another)
    ``activation(sae, h, x)`` the features from pre-activations ``h`` (``x``: the raw input);
    ``tensors(cfg)`` names and shapes; ``check_config(cfg)``; ``pre_acts(sae, x~)``;
    ``decode(sae, f, x)``; ``skip(sae, x)`` (a term added to the decode at the site that bypasses
    the features); ``fold_decoder_norm(sae, norms)``; ``config_fields(cfg)``.
training (an architecture without ``train_activation`` is loaded only)
    ``train_activation(t, params, h)`` with the gradients training needs; ``check_options
    (settings, d_sae)``; ``init_params(t, x)``; ``init_buffers(t)``; ``loss(t, params, h, f,
    error, dead)`` (added to the shared reconstruction MSE); ``after_step(t, f)``; ``export(t)``;
    ``unit_norm_decoder``; ``fold_on_export``; ``auxk``: True when ``loss`` decodes dead latents
    and reads ``t.aux_plan``, the trainer's plan of that pass (see ``topk.loss``);
    ``saved_as`` (the architecture it is saved as);
    ``training_name`` (what the training log records); ``from_checkpoint(cfg, tensors)``: a
    SAELens training checkpoint's ``cfg.json`` fields and tensors as the ``saved_as``
    architecture's (what SAELens's ``save_inference_model`` writes), so that ``load_sae`` reads it.

``train_activation`` and ``loss`` run inside the trainer's compiled step (``mx.compile``), traced
once for each shape of batch: they compute from their arguments, ``t.settings``, ``t.d_in``,
``t.d_sae``, ``t.buffers`` and ``t.aux_plan``, never from other state of the trainer that changes
from step to step (``t.seen``), which the trace would freeze. ``after_step`` runs outside it.

A third party adds one with ``register_architecture(module)`` (``mlxterp_saes.register_architecture``),
touching no file here; docs/guide/saes.md shows one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from . import base
from .base import SAEError


@attrs.frozen(repr=False)
class Architecture:
    """One registered SAE architecture: its module's rules, the defaults of :mod:`.base` for
    those it leaves out (the module docstring lists them)."""

    name: str
    module: Any = attrs.field(eq=False, repr=False)
    aliases: tuple[str, ...] = ()
    transcoder: bool = False
    activation: Callable | None = None
    tensors: Callable = base.tensors
    check_config: Callable = base.check_config
    pre_acts: Callable = base.pre_acts
    decode: Callable = base.decode
    skip: Callable = base.skip
    fold_decoder_norm: Callable = base.fold_decoder_norm
    config_fields: Callable = base.config_fields
    train_activation: Callable | None = None
    check_options: Callable = base.check_options
    init_params: Callable = base.init_params
    init_buffers: Callable = base.init_buffers
    loss: Callable = base.loss
    after_step: Callable = base.after_step
    export: Callable = base.export
    unit_norm_decoder: bool = base.unit_norm_decoder
    fold_on_export: bool = base.fold_on_export
    auxk: bool = False
    saved_as: str = ""  # default: name
    from_checkpoint: Callable | None = None
    training_name: str = ""  # default: name

    def __repr__(self) -> str:
        return f"Architecture({self.name!r} from {getattr(self.module, '__name__', self.module)!r})"

    @property
    def loads(self) -> bool:
        """Whether an SAE of this architecture can be built (from a file, or by training)."""
        return self.activation is not None

    @property
    def trains(self) -> bool:
        return self.train_activation is not None


_FIELDS = [f.name for f in attrs.fields(Architecture) if f.name != "module"]
_REGISTRY: dict[str, Architecture] = {}


def register_architecture(module: Any, *, replace: bool = False) -> Architecture:
    """Register an SAE architecture module (or any object with the attributes the module
    docstring lists) under its ``name`` and ``aliases``. A name another module registered is
    an error unless ``replace=True`` (re-running a notebook cell)."""
    found = {field: getattr(module, field) for field in _FIELDS if hasattr(module, field)}
    if not isinstance(found.get("name"), str) or not found["name"]:
        raise SAEError(f"an SAE architecture module needs a name (a string); {module!r} has {found.get('name')!r}.")
    if "activation" not in found and "train_activation" not in found:
        raise SAEError(
            f"SAE architecture {found['name']!r} defines neither activation (to load it) nor "
            "train_activation (to train it)."
        )
    found.setdefault("saved_as", found["name"])
    found.setdefault("training_name", found["name"])
    arch = Architecture(module=module, **found)
    names = [arch.name, *arch.aliases]
    taken = [n for n in names if n in _REGISTRY and _REGISTRY[n].module is not module]
    if taken and not replace:
        raise SAEError(
            f"SAE architecture name {taken[0]!r} is taken (by {_REGISTRY[taken[0]].module!r}): choose "
            "another name, or pass replace=True to replace it."
        )
    for n in names:
        _REGISTRY[n] = arch
    return arch


def get_architecture(name: str, *, training: bool = False) -> Architecture:
    """The architecture registered as ``name`` (or an alias of it); with ``training``, one that
    ``train_sae`` can train."""
    arch = _REGISTRY.get(name)
    if training and (arch is None or not arch.trains):
        names = [a.training_name for a in architectures() if a.trains]
        raise SAEError(f"cannot train architecture {name!r}; choose one of {', '.join(names)}, or register one.")
    if training and not getattr(_REGISTRY.get(arch.saved_as), "loads", False):
        raise SAEError(f"{name} SAEs are saved as {arch.saved_as!r}, which is not a registered architecture that loads.")
    if not training and (arch is None or not arch.loads):
        saved = "".join(f" ({a.name} SAEs are saved as {a.saved_as!r})" for a in architectures() if not a.loads)
        raise SAEError(
            f"unknown SAE architecture {name!r}; mlxterp reads {', '.join(a.name for a in architectures() if a.loads)}"
            f"{saved}, and those registered with mlxterp_saes.register_architecture."
        )
    return arch


def architectures() -> list[Architecture]:
    """Every registered architecture once, in the order of registration."""
    return list({id(a): a for a in _REGISTRY.values()}.values())


def _register_builtins() -> None:
    from . import (batchtopk, gated, jumprelu, jumprelu_skip_transcoder, jumprelu_transcoder, skip_transcoder,
                   standard, topk, transcoder)

    for module in (standard, topk, batchtopk, jumprelu, gated, transcoder, skip_transcoder, jumprelu_transcoder,
                   jumprelu_skip_transcoder):
        register_architecture(module)


_register_builtins()
