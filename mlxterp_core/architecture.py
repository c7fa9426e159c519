"""A schema bound to one model: the facts read from it, and standard names resolved to raw sites.

A standard name resolves to a :class:`Resolved`: the raw site that holds its tensor, and a
:class:`View` between the raw tensor and the standard one (a chunk of a fused projection, a
per-head reshape, a scale). Interventions on standard names are applied through the view at
the raw site, so they change exactly the tensor the name reads. ``resid_mid`` is written
through the attention output: ``attn' = f(input + attn) - input``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UnknownNameError, closest, did_you_mean
from .names import FORWARD_ORDER, HEAD_VIEWS, StandardName, parse
from .schema import ArchitectureSchema, Attention, Number, Port, SchemaError, Unembed


def read_attribute(obj: Any, path: str) -> Any:
    """``read_attribute(block, "args.logit_scale")``; dict-like and list steps work too."""
    for part in path.split("."):
        if isinstance(obj, (list, tuple)) and part.isdigit():
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


# -- views between a raw tensor and a standard one --------------------------------------------


@attrs.frozen
class View:
    """``get`` turns the raw tensor into the standard one; ``put`` writes a new standard
    tensor back into the raw one."""

    get: Callable[[mx.array], mx.array]
    put: Callable[[mx.array, mx.array], mx.array]

    def then(self, inner: View) -> View:
        """This view followed by ``inner`` (inner sees what this view produces)."""
        return View(
            get=lambda raw: inner.get(self.get(raw)),
            put=lambda raw, new: self.put(raw, inner.put(self.get(raw), new)),
        )


def chunk_view(bounds: Callable[[int], tuple[int, int]]) -> View:
    """Chunk ``bounds(width)`` of the last axis of a fused projection."""

    def get(raw: mx.array) -> mx.array:
        start, stop = bounds(raw.shape[-1])
        return raw[..., start:stop]

    def put(raw: mx.array, new: mx.array) -> mx.array:
        start, stop = bounds(raw.shape[-1])
        return mx.concatenate([raw[..., :start], new, raw[..., stop:]], axis=-1)

    return View(get=get, put=put)


def grouped_chunk_view(groups: int, bounds: Callable[[int], tuple[int, int]]) -> View:
    """Chunk ``bounds`` of every group of a fused axis laid out as (groups, per-group width)."""

    def grouped(raw: mx.array) -> mx.array:
        return raw.reshape(*raw.shape[:-1], groups, raw.shape[-1] // groups)

    def get(raw: mx.array) -> mx.array:
        g = grouped(raw)
        start, stop = bounds(g.shape[-1])
        return g[..., start:stop].reshape(*raw.shape[:-1], -1)

    def put(raw: mx.array, new: mx.array) -> mx.array:
        g = grouped(raw)
        start, stop = bounds(g.shape[-1])
        new = new.reshape(*raw.shape[:-1], groups, stop - start)
        return mx.concatenate([g[..., :start], new, g[..., stop:]], axis=-1).reshape(raw.shape)

    return View(get=get, put=put)


def scale_view(factor: float) -> View:
    return View(
        get=lambda raw: raw * factor,
        put=lambda raw, new: (new / factor).astype(raw.dtype),
    )


def heads_view(n_heads: int, layout: str) -> View:
    """(B, T, H*D) <-> (B, H, T, D) ('bhtd') or (B, T, H, D) ('bthd')."""

    def get(raw: mx.array) -> mx.array:
        split = raw.reshape(*raw.shape[:-1], n_heads, -1)
        return split if layout == "bthd" else split.swapaxes(-2, -3)

    def put(raw: mx.array, new: mx.array) -> mx.array:
        back = new if layout == "bthd" else new.swapaxes(-2, -3)
        return back.reshape(raw.shape)

    return View(get=get, put=put)


SWAP_HEAD_TIME = View(get=lambda raw: raw.swapaxes(1, 2), put=lambda raw, new: new.swapaxes(1, 2))


@attrs.frozen
class Resolved:
    """Where a standard name's tensor is, and how to read and write it."""

    name: str  # canonical: 'layers.3.attn.q_heads'
    site: str  # raw site that holds the tensor
    view: View | None = None
    n_heads: int | None = None  # heads of a (B, T, H*D) tensor, for .at(heads=...)
    # resid_mid: written through the attention output, reading the block input
    write_site: str | None = None
    write_view: View | None = None
    needs: str | None = None

    def read(self, raw: mx.array) -> mx.array:
        return raw if self.view is None else self.view.get(raw)

    def edit(self, fn: Callable[[mx.array], mx.array]) -> tuple[str, Callable[[mx.array, Mapping], mx.array]]:
        """The raw site to edit, and the raw edit ``(raw, seen) -> raw`` that applies ``fn``
        to this name's tensor. ``seen`` maps raw sites to values seen earlier in the pass."""
        if self.write_site is not None:  # resid_mid = input + attn
            attn = self.write_view or View(get=lambda r: r, put=lambda r, new: new)

            def through_attn(raw: mx.array, seen: Mapping) -> mx.array:
                resid_pre = seen[self.needs]
                resid_mid = resid_pre + attn.get(raw)
                return attn.put(raw, fn(resid_mid) - resid_pre)

            return self.write_site, through_attn
        if self.view is None:
            return self.site, lambda raw, seen: fn(raw)
        view = self.view
        return self.site, lambda raw, seen: view.put(raw, fn(view.get(raw)))


# -- the bound architecture ---------------------------------------------------------------------


class Architecture:
    """A schema applied to one model: its sizes, and name resolution.

    The sizes have TransformerLens's names (``cfg.d_model`` there, ``architecture.d_model``
    here): ``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_head``, ``d_model``, ``d_vocab`` and
    ``d_mlp`` (None where the model does not say, e.g. mixture-of-experts MLPs); and
    ``quantization``, ``backend`` and ``model_name`` (from ``load_report``, which
    ``mlxterp.load`` sets).
    """

    def __init__(self, schema: ArchitectureSchema, root: nn.Module, plugin: str = "?"):
        self.schema = schema
        self.plugin = plugin
        self.root = root
        self.load_report: dict[str, Any] | None = None  # what mlxterp.load did, where it made the model
        try:
            self.layers = read_attribute(root, schema.layers)
            attention = read_attribute(self.layers[0], schema.attention.module)
            self.n_heads = int(read_attribute(attention, schema.attention.n_heads))
            kv = schema.attention.n_kv_heads
            self.n_kv_heads = int(read_attribute(attention, kv)) if kv else self.n_heads
            self.head_dim = self._read_head_dim(attention)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise SchemaError(
                f"schema {schema.family!r} (plugin {plugin}) does not fit this "
                f"{type(root).__name__}: {type(e).__name__}: {e}. Check the fields "
                "'layers' and 'attention' of the schema."
            ) from e
        self.n_layers = len(self.layers)

    def _read_head_dim(self, attention: nn.Module) -> int | None:
        """The schema's head_dim attribute; else the query projection's rows / n_heads."""
        path = self.schema.attention.head_dim
        if path and hasattr(attention, path.split(".")[0]):
            return int(read_attribute(attention, path))
        port = self.schema.block.get("attn.q")
        if port is None or port.split or ":" in port.site or "#" in port.site:
            return None
        weight = getattr(read_attribute(self._block, port.site), "weight", None)
        return None if weight is None else weight.shape[0] // self.n_heads

    @property
    def _block(self) -> nn.Module:
        """The block whose facts (head width, MLP width) are read: the first."""
        return self.layers[0]

    @property
    def family(self) -> str:
        return self.schema.family

    # -- sizes and facts, in TransformerLens's names ----------------------------------------------

    @property
    def d_head(self) -> int | None:
        return self.head_dim

    @property
    def d_model(self) -> int | None:
        """Width of the residual stream (the token embedding's)."""
        embedding = self._embedding()
        if embedding is None:
            return None
        return int(getattr(embedding, "dims", None) or embedding.weight.shape[-1])

    @property
    def d_vocab(self) -> int | None:
        """Rows of the token embedding (valid token ids are 0 .. d_vocab - 1)."""
        embedding = self._embedding()
        return None if embedding is None else int(embedding.weight.shape[0])

    @property
    def d_mlp(self) -> int | None:
        """Width of the MLP's hidden layer (the input of its down projection), where it is a
        linear layer; None otherwise (mixtures of experts)."""
        port = self.schema.block.get("mlp.down") or self.schema.block.get("mlp.act")
        if port is None:
            return None
        try:
            down = read_attribute(self._block, re.split(r"[#:]", port.site, maxsplit=1)[0])
        except (AttributeError, KeyError, IndexError, TypeError):
            return None
        return self._input_width(down)

    def _input_width(self, linear: nn.Module) -> int | None:
        """The input width of a block's linear layer (a hook: a sharded model's holds a slice)."""
        return linear_input_width(linear)

    @property
    def quantization(self) -> str:
        """What the weights are now: ``"4-bit, group size 64"``, or ``"none (float32)"``, and
        what they were in the loaded file if mlxterp.load dequantized them."""
        now = quantization_of(self.root)
        stored = (self.load_report or {}).get("quantization")
        if now.startswith("none") and stored and stored != "none":
            bits = sorted({int(b) for b in re.findall(r"(\d+)-bit", stored)})
            was = "/".join(map(str, bits)) + "-bit" if bits else stored
            return f"{now[:-1]}, dequantized from {was})" if now.endswith(")") else f"none (dequantized from {was})"
        return now

    @property
    def backend(self) -> str:
        """Where MLX runs: "cpu" or "gpu"."""
        return "gpu" if mx.default_device().type == mx.gpu else "cpu"

    @property
    def model_name(self) -> str | None:
        """The model's name as loaded: a file's name, a Hugging Face repo id, a directory's
        name (None for a module wrapped by hand)."""
        report = self.load_report or {}
        for key in ("repo", "file", "directory"):
            if report.get(key):
                return report[key] if key == "repo" else Path(report[key]).name.removesuffix(".gguf")
        return report.get("name")

    def __repr__(self) -> str:
        name = f" {self.model_name!r}" if self.model_name else ""
        heads = f"{self.n_heads} heads" + (f" ({self.n_kv_heads} kv)" if self.n_kv_heads != self.n_heads else "")
        sizes = [f"{self.n_layers} layers", f"d_model {self.d_model}", heads + (f" x d_head {self.d_head}" if self.d_head else "")]
        sizes += [f"d_mlp {self.d_mlp}"] if self.d_mlp else []
        sizes += [f"d_vocab {self.d_vocab}"]
        return f"Architecture({self.family}{name}: {', '.join(sizes)}; weights {self.quantization}, {self.backend})"

    def _embedding(self) -> nn.Module | None:
        return token_embedding(self.root, (self.schema.embed, self.schema.unembed.tied_to))

    # -- names ----------------------------------------------------------------------------------

    def resolve(self, name: str | StandardName) -> list[Resolved]:
        """All tensors a standard name (or alias) means: one, or one per layer for 'layers[*]'."""
        try:
            parsed = parse(name) if isinstance(name, str) else name
        except UnknownNameError as e:  # a misspelling: what this model has, the closest first
            raise UnknownNameError(self._misspelled(name) or str(e)) from None
        if parsed.layer == "*":
            return [self._resolve(attrs.evolve(parsed, layer=i)) for i in range(self.n_layers)]
        return [self._resolve(parsed)]

    def _misspelled(self, name: str) -> str | None:
        """For ``layers[i].<sub>`` with an unknown ``sub``: the message naming the block names
        this model has, the closest to ``sub`` suggested (its layer index kept); else None."""
        match = re.match(r"^layers(?:\[(-?\d+|\*)\]|\.(-?\d+|\*))\.(.+)$", name.strip())
        if match is None:
            return None
        layer, sub = match.group(1) or match.group(2), match.group(3)
        names = self.block_names(0)
        found = closest(sub, names, n=3)
        hint = f" Did you mean {' or '.join(repr(f'layers[{layer}].{s}') for s in found)}?" if found else ""
        return (f"{name!r}: '{sub}' is not a standard block name.{hint} This {self.family} model's block "
                f"names: {', '.join(names)}.")

    def has(self, sub: str, layer: int = 0) -> bool:
        """Whether layer ``layer`` has the block-level standard name ``sub`` (e.g. 'resid_mid')."""
        try:
            self._resolve(StandardName(sub, layer))
        except UnknownNameError:
            return False
        return True

    def block_names(self, layer: int = 0) -> list[str]:
        """The block-level standard names layer ``layer`` has, in forward-pass order."""
        return [s for s in FORWARD_ORDER if self.has(s, layer)]

    def standard_names(self) -> list[str]:
        """Every standard name of this model (per layer), model-level names included."""
        per_layer = [f"layers.{i}.{s}" for i in range(self.n_layers) for s in self.block_names(i)]
        return ["embed", *per_layer, "ln_final", "logits"]

    def _resolve(self, name: StandardName) -> Resolved:
        schema = self.schema
        if name.layer is None:
            site = {
                "embed": "model." + schema.embed,
                "ln_final": "model." + schema.final_norm,
                "logits": "__model_output__",
            }[name.sub]
            return Resolved(str(name), site)
        i = name.layer
        if not -self.n_layers <= i < self.n_layers:
            raise UnknownNameError(
                f"{name}: layer {i} does not exist; this {schema.family} model has layers "
                f"0..{self.n_layers - 1} (or -{self.n_layers}..-1 counted from the end)."
            )
        if i < 0:  # layers[-1] is the last layer
            i += self.n_layers
            name = attrs.evolve(name, layer=i)
        block = f"model.{schema.layers}.{i}"
        sub = name.sub
        if sub == "input":
            resolved = Resolved(str(name), f"{block}:input")
        elif sub == "output":
            resolved = Resolved(str(name), block)
        elif sub == "attn.pattern":
            if not schema.attention.pattern:
                raise self._missing(name, "attention probabilities cannot be observed in this family")
            resolved = Resolved(str(name), f"{block}.{schema.attention.module}:pattern")
        elif sub in HEAD_VIEWS:
            base = self._port(name, HEAD_VIEWS[sub])
            n = self._heads_of(HEAD_VIEWS[sub])
            resolved = attrs.evolve(base, name=str(name), view=_then(base.view, heads_view(n, "bhtd")), n_heads=None)
        elif sub == "resid_mid" and "resid_mid" in schema.block:
            attn = self._port(StandardName("attn", i), "attn")
            resolved = attrs.evolve(
                self._port(name, "resid_mid"),
                write_site=attn.site,
                write_view=attn.view,
                needs=f"{block}:input",
            )
        else:
            resolved = self._port(name, self._pick(name, sub))
        if name.layout == "bthd":  # TransformerLens's (B, T, H, D)
            if sub in ("attn.q_rot", "attn.k_rot"):
                resolved = attrs.evolve(resolved, view=_then(resolved.view, SWAP_HEAD_TIME))
            elif sub in ("attn.q", "attn.k", "attn.v", "attn.z"):
                resolved = attrs.evolve(resolved, view=_then(resolved.view, heads_view(resolved.n_heads, "bthd")), n_heads=None)
        return resolved

    def _pick(self, name: StandardName, sub: str) -> str:
        for option in sub.split("|"):  # 'mlp.gate|mlp.up': the first the family has
            if option in self.schema.block:
                return option
        raise self._missing(name, f"schema {self.schema.family!r} maps no '{sub}'")

    def _port(self, name: StandardName, sub: str) -> Resolved:
        port: Port | None = self.schema.block.get(sub)
        if port is None:
            raise self._missing(name, f"schema {self.schema.family!r} maps no '{sub}'")
        if port.optional and not self._exists(name.layer, port.site):
            raise self._missing(name, f"layer {name.layer} of this model has no {port.site} (an optional '{sub}')")
        block = f"model.{self.schema.layers}.{name.layer}"
        view = None
        if port.split and port.grouped:
            view = grouped_chunk_view(self.n_kv_heads, self._chunk_bounds(port, groups=self.n_kv_heads))
        elif port.split:
            view = chunk_view(self._chunk_bounds(port))
        if port.scale is not None:
            factor = float(self.number(port.scale, self.layers[name.layer]))
            view = _then(view, scale_view(factor))
        if port.layout == "bthd":
            view = _then(view, SWAP_HEAD_TIME)
        elif port.layout == "flat":
            view = _then(view, heads_view(self._heads_of(sub), "bhtd"))
        n_heads = self._heads_of(sub) if sub in ("attn.q", "attn.k", "attn.v", "attn.z") else None
        return Resolved(str(name), f"{block}.{port.site}", view, n_heads)

    def _exists(self, layer: int, site: str) -> bool:
        path = re.split(r"[#:]", site, maxsplit=1)[0]
        try:
            return isinstance(read_attribute(self.layers[layer], path), nn.Module)
        except (AttributeError, KeyError, IndexError):
            return False

    def _chunk_bounds(self, port: Port, groups: int = 1) -> Callable[[int], tuple[int, int]]:
        """(start, stop) of the port's chunk, given the fused axis width (per group)."""
        units, part = port.split, port.part
        if all(u == "half" for u in units):  # equal parts of whatever width the tensor has
            return lambda width: (part * width // len(units), (part + 1) * width // len(units))
        if "half" in units:
            raise SchemaError(f"schema {self.schema.family!r}: 'half' cannot mix with other split units")
        sizes = [self._width(unit) // groups for unit in units]
        start = sum(sizes[:part])
        return lambda width: (start, start + sizes[part])

    def _width(self, unit: str) -> int:
        if self.head_dim is None:
            raise SchemaError(f"schema {self.schema.family!r}: split unit {unit!r} needs attention.head_dim")
        return (self.n_heads if unit == "q" else self.n_kv_heads) * self.head_dim

    def _heads_of(self, sub: str) -> int:
        return self.n_kv_heads if sub in ("attn.k", "attn.v", "attn.k_norm", "attn.k_rot") else self.n_heads

    def _missing(self, name: StandardName, why: str) -> UnknownNameError:
        from .plugins import families_with

        having = families_with(name.sub)
        where = f" Families that have it: {', '.join(having)}." if having else ""
        return UnknownNameError(f"{name}: {why}.{where}")

    def number(self, value: Number, owner: Any) -> float:
        """A schema number: the value itself, or an attribute path read from ``owner``."""
        return float(read_attribute(owner, value)) if isinstance(value, str) else float(value)

    # -- unembedding ----------------------------------------------------------------------------

    def unembed(self, normed: mx.array, softcap: bool = True) -> mx.array:
        """Logits from the final normalised residual stream, (..., D) -> (..., V), as the model
        computes them (tied or untied, quantized or not, with its scaling and, unless
        ``softcap=False``, its soft-capping)."""
        spec = self.schema.unembed
        try:
            projection = read_attribute(self.root, spec.module)
        except AttributeError:
            if spec.tied_to is None:
                raise
            projection = read_attribute(self.root, spec.tied_to).as_linear
        logits = projection(normed)
        if spec.multiply is not None:
            logits = logits * self.number(spec.multiply, self.root)
        if spec.divide is not None:
            logits = logits / self.number(spec.divide, self.root)
        if spec.softcap is not None and softcap:
            cap = self.number(spec.softcap, self.root)
            logits = mx.tanh(logits / cap) * cap
        return logits

    def final_norm(self, resid: mx.array) -> mx.array:
        return read_attribute(self.root, self.schema.final_norm)(resid)


EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


def token_embedding(module: nn.Module, paths: Sequence[str | None] = ()) -> nn.Module | None:
    """``module``'s token embedding, or None when it has none: the first of ``paths`` (an
    architecture schema's embedding and tied unembedding) that is an embedding, else the
    largest ``nn.Embedding`` / ``nn.QuantizedEmbedding`` in the module tree (a token table is
    larger than a position table)."""
    from .module_probes import walk_modules

    for path in paths:
        if not path or ":" in path or "#" in path:
            continue
        try:
            found = read_attribute(module, path)
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if isinstance(found, EMBEDDINGS):
            return found
    tables = [m for _, m in walk_modules(module) if isinstance(m, EMBEDDINGS)]
    return max(tables, key=lambda m: m.weight.shape[0]) if tables else None


def linear_input_width(module: Any) -> int | None:
    """Input width of a linear layer, quantized or not (None for anything else)."""
    if isinstance(module, nn.QuantizedLinear):
        return int(module.weight.shape[-1] * 32 // module.bits)
    if isinstance(module, nn.Linear):
        return int(module.weight.shape[-1])
    return None


def quantization_of(module: nn.Module) -> str:
    """``"4-bit, group size 64"`` (``"4/8-bit, ..."`` for mixed widths) when ``module`` has
    quantized layers, else ``"none (float32)"`` with its most common float type."""
    found = [m for _, m in module.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")]
    if found:
        bits = "/".join(str(b) for b in sorted({int(m.bits) for m in found}))
        groups = "/".join(str(g) for g in sorted({int(m.group_size) for m in found}))
        return f"{bits}-bit, group size {groups}"
    dtypes: dict[str, int] = {}
    for _, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            name = str(value.dtype).rsplit(".", 1)[-1]
            dtypes[name] = dtypes.get(name, 0) + value.size
    return f"none ({max(dtypes, key=dtypes.get)})" if dtypes else "none"


def model_type(model: nn.Module) -> str | None:
    """mlx-lm's ``model_type`` of a model ('llama', 'qwen3', ...), if it has one."""
    found = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    return found if isinstance(found, str) else None


def recognize(model: nn.Module) -> Architecture | None:
    """The architecture of ``model`` from the plugins: a schema whose ``model_types`` lists the
    model's type, else the first plugin that recognises it by code; None if none does."""
    found = find_schema(model)
    return None if found is None else Architecture(found[1], model, found[0])


def find_schema(model: nn.Module) -> tuple[str, ArchitectureSchema] | None:
    """(plugin, schema) that :func:`recognize` binds to ``model``, or None."""
    from .plugins import call_each, schemas

    kind = model_type(model)
    if kind is not None:
        claims = [(p, s) for p, s in schemas() if kind in s.model_types]
        for plugin, schema in sorted(claims, key=lambda claim: -len(claim[1].when)):
            if all(_holds(model, path, value) for path, value in schema.when.items()):
                return plugin, schema
    for plugin, schema in call_each("mlxterp_recognize", model=model):
        return plugin, schema
    return None


ATTENTION_NAMES = ("self_attn", "attn", "attention")
HEAD_COUNTS = ("n_heads", "num_heads", "num_attention_heads", "n_head")
KV_HEAD_COUNTS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")


def infer_schema(
    root: nn.Module,
    layer_attr: str | None = None,
    embedding_path: str | None = None,
    norm_path: str | None = None,
    lm_head_path: str | None = None,
) -> ArchitectureSchema:
    """A schema for a model no plugin recognises, from where its parts are: the paths given
    (upstream mlxterp's keywords, relative to the wrapped module; ``layer_attr`` is also tried
    under ``model.``), else the one module of each name ``layers`` (a list of blocks),
    ``embed_tokens``, ``norm`` (outside the blocks) and ``lm_head`` (none: tied to the
    embedding). In the blocks: the attention module (``self_attn``, ``attn`` or ``attention``,
    with a head count) and ``mlp``. SchemaError says what could not be found; the schema still
    has to pass the wrap-time validation."""
    paths = [path.removeprefix("model.") for path, _ in _walk(root)[1:]]
    layers = _layers_path(root, layer_attr, paths)
    inside = layers + "."
    embed = embedding_path or _one(paths, "embed_tokens", "the token embedding", "embedding_path")
    norm = norm_path or _one([p for p in paths if not p.startswith(inside)], "norm", "the final norm", "norm_path")
    heads = [p for p in paths if p.rsplit(".", 1)[-1] == "lm_head"]
    head = lm_head_path or (heads[0] if len(heads) == 1 else None)
    for given, what in ((embedding_path, "embedding_path"), (norm_path, "norm_path"), (lm_head_path, "lm_head_path")):
        if given is not None and given not in paths:
            raise SchemaError(f"{what}={given!r}: no module at that path" + did_you_mean(given, paths))
    if len(heads) > 1 and lm_head_path is None:
        raise SchemaError(f"modules named 'lm_head': {', '.join(heads)}; say which with lm_head_path=")
    block = read_attribute(root, layers)[0]
    found = [name for name in ATTENTION_NAMES if isinstance(block.get(name) if isinstance(block, dict) else None, nn.Module)]
    if len(found) != 1:
        raise SchemaError(f"the blocks of {layers} have {'no' if not found else 'more than one'} attention module "
                          f"named {' / '.join(ATTENTION_NAMES)}: pass schema= (docs: plugin authoring)")
    attention = block[found[0]]
    count = next((a for a in HEAD_COUNTS if isinstance(getattr(attention, a, None), int)), None)
    if count is None:
        raise SchemaError(f"{layers}.0.{found[0]} has no head count ({' / '.join(HEAD_COUNTS)}): pass schema=")
    kv = next((a for a in KV_HEAD_COUNTS if isinstance(getattr(attention, a, None), int)), None)
    ports = {"attn": Port(found[0])}
    if isinstance(block.get("mlp"), nn.Module):
        ports["mlp"] = Port("mlp")
    return ArchitectureSchema(
        family="inferred",
        layers=layers,
        embed=f"{layers}.0:input",  # the residual stream entering block 0, whatever came before
        final_norm=norm,
        unembed=Unembed(module=head or "lm_head", tied_to=None if head else embed),
        attention=Attention(module=found[0], n_heads=count, n_kv_heads=kv,
                            head_dim="head_dim" if isinstance(getattr(attention, "head_dim", None), int) else None,
                            pattern=False),
        block=ports,
        description=f"inferred from the module names of a {type(root).__name__}",
    )


def _walk(root: nn.Module) -> list[tuple[str, nn.Module]]:
    from .module_probes import walk_modules

    return walk_modules(root)


def _layers_path(root: nn.Module, layer_attr: str | None, paths: list[str]) -> str:
    """The path of the model's list of blocks: ``layer_attr`` or ``model.<layer_attr>``, else
    the one list of modules named ``layers``."""
    if layer_attr is None:
        found = sorted({p.rsplit(".", 1)[0] for p in paths if re.search(r"(^|\.)layers\.0$", p)})
        found = [p for p in found if not any(p.startswith(outer + ".") for outer in found)]  # not inside blocks
        if len(found) != 1:
            where = "none" if not found else ", ".join(found)
            raise SchemaError(f"lists of blocks named 'layers': {where}; say which with layer_attr=")
        return found[0]
    for path in (layer_attr, f"model.{layer_attr}"):
        try:
            found = read_attribute(root, path)
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if isinstance(found, (list, tuple)) and found and all(isinstance(m, nn.Module) for m in found):
            return path
    raise SchemaError(f"layer_attr={layer_attr!r}: no list of modules at {layer_attr!r} or 'model.{layer_attr}'")


def _one(paths: list[str], name: str, what: str, keyword: str) -> str:
    found = [p for p in paths if p.rsplit(".", 1)[-1] == name]
    if len(found) != 1:
        where = "none" if not found else ", ".join(found)
        raise SchemaError(f"{what}: modules named {name!r}: {where}; say which with {keyword}=")
    return found[0]


def _holds(model: nn.Module, path: str, value: Any) -> bool:
    try:
        return read_attribute(model, path) == value
    except (AttributeError, KeyError, IndexError):
        return False


def _then(outer: View | None, inner: View) -> View:
    return inner if outer is None else outer.then(inner)


__all__ = ["Architecture", "Resolved", "View", "infer_schema", "read_attribute"]
