"""The HTML views in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
playwright's Python package) opens each file offline, the test reads the rendered DOM (every
token is there as text, hovering shows the numbers the result holds) and takes a screenshot.

Screenshots go to the test's temporary folder, and also to $MLXTERP_SCREENSHOTS when set.
"""

from __future__ import annotations

import html
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


def test_the_tuned_lens_view_is_titled_so_and_shows_kl_entropy_and_rank(model, open_view):
    """A tuned lens result carries, per cell, KL to the final distribution, entropy and the rank
    of the final top-1: hovering a cell lists them, and each can colour the grid."""
    from mlxterp_lenses import TunedLens

    result = model.tuned_lens("the cat sat on the mat", TunedLens.for_model(model))
    page = open_view(result._repr_html_(), "tuned-lens")
    assert page.inner_text(".mlxterp-view > .mv-title") == "Tuned lens: the cat sat on the mat"
    layer, position = result.layers[-2], 2
    page.hover(f"table.mv-grid tr:nth-child(2) td:nth-child({position + 2})")  # the second row from the top
    lines = dict(line.split(": ") for line in texts(page, ".mv-panel .mv-metrics"))
    assert float(lines["KL(final || lens)"].removesuffix(" nats")) == pytest.approx(result.kl[layer][position], rel=2e-3, abs=1e-3)
    assert float(lines["entropy"].removesuffix(" nats")) == pytest.approx(result.entropy[layer][position], rel=2e-3)
    assert int(lines["rank of the final top-1"]) == result.final_rank[layer][position]

    def colours() -> list[str]:
        return page.eval_on_selector_all("td.mv-cell", "ns => ns.map(n => n.style.background)")

    by_probability = colours()
    page.select_option("select.mv-colour-by", "1")
    assert colours() != by_probability and "colour: KL(final || lens)" in page.inner_text(".mlxterp-view > .mv-legend")
    top_row = colours()[: len(result.tokens)]  # the last layer is the model: KL 0, no colour
    assert set(top_row) == {"rgb(255, 255, 255)"}


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
    # the max at full colour; -1 (a quarter of the scale) red mixed a quarter into the white background
    assert first[5] == "rgb(9, 105, 218)" and first[2] == "rgb(243, 200, 203)"
    page.select_option("select", "1")
    assert colours() != first
    page.hover(".mv-tok:nth-child(4)")
    assert page.inner_text(".mv-info").endswith("feature <b>9 = -2.00")


def test_a_first_token_outlier_does_not_pale_the_others(open_view):
    """The attention sink: the first token's value is 100x the others'. The others keep their
    colours (the largest of them at full colour), the sink is at full colour, dashed, and the
    legend says it is left out of the scale."""
    tokens = ["What", " a", " wonderful", " day", ",", " but", " awful"]
    values = [240.0, 0.4, 3.0, 1.2, -0.3, -1.0, -2.5]
    page = open_view(views.token_heatmap_html(tokens, values, labels=["sentiment"]), "tokens-outlier")
    colours = page.eval_on_selector_all(".mv-tok", "ns => ns.map(n => n.style.background)")
    assert colours[0] == colours[2] == "rgb(9, 105, 218)"  # the sink, and the largest of the others
    assert colours[6] == "rgb(215, 71, 81)"  # -2.5 of 3: red mixed 5/6 into the white background
    assert page.eval_on_selector_all(".mv-tok", "ns => ns.map(n => n.classList.contains('mv-clipped'))") == [True] + [False] * 6
    legend = page.inner_text(".mv-legend")
    assert legend.startswith("sentiment: full colour at |value| 3.00; left out of the scale as outliers")
    assert 'position 0 "What" = 240.0' in legend


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


# ---------------------------------------------------------------- themes, sanitisers, one renderer per page


@pytest.fixture
def open_page(browser, tmp_path):
    """Open a page of raw ``body`` HTML (no renderer added) in a host page: ``host_css`` and
    ``body_attrs`` stand for the notebook around the output; returns the page, with the same
    checks as ``open_view`` after the test."""
    pages = []

    def open_(body: str, name: str, color_scheme: str = "light", host_css: str = "", body_attrs: str = ""):
        path = tmp_path / f"{name}.html"
        path.write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><style>{host_css}</style></head>'
                        f"<body {body_attrs}>{body}</body></html>\n", encoding="utf-8")
        page = browser.new_page(viewport={"width": 1100, "height": 700}, color_scheme=color_scheme)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(path.as_uri())
        page.errors, page.shot_name = errors, name
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.screenshot(path=str(tmp_path / f"{page.shot_name}.png"), full_page=True)
        if os.environ.get("MLXTERP_SCREENSHOTS"):
            shutil.copy(tmp_path / f"{page.shot_name}.png", os.environ["MLXTERP_SCREENSHOTS"])
        assert page.errors == [], page.errors
        page.close()


class Shown(views.Display):
    """A result for the tests: a one-line summary and the given views."""

    def __init__(self, summary: str, fragment: str):
        self.summary, self.fragment = summary, fragment

    def _summary(self) -> str:
        return self.summary

    def _view(self) -> str:
        return self.fragment


def every_kind_of_view() -> list[Shown]:
    rng = np.random.default_rng(0)
    tokens = ["<s>", "The", " cat", " sat", " on", " the", " mat", "\n"]
    T = len(tokens)
    values = rng.normal(size=(2, T))
    patterns = np.tril(rng.random((2, 3, T, T)))
    patterns /= patterns.sum(-1, keepdims=True)
    predictions = [[[(i, float(p), tok) for i, (p, tok) in enumerate(zip((0.9 - 0.1 * l, 0.05), (" mat", " cat")))]
                    for _ in tokens] for l in range(3)]
    metric = {"name": "KL(final || lens)", "unit": " nats", "values": rng.random((3, T)) * 4}
    return [
        Shown("TokenValues(8 tokens x 2 rows)", views.token_heatmap_html(tokens, values, labels=["a", "b"], title="Values over tokens")),
        Shown("Patching(3 layers x 8 positions)", views.heatmap_html(["L0", "L1", "L2"], tokens, rng.normal(size=(3, T)) * 60,
                                                                    title="Patching", subtitle="clean vs corrupted", unit="%")),
        Shown("Lens(8 tokens x 3 layers)", views.lens_html(tokens, [0, 1, 2], predictions, title="Lens", metrics=[metric])),
        Shown("Attention(2 layers x 3 heads)", views.attention_html(tokens, patterns, [0, 1], [0, 1, 2], title="Attention")),
    ]


def notebook_outputs(results) -> list[str]:
    """What a fresh kernel session's notebook holds: each result's _repr_html_, in order."""
    views.new_session()
    return [result._repr_html_() for result in results]


CONTRAST = """(selector) => {
  const parse = (c) => { const p = c.match(/\\(([^)]*)\\)/)[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
                          return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const over = (top, under) => [0, 1, 2].map(i => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]);
  const lum = (c) => { const l = c.slice(0, 3).map(v => { v /= 255; return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
                       return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2]; };
  const behind = (node) => {  // the colour behind a node's text: its and its ancestors' backgrounds, composited
    const layers = [];
    for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c[3] > 0) layers.push(c);
      if (c[3] >= 1) break;
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255, 1]);
  };
  return [...document.querySelectorAll(selector)].filter(n => n.textContent.trim() && n.getClientRects().length).map(n => {
    const bg = behind(n), fg = over(parse(getComputedStyle(n).color), bg), [a, b] = [lum(fg), lum(bg)];
    return [n.className || n.tagName, n.textContent.slice(0, 24), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  });
}"""
TEXT = (".mlxterp-view .mv-title, .mlxterp-view .mv-subtitle, .mlxterp-view .mv-info, .mlxterp-view .mv-legend, "
        ".mlxterp-view .mv-tok, .mlxterp-view td, .mlxterp-view th, .mlxterp-view label, .mlxterp-view select, "
        ".mlxterp-view button, .mlxterp-view .mv-thumb span, .mlxterp-view .mv-metrics")
HOSTS = {  # name: (prefers-color-scheme, the host page's own colours, attributes of its <body>)
    "light": ("light", "", ""),
    "dark": ("dark", "@media (prefers-color-scheme: dark) { body { background: #1e1e1e; color: #d4d4d4; } }", ""),
    "jupyterlab-dark": ("light", "body { background: #111111; color: rgba(255, 255, 255, 0.87); }", 'data-jp-theme-light="false"'),
    "vscode-dark": ("light", "body { background: #1f1f1f; color: #cccccc; }", 'class="vscode-dark"'),
    "jupyterlab-light-on-a-dark-system": ("dark", "body { background: #ffffff; color: rgba(0, 0, 0, 0.87); }",
                                          'data-jp-theme-light="true"'),
}


@pytest.mark.parametrize("host", HOSTS)
def test_every_text_of_every_view_keeps_its_contrast_in_light_and_dark_themes(open_page, host):
    """Titles, tokens, info lines, legends, cells, labels and controls against what is behind
    them (WCAG contrast >= 4.5), in a dark page, a light one, and JupyterLab's and VS Code's
    dark themes, before and after hovering (hovered tokens and cells are painted)."""
    color_scheme, host_css, body_attrs = HOSTS[host]
    page = open_page("".join(notebook_outputs(every_kind_of_view())), f"theme-{host}", color_scheme, host_css, body_attrs)
    assert page.eval_on_selector_all(".mlxterp-view", "vs => vs.map(v => v.dataset.rendered)") == ["1"] * 4
    dark = host != "light" and not host.startswith("jupyterlab-light")
    background = page.eval_on_selector(".mlxterp-view", "v => getComputedStyle(v).backgroundColor")
    assert (background == "rgb(13, 17, 23)") == dark, background

    def low() -> list:
        ratios = page.evaluate(CONTRAST, TEXT)
        assert len(ratios) > 60
        return [r for r in ratios if r[2] < 4.5]

    assert low() == []
    page.click("[data-kind=attention] .mv-tokens .mv-tok:last-child")  # attention: keep a token, shade the others
    page.hover("[data-kind=tokens] .mv-tok:nth-child(3)")
    page.hover("[data-kind=heatmap] tr:nth-child(2) td:nth-child(3)")
    page.select_option("[data-kind=lens] select", "1")  # the lens coloured by its metric
    assert low() == []


def strip_scripts_and_styles(fragment: str) -> str:
    """What JupyterLab does to an untrusted notebook's HTML (sanitize-html) and GitHub to a
    notebook's: <script> and <style> elements go with their content, data-* and on* attributes go."""
    from html.parser import HTMLParser

    class Strip(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=False)
            self.out, self.skipping = [], None

        def handle_starttag(self, tag, attrs):
            if self.skipping:
                return
            if tag in ("script", "style"):
                self.skipping = tag
                return
            kept = "".join(f' {k}="{html.escape(v or "")}"' for k, v in attrs if not k.startswith(("data-", "on")))
            self.out.append(f"<{tag}{kept}>")

        def handle_endtag(self, tag):
            if self.skipping:
                self.skipping = None if tag == self.skipping else self.skipping
                return
            self.out.append(f"</{tag}>")

        def handle_data(self, data):
            if not self.skipping:
                self.out.append(data)

        def handle_entityref(self, name):
            self.handle_data(f"&{name};")

        def handle_charref(self, name):
            self.handle_data(f"&#{name};")

    strip = Strip()
    strip.feed(fragment)
    return "".join(strip.out)


def nh3_clean(fragment: str) -> str:
    return pytest.importorskip("nh3", reason="nh3 (ammonia's sanitiser) is not installed").clean(fragment)


def nbconvert_clean(fragment: str) -> str:
    """nbconvert's HTMLExporter(sanitize_html=True): bleach, escaping every tag it does not allow."""
    strings = pytest.importorskip("nbconvert.filters.strings", reason="nbconvert is not installed")
    return strings.clean_html(fragment)


@pytest.mark.parametrize("sanitise", [strip_scripts_and_styles, nh3_clean])
def test_where_no_script_runs_each_result_shows_its_one_line_summary_and_nothing_else(open_page, sanitise):
    """An untrusted notebook, GitHub's viewer: scripts and styles are stripped. Each result then
    shows its summary (its repr), and no CSS, script or data shows as text."""
    results = every_kind_of_view()
    page = open_page("".join(sanitise(output) for output in notebook_outputs(results)), f"sanitised-{sanitise.__name__}")
    assert page.inner_text("body").split("\n") == [repr(result) for result in results]


def test_under_an_escaping_sanitiser_a_view_without_the_renderer_shows_only_its_summary(open_page):
    """nbconvert's sanitize_html escapes what it does not allow, so a <script> shows as text:
    a view's data is an attribute (dropped silently) and only the first view of a session carries
    the renderer's script; every later view shows its summary and nothing else."""
    results = every_kind_of_view()
    first, *later = notebook_outputs(results)
    page = open_page("".join(nbconvert_clean(output) for output in later), "sanitised-nbconvert")
    assert page.inner_text("body").split("\n") == [repr(result) for result in results[1:]]


def test_one_renderer_per_session_and_views_render_in_any_order(open_page):
    """A kernel session's first view carries the renderer; the others carry only their data and
    render when the renderer is on the page: before it, after it, or added later (as a notebook
    adds a cell's output), and a page with two sessions' renderers (a reopened notebook whose
    later cells ran again) renders everything once."""
    results = every_kind_of_view()
    first, *later = notebook_outputs(results)
    assert views.RENDERER_MARK in first and not any(views.RENDERER_MARK in output for output in later)
    again = notebook_outputs(results[2:])  # a new session: the first view it shows carries the renderer again
    assert views.RENDERER_MARK in again[0] and views.RENDERER_MARK not in again[1]

    def rendered(page) -> list[str]:
        return page.eval_on_selector_all(".mlxterp-view", "vs => vs.map(v => v.dataset.rendered || '')")

    alone = open_page(later[0], "without-the-renderer")  # the first output cleared: the summary shows
    assert rendered(alone) == [""] and alone.inner_text("body") == repr(results[1])
    out_of_order = open_page("".join(later[:2]) + first, "out-of-order")
    assert rendered(out_of_order) == ["1"] * 3
    assert out_of_order.eval_on_selector_all(".mlxterp-summary", "ss => ss.map(s => s.checkVisibility())") == [False] * 3
    reopened = open_page(first + "".join(later) + "".join(again), "reopened")
    assert rendered(reopened) == ["1"] * 6
    assert reopened.evaluate("document.querySelectorAll('style[data-mlxterp-views]').length") == 1
    # a later cell's output arrives (JupyterLab and VS Code set innerHTML, then attach it)
    reopened.evaluate("html => { const out = document.createElement('div'); out.innerHTML = html; document.body.appendChild(out); }",
                      later[2])
    reopened.wait_for_function("document.querySelectorAll('.mlxterp-view[data-rendered]').length === 7")


def test_the_attribution_graph_view_shows_nodes_edges_and_neighbours(open_view):
    """The pruned graph by layer and position: every kept node and edge drawn, hovering a node
    says what it is and its strongest edges, clicking lights its neighbours only."""
    import mlxterp

    fixtures = Path(__file__).parent / "fixtures" / "circuit_tracer"
    tiny = mlxterp.load(fixtures / "model")
    tc = mlxterp.load_transcoders(fixtures / "transcoders" / "clt_jumprelu")
    ids = np.load(fixtures / "reference" / "model_io.npz")["input_ids"].tolist()
    graph = tiny.attribution_graph(ids, tc, progress=False)
    graph.token_strings[3] = HOSTILE
    pruned = graph.prune()
    page = open_view(graph._repr_html_(), "attribution_graph")
    assert len(page.query_selector_all(".mv-graph-node")) == pruned.n_nodes == 53
    assert len(page.query_selector_all(".mv-graph-edge")) == pruned.n_edges == 715
    columns = page.eval_on_selector_all(".mv-graph-col", "ns => ns.map(n => [n.firstChild.textContent, n.lastChild.textContent])")
    assert columns[3] == [shown(HOSTILE)[:8] + "\u2026", HOSTILE + " (position 3)"]  # text, cut short; whole on hover
    kept = np.flatnonzero(pruned.node_mask)
    first = int(np.argmax(kept >= graph.error_start)) - 1  # the last feature node shown
    node = page.query_selector_all(".mv-graph-node")[first]
    node.hover()
    info = page.inner_text(".mv-graph-info")
    assert info.startswith(graph.label(int(kept[first]))) and "strongest inputs:" in info and "strongest outputs:" in info
    node.click()
    lit = page.eval_on_selector_all(".mv-graph-node", "ns => ns.filter(n => !n.classList.contains('mv-dim')).length")
    targets, sources, _ = pruned.edges()
    k = int(kept[first])
    neighbours = {k} | set(sources[targets == k].tolist()) | set(targets[sources == k].tolist())
    assert lit == len(neighbours & set(kept.tolist()))
    node.click()  # released
    assert page.eval_on_selector_all(".mv-graph-node.mv-dim", "ns => ns.length") == 0
