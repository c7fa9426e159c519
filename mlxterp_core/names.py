"""The grammar of standard names, and the aliases other libraries use for them.

Standard names, one grammar (brackets and dots are interchangeable for the layer index)::

    embed                       residual stream entering layer 0
    layers[i].input             residual stream entering block i (resid_pre)
    layers[i].ln1 / .ln2        normalised inputs of attention / MLP
    layers[i].attn.q / .k / .v  projections, (B, T, H*D)
    layers[i].attn.q_heads ...  per-head views of q, k, v, z, (B, H, T, D)
    layers[i].attn.q_rot / .k_rot   after the positional rotation, (B, H, T, D)
    layers[i].attn.pattern      attention probabilities (B, H, T, S), opt-in
    layers[i].attn.z            per-head mix before the output projection, (B, T, H*D)
    layers[i].attn              attention output written to the residual stream
    layers[i].resid_mid         residual stream between attention and MLP
    layers[i].mlp.gate / .up / .act / .down / .router
    layers[i].mlp               MLP output written to the residual stream
    layers[i] / layers[i].output    residual stream leaving block i (resid_post)
    ln_final                    final norm output
    logits                      model output

``layers[*]`` (or ``layers.*``) stands for every layer in ``capture=`` and ``interventions=``;
``layers[-1]`` (``layers.-1``) is the last layer, negative indices counting from the end.

Aliases: TransformerLens hook names (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_z``,
... in TransformerLens's own layouts: (B, T, H, D) for q/k/v/z) and nnterp-style accessors
(``layers_output[3]``, ``attentions_output[3]`` ...) resolve to the same tensors.
"""

from __future__ import annotations

import re

import attrs

from .errors import UnknownNameError
from .schema import BLOCK_NAMES

HEAD_VIEWS = {"attn.q_heads": "attn.q", "attn.k_heads": "attn.k", "attn.v_heads": "attn.v", "attn.z_heads": "attn.z"}
DERIVED_BLOCK_NAMES = {
    "input": "residual stream entering the block (resid_pre)",
    "output": "residual stream leaving the block (resid_post)",
    "attn.pattern": "attention probabilities (B, H, T, S), opt-in",
    **{view: f"per-head view of {base}, (B, H, T, D)" for view, base in HEAD_VIEWS.items()},
}
MODEL_NAMES = {
    "embed": "residual stream entering layer 0 (token embeddings after any scaling)",
    "ln_final": "final norm output",
    "logits": "model output",
}

FORWARD_ORDER = (
    "input", "ln1", "attn.q", "attn.k", "attn.v", "attn.q_heads", "attn.k_heads", "attn.v_heads",
    "attn.q_norm", "attn.k_norm", "attn.q_rot", "attn.k_rot", "attn.pattern", "attn.z", "attn.z_heads",
    "attn", "resid_mid", "ln2", "mlp.router", "mlp.gate", "mlp.up", "mlp.act", "mlp.down", "mlp", "output",
)
"""Every block-level standard name, in the order the forward pass computes them."""

GRAMMAR = (
    "standard names are 'embed', 'ln_final', 'logits', or 'layers[i]' followed by one of "
    "'.input', '.output', '.ln1', '.ln2', '.attn', '.attn.q' (k, v, z, q_heads, q_rot, pattern "
    "...), '.resid_mid', '.mlp', '.mlp.gate' (up, act, down, router); 'layers.i' works too, "
    "'layers[*]' means every layer and 'layers[-1]' the last"
)

# TransformerLens names: (our sub-name, layout). Layout 'bthd' is TransformerLens's (B, T, H, D).
_TL_BLOCK = {
    "hook_resid_pre": ("input", None),
    "hook_resid_mid": ("resid_mid", None),
    "hook_resid_post": ("output", None),
    "hook_attn_out": ("attn", None),
    "hook_mlp_out": ("mlp", None),
    "ln1.hook_normalized": ("ln1", None),
    "ln2.hook_normalized": ("ln2", None),
    "attn.hook_q": ("attn.q", "bthd"),
    "attn.hook_k": ("attn.k", "bthd"),
    "attn.hook_v": ("attn.v", "bthd"),
    "attn.hook_z": ("attn.z", "bthd"),
    "attn.hook_rot_q": ("attn.q_rot", "bthd"),
    "attn.hook_rot_k": ("attn.k_rot", "bthd"),
    "attn.hook_pattern": ("attn.pattern", None),
    "mlp.hook_pre": ("mlp.gate|mlp.up", None),  # the gate where the MLP is gated
    "mlp.hook_pre_linear": ("mlp.up", None),
    "mlp.hook_post": ("mlp.act", None),
    "mlp.hook_in": ("ln2", None),  # circuit-tracer's transcoder input (= ln2.hook_normalized)
}
_TL_MODEL = {"hook_embed": "embed", "ln_final.hook_normalized": "ln_final"}
_NNTERP = {
    "layers_input": "input",
    "layers_output": "output",
    "attentions_output": "attn",
    "mlps_output": "mlp",
    "attention_probabilities": "attn.pattern",
}

_LAYER = re.compile(r"^layers\.(-?\d+|\*)(?:\.(.+))?$")


@attrs.frozen
class StandardName:
    """A parsed standard name: ``layer`` is an int, ``'*'`` (every layer) or None (model-level)."""

    sub: str  # 'output', 'attn.q_heads', ... or a model-level name ('embed', 'logits', ...)
    layer: int | str | None = None
    layout: str | None = None  # 'bthd' for TransformerLens's per-head layout

    def __str__(self) -> str:
        return self.sub if self.layer is None else f"layers.{self.layer}.{self.sub}"


def is_raw(name: str) -> bool:
    return name == "__model_output__" or name.startswith("model.") or name.startswith("model:")


def parse(name: str) -> StandardName:
    """Parse a standard name or alias; raise UnknownNameError explaining the grammar."""
    dotted = re.sub(r"\[(-?\d+|\*)\]", r".\1", name.strip())
    if dotted in MODEL_NAMES:
        return StandardName(dotted)
    if dotted in _TL_MODEL:
        return StandardName(_TL_MODEL[dotted])
    accessor = re.match(r"^(\w+)\.(-?\d+|\*)$", dotted)
    if accessor and accessor.group(1) in _NNTERP:
        return StandardName(_NNTERP[accessor.group(1)], _layer(accessor.group(2)))
    tl = re.match(r"^blocks\.(-?\d+|\*)\.(.+)$", dotted)
    if tl and tl.group(2) in _TL_BLOCK:
        sub, layout = _TL_BLOCK[tl.group(2)]
        return StandardName(sub, _layer(tl.group(1)), layout)
    match = _LAYER.match(dotted)
    if match:
        sub = match.group(2) or "output"
        if sub in BLOCK_NAMES or sub in DERIVED_BLOCK_NAMES:
            return StandardName(sub, _layer(match.group(1)))
        raise UnknownNameError(
            f"{name!r}: '{sub}' is not a standard block name. Block names: "
            + ", ".join(sorted({*BLOCK_NAMES, *DERIVED_BLOCK_NAMES}))
            + "."
        )
    raise UnknownNameError(f"{name!r} is not a name mlxterp understands: {GRAMMAR}; raw names start with 'model.'.")


_TL_SHORT = {"attn": "pattern", "key": "k", "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post"}
_TL_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "pattern", "result", "attn_scores"}
_TL_MLP = {"pre", "post", "mid", "pre_linear"}
_TL_LAYER_TYPE = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}


def transformerlens_key(key: tuple) -> str:
    """The hook name a TransformerLens ``ActivationCache`` key stands for, as its
    ``utils.get_act_name`` spells it: ``("resid_post", 5)`` -> ``blocks.5.hook_resid_post``,
    ``("pattern", 5)`` -> ``blocks.5.attn.hook_pattern``, ``("normalized", 3, "ln2")`` ->
    ``blocks.3.ln2.hook_normalized``, ``("embed",)`` -> ``hook_embed``; negative layers count from
    the end as everywhere."""
    if not key or not isinstance(key[0], str) or len(key) > 3:
        raise UnknownNameError(f"{key!r} is not a TransformerLens cache key: use (name, layer) or (name, layer, layer_type).")
    name = _TL_SHORT.get(key[0], key[0])
    layer = key[1] if len(key) > 1 else None
    layer_type = key[2] if len(key) > 2 else None
    if layer is not None and not isinstance(layer, int):
        raise UnknownNameError(f"{key!r}: the layer of a TransformerLens key is an int, got {layer!r}.")
    parts = [] if layer is None else [f"blocks.{layer}"]
    if name in _TL_ATTN:
        layer_type = "attn"
    elif name in _TL_MLP:
        layer_type = "mlp"
    else:
        layer_type = _TL_LAYER_TYPE.get(layer_type, layer_type)
    if layer_type:
        parts.append(layer_type)
    parts.append(f"hook_{name}")
    hook = ".".join(parts)
    return f"ln_final.{hook}" if name in ("scale", "normalized") and layer is None else hook


def transformerlens_name(name: str) -> str | None:
    """The TransformerLens hook name of a standard name (``layers.8.output`` ->
    ``blocks.8.hook_resid_post``), or None where TransformerLens has none."""
    parsed = parse(name)
    if parsed.layer is None:
        return {v: k for k, v in _TL_MODEL.items()}.get(parsed.sub)
    exact = [hook for hook, (sub, _) in _TL_BLOCK.items() if sub == parsed.sub and hook != "mlp.hook_in"]
    either = [hook for hook, (sub, _) in _TL_BLOCK.items() if parsed.sub in sub.split("|")]
    found = exact or either
    return f"blocks.{parsed.layer}.{found[0]}" if found else None


def _layer(text: str) -> int | str:
    return text if text == "*" else int(text)
