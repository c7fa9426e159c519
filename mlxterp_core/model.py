"""InterpretableModel: wrap any ``mlx.nn.Module`` (and optionally its tokenizer) for tracing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import inputs as _inputs
from . import plugins
from .architecture import Architecture, model_type, quantization_of, recognize
from .errors import InputError, TraceError, UnknownNameError, did_you_mean
from .module_probes import walk_modules
from .schema import ArchitectureSchema
from .sites import MODEL_OUTPUT, static_site_names
from .trace import Trace, active_traces


class _OutputProxy:
    """``model.output`` inside a trace block; ``.save()`` returns the model's output."""

    def __init__(self, model: InterpretableModel):
        self._model = model

    def save(self) -> Any:
        return self._model._current_trace().output

    @property
    def value(self) -> Any:
        return self.save()


class InterpretableModel:
    """A model you can look inside: trace it, read activations by name, intervene.

    ``model`` is any ``mlx.nn.Module``; it is called as ``model(inputs)``. ``tokenizer`` is
    optional (mlx-lm's TokenizerWrapper, a Hugging Face tokenizer or a ``tokenizers``
    Tokenizer); without one, pass token ids or arrays instead of text.

    The wrapped module stays exactly as it was: probes exist only while a trace runs. Every
    attribute this class does not define is looked up on the wrapped module, so
    ``parameters()``, ``load_weights`` and ``layers`` work here as they do there.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        schema: ArchitectureSchema | str | Path | None = None,
        validate: bool = True,
    ):
        """
        Args:
            model: any ``mlx.nn.Module``.
            tokenizer: optional; needed for text inputs and the tokenizer helpers.
            schema: the model's architecture schema (an ArchitectureSchema or a .toml/.json
                file). By default the plugins recognise the family from mlx-lm's
                ``model_type``; a model no plugin knows still gets raw names.
            validate: check the schema against a 3-token forward pass now (recommended).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"InterpretableModel wraps an mlx.nn.Module, got {type(model).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self._load_report: dict[str, Any] | None = None  # set by mlxterp.load
        self._splices: list[Any] = []  # attached by `with model.saes(...)`
        # a model sharded by mlx-lm across processes: its plan (mlxterp_core.sharding), else None
        self.sharding: Any = None
        if schema is not None and not isinstance(schema, ArchitectureSchema):
            schema = ArchitectureSchema.from_file(schema)
        from . import sharding

        if sharding.sharded(model) is not None:
            sharding.attach(self, schema)  # the global architecture, checked on a short run
        elif schema is not None:
            self.architecture: Architecture | None = Architecture(schema, model, plugin="schema=")
        else:
            self.architecture = recognize(model)
        if self.architecture is not None and validate:
            from .validation import validate_architecture

            validate_architecture(self)

    @property
    def load_report(self) -> dict[str, Any] | None:
        """What ``mlxterp.load`` did (format, file, quantization, weights, backend); None for
        a module wrapped by hand. The architecture reads its model name and quantization here."""
        return self._load_report

    @load_report.setter
    def load_report(self, report: dict[str, Any] | None) -> None:
        self._load_report = report
        if self.architecture is not None:
            self.architecture.load_report = report

    def architecture_or_raise(self, name: str) -> Architecture:
        """The architecture, or an error saying standard names need one."""
        if self.architecture is None:
            raise UnknownNameError(
                f"{name!r} is a standard name, but no plugin recognises this "
                f"{type(self.model).__name__} (model_type={model_type(self.model)!r}), so only raw "
                "names work (see model.module_names()). To use standard names, pass "
                "schema=ArchitectureSchema(...) or a schema file, or install a plugin that "
                "provides one (docs: plugin authoring)."
            )
        return self.architecture

    # -- running -------------------------------------------------------------------------

    def trace(
        self,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
        saes: Any = None,
    ) -> Trace:
        """A trace of one forward pass; use as ``with model.trace(...) as tr:``.

        Args:
            inputs: a string, a list of strings (right-padded batch), a list of token ids,
                a list of id lists, or an mx.array passed to the model as is.
            interventions: site name (or glob pattern) -> callable ``array -> array``.
            capture: names or glob patterns to record; None records every site.
            saes: splices (sparse autoencoders, transcoders; see :mod:`mlxterp_core.splice`)
                that replace their sites in this pass; their sub-sites
                (``layers.8.output.sae.features``) can be captured and intervened on.
        """
        return Trace(self, inputs, interventions=interventions, capture=capture, saes=saes)

    def run(
        self,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
        saes: Any = None,
    ) -> Trace:
        """Like :meth:`trace` without the ``with`` block: returns the finished trace."""
        return self.trace(inputs, interventions=interventions, capture=capture, saes=saes).run()

    @contextmanager
    def saes(self, *saes: Any) -> Iterator[InterpretableModel]:
        """Attach splices (SAEs, transcoders) for a block: every trace, generation and
        analysis inside ``with model.saes(sae, ...):`` runs with them."""
        from .splice import Splices, splice_list

        added = [s for group in saes for s in splice_list(group)]
        Splices(self, [*self._splices, *added])  # fail now on a bad splice or site
        before = list(self._splices)
        self._splices.extend(added)
        try:
            yield self
        finally:
            self._splices[:] = before

    @property
    def attached_saes(self) -> tuple[Any, ...]:
        """The splices attached by the enclosing ``with model.saes(...)`` blocks (empty outside)."""
        return tuple(self._splices)

    def __call__(self, inputs: Any) -> Any:
        """A plain forward pass, no probes: the wrapped module's own output."""
        return self.model(self.prepare_inputs(inputs).array)

    def prepare_inputs(self, inputs: Any) -> _inputs.ModelInputs:
        """What the model runs on for ``inputs`` (text, ids, arrays), token ids checked
        against the embedding: every path by which inputs enter the model goes through here."""
        return _inputs.prepare(inputs, self.tokenizer, self.embedding_vocab_size)

    @property
    def embedding_vocab_size(self) -> int | None:
        """Rows of the model's token embedding (valid ids are 0 .. rows - 1); None when the
        model has no recognisable embedding (then ids are not checked)."""
        if "_embedding_rows" not in self.__dict__:
            schema = self.architecture.schema if self.architecture is not None else None
            paths = (schema.embed, schema.unembed.tied_to) if schema is not None else ()
            self.__dict__["_embedding_rows"] = _inputs.embedding_vocab_size(self.model, paths)
        return self.__dict__["_embedding_rows"]

    def cache_activations(self, corpus: Any, sites: str | list[str], out: str | Path, **options: Any):
        """Run a corpus through the model and write the activations at ``sites`` to the
        folder ``out``; returns the :class:`~mlxterp_core.dataset.ActivationDataset`.
        Resumable, distributed under ``mlx.launch``; options and details:
        :func:`mlxterp_core.caching.cache_activations`."""
        from .caching import cache_activations

        return cache_activations(self, corpus, sites, out, **options)

    @property
    def output(self) -> _OutputProxy:
        """Inside a trace block, ``model.output.save()`` returns the model's output."""
        return _OutputProxy(self)

    def _current_trace(self) -> Trace:
        active = active_traces(self)
        if not active:
            raise TraceError(
                "model.output is only available inside a `with model.trace(...)` block."
            )
        return active[-1]

    # -- names ---------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        """Raw module paths of the wrapped model (``model.model.layers.0.self_attn`` ...)."""
        return [path for path, _ in walk_modules(self.model)[1:]]

    def site_names(self) -> list[str]:
        """Every raw site name known before running (module outputs and ``:input`` ports)."""
        return static_site_names(self.module_names())

    def standard_names(self) -> list[str]:
        """Every standard name this model has (needs a recognised family)."""
        return self.architecture_or_raise("standard names").standard_names()

    # -- tokenizer helpers ---------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TraceError(
                "this model has no tokenizer: InterpretableModel(module, tokenizer=...)."
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return _inputs.encode(self._require_tokenizer(), text)

    def decode(self, ids) -> str:
        """Text of a list (or array) of token ids."""
        return _inputs.decode(self._require_tokenizer(), ids)

    def token_to_str(self, token_id: int) -> str:
        """The text of one token, with its leading space if it has one (``' Paris'``)."""
        return _inputs.decode(self._require_tokenizer(), [int(token_id)])

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, special tokens included."""
        return _inputs.vocab_size(self._require_tokenizer())

    # TransformerLens's names for the same helpers

    def to_tokens(self, inputs: Any) -> mx.array:
        """(B, T) token ids of a prompt or a list of prompts (right-padded), as a trace runs
        them: the tokenizer's own special tokens (SmolLM2 adds no BOS), no ``prepend_bos``."""
        return self.prepare_inputs(inputs).array

    def to_str_tokens(self, inputs: Any) -> list[str] | list[list[str]]:
        """The text of each token of a prompt (a string or token ids); a list of prompts gives
        one list per prompt (without padding)."""
        prepared = self.prepare_inputs(inputs)
        rows = [[self.token_to_str(t) for t in row[:n]] for row, n in zip(prepared.array.tolist(), prepared.lengths)]
        one_prompt = (isinstance(inputs, str) or getattr(inputs, "ndim", 2) == 1
                      or (isinstance(inputs, (list, tuple)) and bool(inputs) and isinstance(inputs[0], int)))
        return rows[0] if one_prompt else rows

    def to_single_token(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token (``" Paris"``), else an InputError
        listing the tokens it is."""
        ids = self.encode(text)
        special = {getattr(self.tokenizer, a, None) for a in ("bos_token_id",)} - {None}
        ids = [i for i in ids if i not in special] if len(ids) > 1 else ids
        if len(ids) != 1:
            pieces = [self.token_to_str(i) for i in ids]
            raise InputError(f"{text!r} is {len(ids)} tokens ({pieces}), not one; mind the leading space (' Paris').")
        return ids[0]

    # -- delegation ----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here: analyses from plugins
        # (model.logit_lens(...)), then the wrapped module's (parameters(), load_weights ...).
        if name.startswith("__") or "model" not in self.__dict__:
            raise AttributeError(name)
        analysis = plugins.analyses().get(name)
        if analysis is not None:  # a bound method: help() and ? show its own name, signature and doc
            return MethodType(analysis, self)
        module = self.__dict__["model"]
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"'InterpretableModel' object has no attribute {name!r} (nor has the wrapped "
                f"{type(module).__name__})." + did_you_mean(name, [n for n in self.__dir__() if not n.startswith("_")])
            ) from None

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *plugins.analyses()})

    def __repr__(self) -> str:
        arch = self.architecture
        tokenizer = "" if self.tokenizer is not None else ", no tokenizer"
        if arch is None:
            return (f"InterpretableModel({type(self.model).__name__}, no family recognised (raw names only), "
                    f"weights {quantization_of(self.model)}{tokenizer})")
        name = f"{arch.model_name!r}, " if arch.model_name else ""
        heads = f"{arch.n_heads} heads" + (f" ({arch.n_kv_heads} kv)" if arch.n_kv_heads != arch.n_heads else "")
        sharded = f"; {self.sharding.describe()}" if self.sharding is not None else ""
        return (f"InterpretableModel({name}{arch.family}, {arch.n_layers} layers, d_model {arch.d_model}, {heads}; "
                f"weights {arch.quantization}, {arch.backend}{tokenizer}{sharded})")


__all__ = ["InterpretableModel", "MODEL_OUTPUT"]
