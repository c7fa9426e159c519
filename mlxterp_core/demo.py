"""``mlxterp demo``: trace a model, read activations by name, intervene, and show the effect."""

from __future__ import annotations

import mlx.core as mx


def main() -> None:
    from .bench import random_llama
    from .interventions import scale, zero_out
    from .model import InterpretableModel

    module = random_llama(num_hidden_layers=4, vocab_size=512)
    model = InterpretableModel(module)
    ids = mx.arange(1, 9)[None]
    print(f"model: random-weight mlx-lm Llama, 4 layers, d=576; input: {ids.tolist()}")

    with model.trace(ids) as tr:
        logits = model.output.save()
    print(f"recorded {len(tr.activations)} activations, e.g.")
    for name in ("model.model.layers.1.self_attn.q_proj", "model.model.layers.1.self_attn.rope#1",
                 "model.model.layers.1.self_attn.o_proj:input", "model.model.layers.3"):
        print(f"  {name:45s} {tuple(tr.activations[name].shape)}")

    site = "model.model.layers.2.mlp"
    edits = {"zero_out": zero_out, "scale(0.5) at position 3": scale(0.5).at(positions=3)}
    for label, edit in edits.items():
        changed = model.run(ids, interventions={site: edit}, capture=[site, "model.model.layers.3"])
        resid = changed.activations["model.model.layers.3"]
        moved = mx.abs(resid - tr.activations["model.model.layers.3"]).max(axis=-1)[0]
        print(f"{label} at {site}: max change of the last residual stream per position")
        print("  " + " ".join(f"{v:.3f}" for v in moved.tolist()))
    print(f"logits: {tuple(logits.shape)}, unchanged by probing: "
          f"{bool(mx.array_equal(logits, module(ids)).item())}")
