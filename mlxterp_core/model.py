"""InterpretableModel: wrap any ``mlx.nn.Module`` (and optionally its tokenizer) for tracing; and
``load``, the one way in for real models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import inputs as _inputs
from . import plugins
from .architecture import Architecture, infer_schema, model_type, quantization_of, read_attribute, recognize
from .errors import InputError, TraceError, UnknownNameError, did_you_mean
from .load import open_source
from .module_probes import walk_modules
from .names import parse
from .proxies import LayerList, Output
from .schema import ArchitectureSchema, SchemaError
from .sites import MODEL_OUTPUT, static_site_names
from .trace import Trace

INFERRED = "inferred from module names"  # the plugin of a schema no plugin gave (infer_schema)


class InterpretableModel:
    """A model you can look inside: trace it, read activations by name, intervene.

    ``model`` is any ``mlx.nn.Module``; it is called as ``model(inputs)``. ``tokenizer`` is
    optional (mlx-lm's TokenizerWrapper, a Hugging Face tokenizer or a ``tokenizers``
    Tokenizer); without one, pass token ids or arrays instead of text. A string (a repo id, a
    ``.gguf`` file, an mlx-lm folder) is loaded as :func:`load` loads it.

    The wrapped module stays exactly as it was: probes exist only while a trace runs. Every
    attribute this class does not define is looked up on the wrapped module, so
    ``parameters()`` and ``load_weights`` work here as they do there; ``layers`` is the
    model's blocks as views (``model.layers[3].self_attn.output.save()`` in a trace block,
    :mod:`mlxterp_core.proxies`).
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        tokenizer: Any = None,
        *,
        schema: ArchitectureSchema | str | Path | None = None,
        validate: bool = True,
        layer_attr: str | None = None,
        embedding_path: str | None = None,
        norm_path: str | None = None,
        lm_head_path: str | None = None,
    ):
        """
        Args:
            model: any ``mlx.nn.Module``; or a source ``mlxterp.load`` takes (a Hugging Face
                repo id, a ``.gguf`` file, an mlx-lm model folder), loaded with its defaults.
            tokenizer: optional; needed for text inputs and the tokenizer helpers.
            schema: the model's architecture schema (an ArchitectureSchema or a .toml/.json
                file). By default the plugins recognise the family from mlx-lm's
                ``model_type``; a model no plugin knows still gets raw names.
            validate: check the schema against a 3-token forward pass now (recommended).
            layer_attr, embedding_path, norm_path, lm_head_path: for a model no plugin
                recognises, where its list of blocks, token embedding, final norm and output
                projection are (paths from the wrapped module; upstream mlxterp's keywords).
                Those not given are found by their names (``layers``, ``embed_tokens``,
                ``norm``, ``lm_head``) where only one module has the name. The schema they
                make is validated like any other (an error here when it came from keywords).
        """
        report = None
        if isinstance(model, (str, os.PathLike)):
            model, found, report = open_source(model)
            tokenizer = tokenizer or found
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"InterpretableModel wraps an mlx.nn.Module (or loads a repo id or path), got {type(model).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self._load_report: dict[str, Any] | None = None  # set by mlxterp.load
        self._splices: list[Any] = []  # attached by `with model.saes(...)`
        self._no_schema: str | None = None  # why an unrecognised model has no schema
        keywords = {k: v for k, v in dict(layer_attr=layer_attr, embedding_path=embedding_path,
                                            norm_path=norm_path, lm_head_path=lm_head_path).items() if v is not None}
        self._layer_attr = layer_attr
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
            self.architecture = recognize(model) or self._inferred(keywords)
        if self.architecture is not None and validate:
            from .validation import validate_architecture

            try:
                validate_architecture(self)
            except SchemaError as e:
                if self.architecture.plugin != INFERRED:
                    raise
                self.architecture, self._no_schema = None, f"the schema its module names suggest fails validation: {e}"
        if layer_attr is not None:
            self._layers_path()  # fail now on a layer_attr that names no list of blocks
        if report is not None:
            self.load_report = report

    def _inferred(self, keywords: dict[str, str]) -> Architecture | None:
        """The architecture of a model no plugin recognises, from ``keywords`` and its module
        names (:func:`~mlxterp_core.architecture.infer_schema`); None, with the reason kept,
        where they do not make one."""
        try:
            return Architecture(infer_schema(self.model, **keywords), self.model,
                                plugin=", ".join(f"{k}=" for k in keywords) or INFERRED)
        except SchemaError as e:
            self._no_schema = f"no schema from {'those keywords and ' if keywords else ''}its module names: {e}"
            return None

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

    def architecture_or_raise(self, what: str) -> Architecture:
        """The architecture, or an error saying that ``what`` (a standard name, or an analysis
        such as ``"the logit lens"``) needs one."""
        if self.architecture is not None:
            return self.architecture
        unknown = f"no plugin recognises this {type(self.model).__name__} (model_type={model_type(self.model)!r})"
        unknown += f" ({self._no_schema})" if self._no_schema else ""
        fix = ("pass schema=ArchitectureSchema(...) or a schema file; or say where its parts are with layer_attr=, "
               "embedding_path=, norm_path= and lm_head_path= (upstream mlxterp's keywords); or install a plugin "
               "that provides a schema (docs: plugin authoring).")
        try:
            parse(what)
        except UnknownNameError:  # an analysis
            raise UnknownNameError(
                f"{what} needs the model's architecture (its blocks, final norm and unembedding), but {unknown}. "
                f"To run it, {fix}"
            ) from None
        raise UnknownNameError(
            f"{what!r} is a standard name, but {unknown}, so only raw names work (see model.module_names()). "
            f"To use standard names, {fix}"
        )

    # -- running -------------------------------------------------------------------------

    def trace(
        self,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
        saes: Any = None,
        transcoders: Any = None,
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
            transcoders: the same as ``saes`` (a set of transcoders splices every layer it
                covers); both may be given.
        """
        return Trace(self, inputs, interventions=interventions, capture=capture, saes=[saes, transcoders])

    def run(
        self,
        inputs: Any,
        interventions: Mapping[str, Callable] | None = None,
        capture: str | list[str] | None = None,
        saes: Any = None,
        transcoders: Any = None,
    ) -> Trace:
        """Like :meth:`trace` without the ``with`` block: returns the finished trace."""
        return self.trace(inputs, interventions=interventions, capture=capture, saes=saes, transcoders=transcoders).run()

    @contextmanager
    def saes(self, *saes: Any) -> Iterator[InterpretableModel]:
        """Attach splices (SAEs, transcoders) for a block: every trace, generation and
        analysis inside ``with model.saes(sae, ...):`` runs with them
        (``with model.transcoders(tc):`` is the same)."""
        from .splice import Splices, splice_list

        added = [s for group in saes for s in splice_list(group)]
        Splices(self, [*self._splices, *added])  # fail now on a bad splice or site
        before = list(self._splices)
        self._splices.extend(added)
        try:
            yield self
        finally:
            self._splices[:] = before

    transcoders = saes

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
    def output(self) -> Output:
        """Inside a trace block, ``model.output.save()`` returns the model's output."""
        return Output(self, MODEL_OUTPUT, lambda trace: trace.output, "model.output")

    @property
    def layers(self) -> LayerList:
        """The model's blocks as views: ``model.layers[3].self_attn.output.save()`` inside a
        trace block; attributes and calls reach the modules (:mod:`mlxterp_core.proxies`)."""
        return LayerList(self, self._layers_path())

    def _layers_path(self) -> str:
        """The path of the list of blocks from the wrapped module: the schema's, else
        ``layer_attr``'s (or under ``model.``), else where the module's ``layers`` lives."""
        if self.architecture is not None:
            return self.architecture.schema.layers
        if self._layer_attr is not None:
            for path in (self._layer_attr, f"model.{self._layer_attr}"):
                try:
                    if isinstance(read_attribute(self.model, path), (list, tuple)):
                        return path
                except (AttributeError, KeyError, IndexError, TypeError):
                    continue
            raise AttributeError(f"layer_attr={self._layer_attr!r}: no list of blocks at {self._layer_attr!r} "
                                 f"or 'model.{self._layer_attr}' in this {type(self.model).__name__}.")
        blocks = getattr(self.model, "layers", None)
        if isinstance(blocks, (list, tuple)) and blocks:
            for path, module in walk_modules(self.model):
                if module is blocks[0] and path.endswith(".0"):
                    return path.removeprefix("model.")[: -len(".0")]
        raise AttributeError(
            f"this {type(self.model).__name__} has no list of blocks named 'layers' for model.layers: pass "
            "layer_attr= (the path of its blocks) to InterpretableModel."
        )

    # -- names ---------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        """Raw module paths of the wrapped model (``model.model.layers.0.self_attn`` ...)."""
        return [path for path, _ in walk_modules(self.model)[1:]]

    def site_names(self) -> list[str]:
        """Every raw site name known before running (module outputs and ``:input`` ports)."""
        return static_site_names(self.module_names())

    def standard_names(self) -> list[str]:
        """Every standard name this model has (needs a recognised family)."""
        return self.architecture_or_raise("the list of standard names").standard_names()

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (not padded; a trace pads a list of prompts itself)."""
        return [self.encode(text) for text in texts]

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
            exported = f" mlxterp.{name}(model, ...) is the function of that name." if callable(plugins.exports().get(name)) else ""
            raise AttributeError(
                f"'InterpretableModel' object has no attribute {name!r} (nor has the wrapped "
                f"{type(module).__name__})." + exported
                + did_you_mean(name, [n for n in self.__dir__() if not n.startswith("_")])
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


def load(
    source: str | Path | None = None,
    *,
    quantized: bool | None = None,
    dtype: mx.Dtype | None = None,
    tokenizer: Any = None,
    validate: bool = True,
    kernels: bool | None = None,
    shard: str | None = None,
    group: Any = None,
) -> InterpretableModel:
    """Load a model and wrap it.

    Args:
        source: None for the default model, a ``.gguf`` file, an mlx-lm model directory, or a
            Hugging Face repo id.
        quantized: keep quantized weights quantized (True), dequantize them (False), or decide
            by backend (None: dequantize on the CPU where an optimized BLAS serves MLX, keep
            them on Metal / CUDA and on MLX's reference BLAS, where the quantized matmul is
            the faster one).
        dtype: the float type of dequantized weights (default: float32 on the CPU, float16
            elsewhere).
        tokenizer: use this tokenizer instead of the one the source provides.
        validate: check the family's schema on a 3-token forward pass.
        kernels: use mlxterp's vectorised SiLU in the MLPs and softmax in the attention
            modules (see ``cpu_kernels``; None: on the
            CPU backend with float32 weights, where it is faster; False: mlx-lm's own).
        shard: split the model across the processes of an ``mlx.launch`` job the way mlx-lm
            does: ``"tensor"`` (every block's heads and MLP columns across the ranks) or
            ``"pipeline"`` (consecutive blocks per rank). Every rank must call ``load`` the same
            way; the weights are read lazily, so each rank reads only what it holds (pipeline:
            its blocks). See docs/guide/sharded.md.
        group: the ``mx.distributed`` group to shard over (default: every rank of the job).
    """
    module, found, report = open_source(source, quantized=quantized, dtype=dtype, kernels=kernels, shard=shard, group=group)
    model = InterpretableModel(module, tokenizer=tokenizer or found, validate=validate)
    model.load_report = report
    return model


__all__ = ["InterpretableModel", "MODEL_OUTPUT", "load"]
