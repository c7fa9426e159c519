"""``mlxterp demo``: the default real model, traced, read by standard names, and intervened on."""

from __future__ import annotations

import mlx.core as mx

PROMPT = "The capital of France is"


def main() -> None:
    from .interventions import zero_out
    from .load import DEFAULT_MODEL, load

    print(f"loading {DEFAULT_MODEL} ...")
    model = load()
    for key in ("quantization", "weights", "backend"):
        print(f"  {key}: {model.load_report[key]}")
    arch = model.architecture
    print(f"  family {arch.family}: {arch.n_layers} layers, {arch.n_heads} heads ({arch.n_kv_heads} key/value)")

    ids = model.encode(PROMPT)
    paris = model.encode(" Paris")[0]
    with model.trace(PROMPT, capture=["layers[*].output", "layers[20].attn.pattern", "logits"]) as tr:
        logits = model.output.save()
    probs = mx.softmax(logits[0, -1].astype(mx.float32))
    top = mx.argsort(-probs)[:5].tolist()
    print(f"\n{PROMPT!r} -> " + ", ".join(f"{model.token_to_str(t)!r} {probs[t].item():.2f}" for t in top))
    resid = tr.activations["layers[*].output"]  # (L, B, T, D): the residual stream after every layer
    print(f"residual stream, all layers: {tuple(resid.shape)}; norm at the last position by layer:")
    print("  " + " ".join(f"{v:.0f}" for v in mx.linalg.norm(resid[:, 0, -1], axis=-1).tolist()))
    pattern = tr.activations["layers[20].attn.pattern"][0, :, -1]  # (H, T): where the last token looks
    tokens = [model.token_to_str(t) for t in ids]
    print("layer 20, last position, attention of each head to each token:")
    for head in range(pattern.shape[0]):
        print(f"  head {head}: " + " ".join(f"{tok!r}:{w:.2f}" for tok, w in zip(tokens, pattern[head].tolist())))

    group = max(1, arch.n_layers // 4)
    print(f"\nknocking out the MLPs of {group} layers at a time at the last position (probability of ' Paris'):")
    for start in range(0, arch.n_layers, group):
        layers = range(start, min(start + group, arch.n_layers))
        edits = {f"layers[{i}].mlp": zero_out.at(positions=-1) for i in layers}
        edited = model.run(PROMPT, interventions=edits, capture=["logits"]).output
        p = mx.softmax(edited[0, -1].astype(mx.float32))[paris].item()
        print(f"  layers {layers.start:2d}-{layers.stop - 1:2d}: {p:.3f} (clean {probs[paris].item():.3f})")
