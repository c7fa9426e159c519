"""Architecture schemas: where each standard name lives in one model family.

A schema is data. It maps the standard names of one transformer block (``attn.q``, ``mlp``,
``resid_mid`` ...) to raw sites relative to the block, and says where the model-level pieces
are (layers, embedding, final norm, unembedding) and which facts the analyses need (head
counts, logit scaling and soft-capping). cattrs turns a schema into plain data (for JSON or
TOML) and back, so a family that differs from another only in names needs no code::

    family = "qwen2"
    model_types = ["qwen2"]
    [block]
    ln1 = "input_layernorm"
    "attn.q" = "self_attn.q_proj"
    ...

Raw sites use the trace's grammar (``module.path``, ``#k`` for the k-th call, ``:input`` for a
module's input). Attribute references (``"residual_multiplier"``, ``"args.logit_scale"``) are
dotted attribute paths read from the block (for ports) or the model root (for the unembedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import attrs
import cattrs
import cattrs.v

from .errors import MlxterpError

Number = Union[float, str, None]  # a number, or an attribute path to read it from

BLOCK_NAMES = {
    "ln1": "normalised input of attention",
    "ln2": "normalised input of the MLP",
    "attn": "attention output written to the residual stream",
    "resid_mid": "residual stream between attention and MLP",
    "mlp": "MLP output written to the residual stream",
    "attn.q": "query projection (B, T, H*D)",
    "attn.k": "key projection (B, T, Hkv*D)",
    "attn.v": "value projection (B, T, Hkv*D)",
    "attn.q_norm": "queries after the per-head query norm (B, H, T, D)",
    "attn.k_norm": "keys after the per-head key norm (B, Hkv, T, D)",
    "attn.q_rot": "queries after the positional rotation (B, H, T, D)",
    "attn.k_rot": "keys after the positional rotation (B, Hkv, T, D)",
    "attn.z": "per-head attention mix before the output projection (B, T, H*D)",
    "mlp.gate": "gate projection, before the activation",
    "mlp.up": "up projection (the linear input of a gated MLP; the input projection otherwise)",
    "mlp.act": "input of the down projection (after activation and gating)",
    "mlp.down": "down projection output",
    "mlp.router": "router logits over experts (mixture-of-experts MLPs)",
}
"""Standard names a schema may map inside a block, with what each means."""

SPLIT_UNITS = ("q", "kv", "half")
"""Chunk sizes of a fused projection: n_heads*head_dim, n_kv_heads*head_dim, half the axis."""


class SchemaError(MlxterpError):
    """A schema that is malformed, or that does not fit the model it was applied to."""


def _check_site(_instance, attribute, value: str) -> None:
    if not value or " " in value:
        raise SchemaError(f"{attribute.name}: {value!r} is not a raw site name")


@attrs.frozen
class Port:
    """Where one standard tensor is: a raw site relative to the block.

    ``split``/``part``: the raw last axis is a concatenation of chunks (a fused qkv or gate_up
    projection) and the standard tensor is chunk ``part``. ``scale``: the standard tensor is
    the raw one times this (Granite's residual multiplier). ``layout``: for per-head standard
    names, which are (B, H, T, D), how the raw tensor is laid out: ``"bthd"`` (B, T, H, D) as
    Qwen3's q/k norms, or ``"flat"`` (B, T, H*D) as OLMo 2's. ``optional``: the module exists
    only in some layers or configurations (a MoE model's dense layers, Command R+'s q/k norms);
    where it is missing, the name is missing for that layer instead of the schema failing.
    ``grouped``: see below.
    """

    site: str = attrs.field(validator=_check_site)
    split: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    part: int = 0
    scale: Number = None
    layout: str = attrs.field(default="", validator=attrs.validators.in_(("", "bthd", "flat")))
    optional: bool = False
    grouped: bool = False
    """The split chunks repeat once per KV head: the fused axis is (Hkv, [q..., k, v]) as in
    InternLM2's ``wqkv``, not ([q...], [k...], [v...])."""

    @split.validator
    def _check_split(self, attribute, value):
        unknown = [u for u in value if u not in SPLIT_UNITS]
        if unknown:
            raise SchemaError(f"split units {unknown} unknown; use {SPLIT_UNITS}")
        if value and not 0 <= self.part < len(value):
            raise SchemaError(f"part={self.part} outside split {value}")


@attrs.frozen
class Attention:
    """Facts about the attention module of a block, read from its attributes."""

    module: str = "self_attn"
    n_heads: str = "n_heads"
    n_kv_heads: str | None = "n_kv_heads"  # None: same as n_heads
    head_dim: str | None = "head_dim"  # None: query width / n_heads
    pattern: bool = True
    """Whether attention probabilities can be observed (see ``mlxterp_core.attention``)."""


@attrs.frozen
class Unembed:
    """How the final normalised residual stream becomes logits.

    ``module`` is the output projection; when the model has none (tied embeddings) the
    embedding ``tied_to`` is used through its ``as_linear``. Then logits are multiplied by
    ``multiply``, divided by ``divide`` and soft-capped at ``softcap`` (``c * tanh(x / c)``),
    each where set.
    """

    module: str = "lm_head"
    tied_to: str | None = "model.embed_tokens"
    multiply: Number = None
    divide: Number = None
    softcap: Number = None


@attrs.frozen
class ArchitectureSchema:
    """The standard names of one model family. See the module docstring."""

    family: str
    model_types: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: Unembed = Unembed()
    attention: Attention = Attention()
    parallel: bool = False
    """Attention and MLP both read the block input and add to it (no resid_mid)."""
    block: dict[str, Port] = attrs.field(factory=dict)
    description: str = ""
    when: dict[str, Any] = attrs.field(factory=dict)
    """Conditions on the model (attribute path -> value, e.g. ``"args.use_parallel_residual" =
    true``): a schema claims a model of its model_types only where all hold. Among schemas for
    one model_type, those with more conditions are tried first."""

    @block.validator
    def _check_block(self, attribute, value):
        unknown = sorted(set(value) - set(BLOCK_NAMES))
        if unknown:
            raise SchemaError(
                f"schema {self.family!r}: unknown block names {unknown}; "
                f"known: {', '.join(BLOCK_NAMES)}"
            )
        if self.parallel and "resid_mid" in value:
            raise SchemaError(f"schema {self.family!r}: a parallel block has no resid_mid")

    def to_data(self) -> dict[str, Any]:
        """Plain data (dicts, lists, strings, numbers) for JSON or TOML."""
        return converter.unstructure(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ArchitectureSchema:
        try:
            return converter.structure(data, cls)
        except SchemaError:
            raise
        except Exception as e:  # cattrs' grouped errors: flatten into one readable message
            details = (
                "; ".join(cattrs.transform_error(e, format_exception=_describe))
                if isinstance(e, cattrs.BaseValidationError)
                else str(e)
            )
            raise SchemaError(f"invalid schema data: {details}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> ArchitectureSchema:
        """Load a schema from a ``.toml`` or ``.json`` file."""
        from .files import read_json, read_toml

        path = Path(path)
        expected = "an architecture schema (docs: plugin authoring)"
        if path.suffix == ".toml":
            data = read_toml(path, expected)
        elif path.suffix == ".json":
            data = read_json(path, expected)
        else:
            raise SchemaError(f"{path}: a schema file is .toml or .json")
        try:
            return cls.from_data(data)
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from e


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, SchemaError):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _structure_number(value: Any, _type) -> Number:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise SchemaError(f"{value!r} is neither a number nor an attribute path")


converter = cattrs.Converter(
    omit_if_default=True,
    forbid_extra_keys=True,
    unstruct_collection_overrides={tuple: list},
)
converter.register_structure_hook(Number, _structure_number)
# In data files a port is usually just its site: "attn.q" = "self_attn.q_proj".
converter.register_structure_hook(
    Port, lambda value, _: Port(value) if isinstance(value, str) else Port(**value)
)
converter.register_unstructure_hook(
    Port,
    lambda port: port.site
    if port == Port(port.site)
    else {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in attrs.asdict(port).items()
        if v != attrs.fields_dict(Port)[k].default
    },
)
