"""Head-level views: one layer's attention patterns, with the prompt's tokens on both axes."""

from __future__ import annotations

import mlx.core as mx

from mlxterp.plugin import options

from .results import AttentionLayers, AttentionPatterns
from mlxterp.plugin import ids_text, token_ids, token_text


def attention_patterns(model, text, layer, heads: list[int] | None = None) -> AttentionPatterns | AttentionLayers:
    """The attention probabilities of ``layer``'s heads (default all) on ``text``: an
    AttentionPatterns for one layer; for a list of layers (or ``"all"``) an AttentionLayers,
    from the same single forward pass."""
    arch = model.architecture_or_raise("attention patterns")
    ids = token_ids(model, text)
    heads = list(range(arch.n_heads)) if heads is None else options.indices(heads, arch.n_heads, "heads", "head")
    several = isinstance(layer, (str, list, tuple, range))
    if isinstance(layer, str):
        layers = list(range(arch.n_layers)) if options.choice(layer, ("all",), "layer") else []
    else:
        layers = options.layers(list(layer), arch.n_layers, "layer") if several else [options.layer(layer, arch.n_layers)]
    names = [f"layers.{i}.attn.pattern" for i in layers]
    acts = model.run([ids], capture=names).activations
    patterns = mx.stack([acts[name][0][mx.array(heads)] for name in names])  # (L, H, T, T)
    text, tokens = ids_text(model, ids), [token_text(model, t) for t in ids]
    if several:
        return AttentionLayers(text=text, tokens=tokens, layers=layers, heads=heads, patterns=patterns.tolist())
    return AttentionPatterns(text=text, tokens=tokens, layer=layers[0], heads=heads, patterns=patterns[0].tolist())
