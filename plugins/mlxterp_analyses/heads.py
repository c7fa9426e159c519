"""Head-level views: one layer's attention patterns, with the prompt's tokens on both axes."""

from __future__ import annotations

from .results import AttentionPatterns
from .text import ids_text, token_ids, token_text


def attention_patterns(model, text, layer: int, heads: list[int] | None = None) -> AttentionPatterns:
    """The attention probabilities of ``layer``'s heads (default all) on ``text``."""
    arch = model.architecture_or_raise("attention patterns")
    ids = token_ids(model, text)
    heads = list(range(arch.n_heads)) if heads is None else [int(h) for h in heads]
    name = f"layers.{layer}.attn.pattern"
    pattern = model.run([ids], capture=[name]).activations[name][0]  # (H, T, T)
    return AttentionPatterns(
        text=ids_text(model, ids),
        tokens=[token_text(model, t) for t in ids],
        layer=layer,
        heads=heads,
        patterns=pattern[heads].tolist(),
    )
