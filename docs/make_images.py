"""Regenerate the figures of the user guide (docs/images/*.png) on the default model.

    python docs/make_images.py

The PNGs are committed; rerun this after changing an analysis or its plot.
"""

from __future__ import annotations

from pathlib import Path

import mlxterp

IMAGES = Path(__file__).resolve().parent / "images"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    model = mlxterp.load()
    model.logit_lens("The capital of France is").plot(IMAGES / "logit_lens.png")
    model.activation_patching(CLEAN, CORRUPTED, component="mlp").plot(IMAGES / "patching_mlp.png")
    model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all").plot(IMAGES / "patching_resid_positions.png")
    model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True).plot(IMAGES / "patching_heads.png")
    model.attribution_patching(CLEAN, CORRUPTED).plot("resid", IMAGES / "attribution_resid.png")
    model.direct_logit_attribution("The capital of France is", answers=(" Paris", " London")).plot(IMAGES / "dla.png")
    model.attention_patterns(CLEAN, layer=23, heads=[3, 4, 5]).plot(IMAGES / "attention_layer23.png")
    positive = ["I love this. It is wonderful and amazing.", "This is great, I am so happy.", "What a fantastic, delightful day."]
    negative = ["I hate this. It is terrible and awful.", "This is bad, I am so sad.", "What a horrible, miserable day."]
    model.steering_vector(positive, negative, layer=14).plot(IMAGES / "steering_projections.png")
    for path in sorted(IMAGES.glob("*.png")):
        print(f"{path.name}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
