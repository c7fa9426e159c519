"""Regenerate the figures of the user guide (docs/images/*.png) on the default model.

    python docs/make_images.py          # the matplotlib figures and the HTML views' screenshots
    python docs/make_images.py views    # only the screenshots (headless Chromium, via playwright)
    python docs/make_images.py graph FOLDER   # the attribution graph of docs/guide/attribution_graphs.md,
                                              # with the transcoders in FOLDER (e.g. the CLT that
                                              # python -m mlxterp_tools.transcoder_training --save writes)

The PNGs are committed; rerun this after changing an analysis, its plot or its view.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlxterp

IMAGES = Path(__file__).resolve().parent / "images"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def view_screenshots(model) -> None:
    """Each HTML view as the browser shows it, after a hover (docs/guide/views.md)."""
    from playwright.sync_api import sync_playwright

    from mlxterp_core.views import token_heatmap_html, write_html

    sentiment = model.steering_vector(["I love this. It is wonderful."], ["I hate this. It is awful."], layer=14)
    text = "What a wonderful day, but the food was awful."
    acts = model.run(text, capture=["layers.14.output"]).activations["layers.14.output"][0]  # (T, D)
    tokens = [model.token_to_str(t) for t in model.encode(text)]
    views = {  # name: (result or fragment, what to hover)
        "view_attention": (model.attention_patterns(CLEAN, layer="all"), ".mv-tokens .mv-tok:last-child"),
        "view_lens": (model.logit_lens("The capital of France is"), "table.mv-grid tr:nth-child(8) td:last-child"),
        "view_patching": (model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all"),
                          "table.mv-grid tr:nth-child(7) td:last-child"),
        "view_tokens": (token_heatmap_html(tokens, (acts @ sentiment.array / sentiment.norm).tolist(),
                                           labels=["projection on the sentiment direction (layer 14)"],
                                           title=f"Values over tokens: {text}"), ".mv-tok:nth-child(4)"),
    }
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 400}, device_scale_factor=1)
        for name, (view, hover) in views.items():
            path = Path(folder) / f"{name}.html"
            view.to_html(path) if hasattr(view, "to_html") else write_html(path, view)
            page.goto(path.as_uri())
            page.hover(hover)
            if name == "view_attention":
                page.select_option("select", "23")
                page.click(".mv-thumb:nth-child(5)")  # head 4
                page.hover(hover)
            page.locator(".mlxterp-view").first.screenshot(path=str(IMAGES / f"{name}.png"))
        browser.close()


def attribution_graph_image(model, folder: str) -> None:
    """The pruned attribution graph of "The capital of France is" with the transcoders in
    ``folder``, its features described, hovering the most influential feature."""
    from playwright.sync_api import sync_playwright

    tc = mlxterp.load_transcoders(folder, model=model)
    graph = model.attribution_graph("The capital of France is", tc, max_feature_nodes=2048, progress=False)
    graph.describe_features(model, tc, progress=False)
    print(graph, graph.scores(), graph.prune(), sep="\n")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        path = graph.to_html(Path(tmp) / "graph.html")
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
        page.goto(path.as_uri())
        pruned = graph.prune()
        features = [i for i, keep in enumerate(pruned.node_mask[: graph.n_selected]) if keep]
        top = min(features, key=lambda i: pruned.cumulative_scores[i])
        page.locator(".mv-graph-node").nth(features.index(top)).click()
        page.locator(".mlxterp-view").first.screenshot(path=str(IMAGES / "attribution_graph.png"))
        browser.close()
    from PIL import Image

    Image.open(IMAGES / "attribution_graph.png").quantize(colors=96).save(IMAGES / "attribution_graph.png", optimize=True)


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    model = mlxterp.load()
    if sys.argv[1:] == ["views"]:
        view_screenshots(model)
        return
    if sys.argv[1:2] == ["graph"]:
        attribution_graph_image(model, sys.argv[2])
        return
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
    view_screenshots(model)
    model.head_scores("induction", error_measure="stripe").plot(IMAGES / "induction_heads.png")
    sentiment_probe(model).plot(IMAGES / "sentiment_probe.png")
    for path in sorted(IMAGES.glob("*.png")):
        print(f"{path.name}: {path.stat().st_size // 1024} KiB")


def sentiment_probe(model):
    """The sentiment probe sweep of tests/test_linear_probes.py (120 statements, 6 templates)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_linear_probes import sentiment_statements

    texts, labels, groups = sentiment_statements()
    return model.probe(texts, labels, groups=groups)


if __name__ == "__main__":
    main()
