"""``mlxterp demo``: the standard analyses on the default real model, with plots.

1. the logit lens of "The capital of France is" (where " Paris" appears),
2. activation patching of "The Eiffel Tower is located in the city of" against the same sentence
   about the Colosseum (equal token counts): per layer for the MLP and attention outputs, and
   per layer x position for the residual stream,
3. a steering vector from contrastive sentiment prompts, and a steered against an unsteered
   greedy continuation,
4. the top induction heads (stripe score on repeated random tokens), and what ablating them does.

The plots are written as PNG files to a folder the demo names at the end. Each step prints as it
finishes (also when the output goes to a file or a pipe). A tuned lens is not in the demo: one
worth showing takes minutes of training (docs/guide/tuned_lens.md), and a few steps of it
predict noise.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlxterp.plugin import DEFAULT_MODEL, load

from .harness import line_by_line

LENS_PROMPT = "The capital of France is"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
POSITIVE = [
    "I love this. It is wonderful and amazing.",
    "This is great, I am so happy.",
    "What a fantastic, delightful day.",
]
NEGATIVE = [
    "I hate this. It is terrible and awful.",
    "This is bad, I am so sad.",
    "What a horrible, miserable day.",
]
STEER_PROMPT = "I went to see the new movie yesterday. I thought it was"
STEER_LAYER = 14
STEER_SCALE = 1.5


def main(out: str | Path = "mlxterp-demo") -> Path:
    started = time.perf_counter()
    line_by_line()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"loading {DEFAULT_MODEL} ...")
    model = load()
    for key in ("quantization", "weights", "backend"):
        print(f"  {key}: {model.load_report[key]}")
    arch = model.architecture
    print(f"  family {arch.family}: {arch.n_layers} layers, {arch.n_heads} heads ({arch.n_kv_heads} key/value)")

    print(f"\n1. Logit lens of {LENS_PROMPT!r}: top prediction at the last position after each layer")
    lens = model.logit_lens(LENS_PROMPT, plot=True, save_path=out / "logit_lens.png")
    for layer in lens.layers:
        token, prob = lens[layer][-1][0][2], lens[layer][-1][0][1]
        print(f"  layer {layer:2d}: {token!r:12s} {prob:.2f}")


    print(f"\n2. Activation patching: clean {CLEAN!r}\n   corrupted {CORRUPTED!r}")
    for component in ("mlp", "attn"):
        result = model.activation_patching(CLEAN, CORRUPTED, component=component, plot=True,
                                           save_path=out / f"patching_{component}.png")
        best = ", ".join(f"layer {layer} {value:.0f}%" for layer, _, value in result.top(4))
        print(f"  {component}: answers {result.clean_answer!r} vs {result.corrupted_answer!r}; most recovery: {best}")
    grid = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", plot=True,
                                     save_path=out / "patching_resid_positions.png")
    print("  residual stream, layer x position (recovery %, where the clean information lives):")
    print("        " + "".join(f"{label[:7]:>8s}" for label in grid.labels))
    for layer in grid.layers[::3]:
        print(f"  {layer:4d}  " + "".join(f"{v:8.0f}" for v in grid[layer]))

    print(f"\n3. Steering at layer {STEER_LAYER}: positive minus negative sentiment prompts")
    vector = model.steering_vector(POSITIVE, NEGATIVE, layer=STEER_LAYER)
    vector.plot(out / "steering_projections.png")
    plain = model.generate(STEER_PROMPT, max_tokens=30)
    print(f"  prompt:     {STEER_PROMPT!r}")
    print(f"  unsteered: {plain.text!r}")
    for sign, label in ((1, "positive"), (-1, "negative")):
        steered = model.generate(STEER_PROMPT, max_tokens=30, interventions=vector.interventions(scale=sign * STEER_SCALE))
        print(f"  {label} x{STEER_SCALE}: {steered.text!r}")

    print("\n4. Induction heads: attention on the token after the earlier copy, in repeated random tokens")
    heads = model.head_scores("induction", error_measure="stripe", plot=True, save_path=out / "induction_heads.png")
    print("  top 5 (layer, head, stripe score): " + ", ".join(f"L{layer}H{head} {score:.2f}" for layer, head, score in heads.top(5)))
    clean = model.induction_loss(seed=1)
    ablated = model.induction_loss([(layer, head) for layer, head, _ in heads.top(5)], seed=1)
    print(f"  loss on the repeats {clean.second_half:.2f} -> {ablated.second_half:.2f} nats with the top 5 ablated "
          f"(first copy {clean.first_half:.2f} -> {ablated.first_half:.2f})")

    print(f"\nplots written to {out.resolve()}/: " + ", ".join(sorted(p.name for p in out.glob("*.png"))))
    print(f"({time.perf_counter() - started:.0f} s)")
    return out
