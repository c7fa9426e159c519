"""The HTML views in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
playwright's Python package) opens each file offline, the test reads the rendered DOM (every
token is there as text, hovering shows the numbers the result holds) and takes a screenshot.

Screenshots go to the test's temporary folder, and also to $MLXTERP_SCREENSHOTS when set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
from helpers import tiny_llama

from mlxterp import InterpretableModel
from mlxterp_core import views

CHROMIUM = Path(os.environ.get("MLXTERP_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
HOSTILE = "</script><b>bold</b>"
CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does), or set MLXTERP_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        # playwright runs it headless with a fresh, empty profile folder
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_view(browser, tmp_path):
    """Write a fragment as a page, open it offline; returns the page. Fails on any script
    error and on any request that leaves the file."""
    pages = []

    def open_(fragment: str, name: str):
        path = views.write_html(tmp_path / f"{name}.html", fragment, name)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        page.wait_for_selector(".mlxterp-view[data-rendered='1']")
        page.errors, page.requests, page.shot_name = errors, requests, name
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.screenshot(path=str(tmp_path / f"{page.shot_name}.png"), full_page=True)
        if os.environ.get("MLXTERP_SCREENSHOTS"):
            Path(os.environ["MLXTERP_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / f"{page.shot_name}.png", os.environ["MLXTERP_SCREENSHOTS"])
        assert page.errors == [], page.errors
        assert all(url.startswith(("file:", "data:", "about:")) for url in page.requests), page.requests
        assert page.evaluate("document.querySelectorAll('.mlxterp-view b, .mlxterp-view i').length") == 0
        page.close()


@pytest.fixture(scope="module")
def model(wrapped_tokenizer):
    return InterpretableModel(tiny_llama(num_hidden_layers=3), tokenizer=wrapped_tokenizer)


def shown(token: str) -> str:
    """What the page shows for a token (views.js ``shown``)."""
    text = token.replace("\n", "\u21b5").replace("\t", "\u21e5")
    return "\u2205" if token == "" else text.replace(" ", "\u2423") if not text.strip() else text


def texts(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.textContent)")


def test_attention_view_shows_where_each_token_attends(model, open_view):
    result = model.attention_patterns("the cat sat on the mat", layer="all")
    tokens = list(result.tokens)
    tokens[2] = HOSTILE
    result = attrs.evolve(result, tokens=tokens)
    page = open_view(result._repr_html_(), "attention")
    assert texts(page, ".mv-tokens .mv-tok") == [shown(t) for t in tokens]
    patterns = np.asarray(result.patterns)  # (L, H, T, T)
    T = len(tokens)

    def weights() -> np.ndarray:
        return np.array([float(w) for w in page.eval_on_selector_all(".mv-tokens .mv-tok", "ns => ns.map(n => n.dataset.weight)")])

    before = page.eval_on_selector_all(".mv-tokens .mv-tok", "ns => ns.map(n => n.dataset.weight + n.style.background)")
    assert before == [""] * T  # nothing shaded until a token is hovered
    query = T - 1
    page.hover(f".mv-tokens .mv-tok:nth-child({query + 1})")
    assert np.abs(weights() - patterns[0, 0, query]).max() <= 1 / 255
    assert "attends to" in page.inner_text(".mv-info")
    page.click(".mv-thumb:nth-child(3)")  # head 2
    page.hover(f".mv-tokens .mv-tok:nth-child({query + 1})")
    assert np.abs(weights() - patterns[0, 2, query]).max() <= 1 / 255
    page.select_option("select", "2")  # the third layer
    page.hover(f".mv-tokens .mv-tok:nth-child({query + 1})")
    assert np.abs(weights() - patterns[2, 2, query]).max() <= 1 / 255
    page.click("button[data-mode='from']")
    page.hover(".mv-tokens .mv-tok:nth-child(2)")  # what attends to token 1: a column
    assert np.abs(weights() - patterns[2, 2, :, 1]).max() <= 1 / 255
    page.click(".mv-thumb:last-child")  # the mean of the heads
    page.hover(".mv-tokens .mv-tok:nth-child(2)")
    assert np.abs(weights() - patterns[2].mean(axis=0)[:, 1]).max() <= 1.5 / 255
    page.click("button[data-mode='to']")
    page.click(f".mv-tokens .mv-tok:nth-child({query + 1})")  # keep it
    page.mouse.move(1000, 650)
    assert np.abs(weights() - patterns[2].mean(axis=0)[query]).max() <= 1.5 / 255


def test_lens_view_shows_the_top_k_of_a_hovered_cell(model, open_view):
    result = model.logit_lens("the cat sat on the mat", top_k=4)
    tokens = list(result.tokens)
    tokens[1] = HOSTILE
    last = result.layers[-1]
    predictions = dict(result.predictions)
    predictions[last] = [list(cell) for cell in predictions[last]]
    predictions[last][0][0] = (predictions[last][0][0][0], predictions[last][0][0][1], "<i>" + HOSTILE)
    result = attrs.evolve(result, tokens=tokens, predictions=predictions)
    page = open_view(result._repr_html_(), "lens")
    assert texts(page, "tr:last-child th.mv-col") == [shown(t) for t in tokens]
    n_layers = len(result.layers)
    # rows top to bottom are the layers from last to first
    assert texts(page, "table.mv-grid tr th:first-child")[:n_layers] == [f"L{i}" for i in reversed(result.layers)]
    for layer_row, position in [(0, 0), (n_layers - 1, 3), (1, len(tokens) - 1)]:
        layer = result.layers[n_layers - 1 - layer_row]
        page.hover(f"table.mv-grid tr:nth-child({layer_row + 1}) td:nth-child({position + 2})")
        rows = page.eval_on_selector_all(".mv-topk tr", "rs => rs.map(r => [...r.children].map(c => c.textContent))")
        cell = result[layer][position]
        assert [json.loads(r[0]) for r in rows] == [text for _, _, text in cell]
        assert np.allclose([float(r[1].rstrip("%")) for r in rows], [100 * p for _, p, _ in cell], atol=0.25)
        assert page.inner_text(".mv-panel .mv-title").startswith(f"layer {layer}, position {position}")


def test_patching_view_hover_gives_the_recovery(model, open_view):
    result = model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=(11, 12))
    labels = list(result.labels)
    labels[0] = HOSTILE
    result = attrs.evolve(result, labels=labels)
    page = open_view(result._repr_html_(), "patching")
    assert texts(page, "tr:last-child th.mv-col") == [shown(t) for t in labels]
    cells = texts(page, "td.mv-cell")
    assert len(cells) == len(result.layers) * len(labels) and not {"-0", "-0.00"} & set(cells)
    layer_row, column = 0, 2  # the last layer is on top
    page.hover(f"table.mv-grid tr:nth-child({layer_row + 1}) td:nth-child({column + 2})")
    layer = result.layers[-1]
    info = page.inner_text(".mv-info")
    assert info.startswith(f"layer L{layer}, position {json.dumps(labels[column])}: ")
    assert float(info.rsplit(": ", 1)[1].rstrip("%")) == pytest.approx(result[layer][column], rel=2e-3, abs=1e-2)


def test_token_heatmap_view_colours_and_hovers(open_view):
    tokens = ["The", " cat", HOSTILE, " sat", "\n", " "]
    values = np.array([[0.0, 2.0, -1.0, 0.5, 0.0, 4.0], [1.0, 1.0, 1.0, -2.0, 0.0, 0.0]])
    page = open_view(views.token_heatmap_html(tokens, values, labels=["feature 7", "feature <b>9"], title=HOSTILE), "tokens")
    assert texts(page, ".mv-tok") == [shown(t) for t in tokens]
    assert page.inner_text(".mv-title") == HOSTILE
    page.hover(".mv-tok:nth-child(3)")
    assert page.inner_text(".mv-info") == f"position 2 {json.dumps(HOSTILE)}: feature 7 = -1.00"

    def colours() -> list[str]:
        return page.eval_on_selector_all(".mv-tok", "ns => ns.map(n => n.style.background)")

    first = colours()
    assert first[5] == "rgb(9, 105, 218)" and "207, 34, 46" in first[2]  # the max, and a negative
    page.select_option("select", "1")
    assert colours() != first
    page.hover(".mv-tok:nth-child(4)")
    assert page.inner_text(".mv-info").endswith("feature <b>9 = -2.00")


def test_several_texts_are_lines(open_view):
    page = open_view(views.token_heatmap_html([["a", "b"], ["c", "d", "e"]], [[1.0, 0.0], [0.0, 0.5, -1.0]]), "examples")
    assert page.eval_on_selector_all(".mv-line", "ls => ls.map(l => l.children.length)") == [2, 3]
    page.hover(".mv-line:nth-child(2) .mv-tok:nth-child(3)")
    assert page.inner_text(".mv-info") == 'text 1, position 2 "e": row 0 = -1.00'


def test_dla_view_cells_are_the_contributions(model, open_view):
    result = model.direct_logit_attribution(CLEAN, answers=(11, 12))
    page = open_view(result._repr_html_(), "dla")
    heads = result.n_heads
    assert texts(page, "tr:last-child th.mv-col") == ["attn", "mlp"] + [f"H{h}" for h in range(heads)]
    page.hover("table.mv-grid tr:nth-child(1) td:nth-child(5)")  # the last layer, head 1 (after th, attn, mlp, H0)
    last = len(result.head_matrix()) - 1
    info = page.inner_text(".mv-info")
    assert info.startswith(f"layer L{last}, component H1: "), info
    assert float(info.rsplit(": ", 1)[1]) == pytest.approx(result[f"L{last}H1"], rel=2e-3, abs=1e-3)


def test_two_views_in_one_page_render_independently(model, open_view):
    result = model.attribution_patching(CLEAN, CORRUPTED, answers=(11, 12))
    page = open_view(result._repr_html_(), "attribution")
    assert page.eval_on_selector_all(".mlxterp-view", "vs => vs.map(v => v.dataset.rendered)") == ["1"] * len(result.keys())
    assert len(page.query_selector_all(".mv-title")) == len(result.keys())
