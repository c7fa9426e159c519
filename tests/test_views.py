"""Results display compactly (a one-line repr with the headline finding) and as self-contained
HTML views whose data round-trips and whose text can never become markup."""

from __future__ import annotations

import inspect
import json
import sys

import numpy as np
import pytest
from helpers import tiny_llama

import mlxterp_analyses
from mlxterp import InterpretableModel, interventions as iv
from mlxterp_analyses import results
from mlxterp_core import views

CLEAN = [5, 17, 3, 42, 9, 77, 1, 30]
CORRUPTED = [5, 17, 8, 61, 9, 77, 1, 30]
REPR_LIMIT = 400


@pytest.fixture(scope="module")
def model(wrapped_tokenizer):
    return InterpretableModel(tiny_llama(num_hidden_layers=4), tokenizer=wrapped_tokenizer)


@pytest.fixture(scope="module")
def all_results(model):
    text = "the cat sat on the mat and the cat"
    return {
        "lens": model.logit_lens(text, top_k=3),
        "patching": model.activation_patching(CLEAN, CORRUPTED, component="mlp", answers=(11, 12)),
        "patching_positions": model.activation_patching(CLEAN, CORRUPTED, component="resid", positions="all", answers=(11, 12)),
        "patching_heads": model.activation_patching(CLEAN, CORRUPTED, component="attn", heads=True, answers=(11, 12)),
        "attribution": model.attribution_patching(CLEAN, CORRUPTED, answers=(11, 12)),
        "dla": model.direct_logit_attribution(CLEAN, answers=(11, 12)),
        "decomposition": model.decompose_resid(CLEAN, layer=2),
        "attention": model.attention_patterns(text, layer=1),
        "attention_layers": model.attention_patterns(text, layer="all"),
        "steering": model.steering_vector(["the cat"], ["the mat"], layer=1),
        "generation": model.generate(CLEAN, max_tokens=3),
        "prompt_check": model.test_prompt("the cat", "sat"),
    }


def result_classes():
    return [cls for _, cls in inspect.getmembers(results, inspect.isclass)
            if cls.__module__ == results.__name__ and hasattr(cls, "__attrs_attrs__")]


def test_every_result_class_keeps_the_compact_repr():
    """attrs writes a field-by-field __repr__ unless told repr=False; none may have one."""
    for cls in result_classes():
        assert issubclass(cls, views.Display), cls
        assert cls.__repr__ is views.Display.__repr__, f"{cls.__name__}: declare @attrs.frozen(repr=False)"


def test_reprs_are_short_and_name_the_headline(all_results):
    covered = {type(r) for r in all_results.values()}
    assert covered == set(result_classes()), "a result class has no repr test"
    for key, result in all_results.items():
        text = repr(result)
        assert text.startswith(type(result).__name__ + "("), text
        assert len(text) <= REPR_LIMIT and "\n" not in text, (key, len(text), text)
    lens = all_results["lens"]
    final = lens[lens.layers[-1]][-1][0][2]
    assert f"predicts {final!r}" in repr(lens) and f"{len(lens.tokens)} tokens x 4 layers" in repr(lens)
    patching = all_results["patching"]
    layer, _, value = patching.top(1)[0]
    assert f"top recovery: L{layer} {value:.1f}%" in repr(patching)
    heads = all_results["patching_heads"]
    layer, head, value = heads.top(1)[0]
    assert f"L{layer}H{head} {value:.1f}%" in repr(heads)


def test_a_lens_repr_is_not_a_wall_of_lists(model):
    """The issue's example: one short prompt printed thousands of characters."""
    lens = model.logit_lens("the cat sat on the mat", top_k=10)
    assert len(repr(lens)) < 200 < len(str(lens.to_data()))


def test_strongest_link_skips_the_first_token_and_the_diagonal():
    pattern = np.zeros((2, 4, 4), np.float32)
    pattern[:, :, 0] = 0.9  # everything attends to BOS
    pattern[:, np.arange(4), np.arange(4)] = 0.95  # and itself
    pattern[1, 3, 2] = 0.3
    pattern[0, 2, 1] = 0.2
    assert results.strongest_link(pattern.tolist()) == (1, 3, 2, pytest.approx(0.3))
    assert results.strongest_link([[[1.0, 0.0], [0.5, 0.5]]]) is None


def test_trace_repr_says_what_it_recorded(model):
    with model.trace(CLEAN, capture=["layers[1].output", "layers[2].attn.q"]) as trace:
        pass
    text = repr(trace)
    assert text.startswith("Trace(inputs 1x8, 2 sites recorded: ")
    assert "model.model.layers.1 (1x8x" in text and "self_attn.q_proj (1x8x" in text
    everything = model.run([CLEAN, CLEAN[:4]])
    text = repr(everything)
    assert f"inputs 2x8, {len(everything.activations)} sites recorded" in text and text.endswith(", ...)")
    assert len(text) < REPR_LIMIT
    pending = model.trace(CLEAN, interventions={"layers.1.output": iv.zero_out})
    assert repr(pending) == "Trace(not run yet, inputs 1x8, interventions: layers.1.output)"


def test_dict_indexing_and_save_load_are_unchanged(all_results, tmp_path):
    lens = all_results["lens"]
    assert lens[0] is lens.predictions[0] and list(lens) == lens.layers
    for key, result in all_results.items():
        if key == "generation":
            continue
        assert type(result).load(result.save(tmp_path / f"{key}.json")) == result


def test_exported_result_classes_display():
    for name in mlxterp_analyses.__all__:
        obj = getattr(mlxterp_analyses, name)
        if inspect.isclass(obj):
            assert issubclass(obj, views.Display), name


# ---------------------------------------------------------------- HTML: data and escaping

HOSTILE = "</script><b>bold</b>"


def embedded_data(page: str) -> list[dict]:
    """The JSON payloads of every view in a page, parsed as a browser would split the page."""
    from html.parser import HTMLParser

    class Views(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "mlxterp-view" in (attrs.get("class") or "").split():
                self.found.append(json.loads(attrs["data-mlxterp"]))

    parser = Views()
    parser.feed(page)
    return parser.found


def test_codecs_round_trip_within_their_precision():
    rng = np.random.default_rng(0)
    unit = rng.random((3, 4, 5)).astype(np.float32)
    assert np.abs(views.decode(views.encode_unit(unit)) - unit).max() <= 0.5 / 255 + 1e-7
    values = rng.normal(size=(7, 9)).astype(np.float32) * 50
    assert np.allclose(views.decode(views.encode_values(values)), values, rtol=1e-3, atol=1e-4)
    ids = rng.integers(-1, 10**6, size=(2, 3, 4))
    assert (views.decode(views.encode_ids(ids)) == ids).all()


def test_text_never_becomes_markup(tmp_path):
    tokens = ["a", HOSTILE, "&amp;", "\u2028"]
    path = views.write_html(tmp_path / "t.html", views.token_heatmap_html(tokens, [1, 2, 3, 4], title=HOSTILE), title=HOSTILE)
    page = path.read_text()
    assert HOSTILE not in page and "<b>" not in page
    (data,) = embedded_data(page)
    assert data["texts"] == [tokens] and data["title"] == HOSTILE


def test_attention_html_stores_one_byte_per_weight():
    rng = np.random.default_rng(0)
    tokens = [f"t{i}" for i in range(32)]

    def size(layers: int) -> int:
        weights = rng.random((layers, 4, 32, 32))
        return len(views.attention_html(tokens, weights, list(range(layers)), [0, 1, 2, 3]))

    per_layer = size(3) - size(2)
    assert 4 * 32 * 32 <= per_layer <= 4 * 32 * 32 * 4 / 3 + 8  # base64 of uint8: 4/3 bytes each


def test_views_reject_shapes_that_do_not_fit():
    from mlxterp_core.errors import MlxterpError

    with pytest.raises(MlxterpError, match="2 tokens"):
        views.token_heatmap_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(MlxterpError, match="labels"):
        views.token_heatmap_html(["a", "b"], [[1.0, 2.0]] * 2, labels=["one"])
    with pytest.raises(MlxterpError, match="finite"):
        views.token_heatmap_html(["a"], [float("nan")])
    with pytest.raises(MlxterpError, match="expected"):
        views.attention_html(["a", "b"], np.zeros((1, 1, 3, 3)), [0], [0])


def test_results_without_a_view_say_so(all_results, tmp_path):
    from mlxterp_core.errors import MlxterpError

    steering = all_results["steering"]
    # Jupyter shows the one-line summary (before issue 22 item 1: None, and Jupyter fell back to the repr)
    assert steering._repr_html_() == views.summary_html(repr(steering))
    with pytest.raises(MlxterpError, match="no HTML view"):
        steering.to_html(tmp_path / "s.html")


def test_result_views_carry_their_data(all_results):
    lens = all_results["lens"]
    (data,) = embedded_data(views.document(lens._repr_html_()))
    assert data["tokens"] == lens.tokens and data["layers"] == lens.layers
    ids, probs = views.decode(data["ids"]), views.decode(data["probs"])
    for li, layer in enumerate(lens.layers):
        for t, cell in enumerate(lens[layer]):
            assert [data["vocab"][i] for i in ids[li, t]] == [text for _, _, text in cell]
            assert np.allclose(probs[li, t], [p for _, p, _ in cell], atol=0.5 / 255 + 1e-6)
    patching = all_results["patching_positions"]
    (data,) = embedded_data(views.document(patching._view()))
    assert np.allclose(views.decode(data["values"]), patching.recovery, rtol=1e-3, atol=1e-3)
    assert data["columns"] == patching.labels and data["rows"] == [f"L{i}" for i in patching.layers]
    dla = all_results["dla"]
    (data,) = embedded_data(views.document(dla._view()))
    table = views.decode(data["values"])  # (layers, attn + mlp + heads)
    assert data["columns"] == ["attn", "mlp"] + [f"H{h}" for h in range(dla.n_heads)]
    bias = np.array([dla[f"L{i} attn bias"] for i in range(len(table))])
    assert np.allclose(table[:, 0], table[:, 2:].sum(axis=1) + bias, rtol=1e-2, atol=1e-2)  # heads + bias = attn
    rest = sum(v for label, v in zip(dla.labels, dla.values) if not label.startswith("L"))
    assert table[:, :2].sum() + rest == pytest.approx(dla.logit_diff, rel=1e-2, abs=1e-2)
    attribution = all_results["attribution"]
    assert len(embedded_data(views.document(attribution._view()))) == len(attribution.keys())


def test_attention_patterns_of_several_layers_come_from_one_pass(model):
    text = "the cat sat on the mat"
    stack = model.attention_patterns(text, layer=[1, 3], heads=[0, 2])
    assert isinstance(stack, results.AttentionLayers) and list(stack) == [1, 3]
    for layer in (1, 3):
        alone = model.attention_patterns(text, layer=layer, heads=[0, 2])
        assert stack[layer] == alone
    assert len(model.attention_patterns(text, layer="all")) == model.architecture.n_layers


def test_load_result_reloads_any_result_without_naming_its_class(all_results, tmp_path):
    import mlxterp

    for key in ("lens", "patching", "steering"):
        result = all_results[key]
        result.save(tmp_path / f"{key}.json")
        again = mlxterp.load_result(tmp_path / f"{key}.json")
        assert type(again) is type(result) and again.to_data() == result.to_data()
    (tmp_path / "other.json").write_text('{"mlxterp_result": "NoSuchResult"}')
    with pytest.raises(mlxterp.FileFormatError, match="NoSuchResult"):
        mlxterp.load_result(tmp_path / "other.json")


def test_a_dataset_lists_its_sites_like_a_mapping(model, tmp_path):
    ds = model.cache_activations(["the cat sat on the mat"] * 4, ["layers[1]", "layers[2].mlp"], tmp_path / "ds",
                                 context_size=8, progress=False)
    assert ds.keys() == ds.sites == ["layers.1.output", "layers.2.mlp"]
    assert "layers[1]" in ds and "layers.3.output" not in ds


def test_a_session_carries_the_renderer_once_and_files_always(all_results, tmp_path):
    """Nine views shown in one kernel session: the first carries the renderer (the script and
    the stylesheet), the others only their data, so the nine weigh far less than nine times
    one; a file written from any of them is whole on its own."""
    shown = [result for result in all_results.values() if result._view() is not None]
    shown = (shown + shown)[:9]
    views.new_session()
    outputs = [result._repr_html_() for result in shown]
    alone = views.document(views.result_html(repr(shown[0]), shown[0]._view()))
    assert sum(map(len, outputs)) < 2 * len(outputs[0]) < 2 * len(alone)
    assert [views.RENDERER_MARK in output for output in outputs] == [True] + [False] * 8
    for result in shown[3:5]:
        page = result.to_html(tmp_path / "view.html").read_text()
        assert page.count(views.RENDERER_MARK) == 1 and page.count("<script") == 1 and "<style" not in page


def test_views_hold_no_style_and_the_renderer_inlines_safely():
    """A view is a div and its data, no <style> (a sanitiser shows CSS as text) and no script;
    the renderer's one <script> cannot be ended early by its own text."""
    fragment = views.token_heatmap_html(["a", HOSTILE], [1.0, 2.0], title="it's <b>")
    assert "<style" not in fragment and "<script" not in fragment and "<b>" not in fragment
    script = views.renderer_script()
    body = script[script.index(">") + 1 : -len("</script>")]
    assert not any(mark in body.lower() for mark in ("</", "<!--", "<script"))


def test_the_token_heatmap_scale_leaves_out_a_first_token_outlier_only():
    """The attention sink's first token (100x the others) would pale every other token: it is
    left out of the scale and named; a sparse feature's peak, or a first token only 3x the
    others, is not."""

    def data(tokens, values, **options) -> dict:
        (found,) = embedded_data(views.token_heatmap_html(tokens, values, **options))
        return found

    sink = data(["<s>", "a", "b", "c"], [100.0, 1.0, -2.0, 0.5])
    assert sink["scale"] == [2.0] and sink["clipped"] == [[0]] and sink["outliers"]
    sparse = data(list("abcde"), [0.0, 0.0, 5.0, 0.0, 1.0])
    assert sparse["scale"] == [5.0] and sparse["clipped"] == [[]]
    assert data(list("abc"), [3.0, 1.0, 0.5])["scale"] == [3.0]
    lines = data([["<s>", "a"], ["<s>", "b", "c"]], [[[50.0, 1.0]], [[2.0, 1.5, -1.0]]], labels=["f"])
    assert lines["scale"] == [2.0] and lines["clipped"] == [[0]]  # the first line's sink; the second's first is 2
    given = data(list("abc"), [[4.0, 1.0, 0.5], [1.0, 2.0, 3.0]], labels=["x", "y"], scale=[2.0, 10.0])
    assert given["scale"] == [2.0, 10.0] and given["clipped"] == [[0], []] and not given["outliers"]


def test_the_renderer_travels_again_when_the_cell_that_carried_it_runs_again(monkeypatch):
    """Its output is being replaced then; other cells, and the same run, carry no second copy."""
    class Run:  # IPython's ExecutionResult: one per run of a cell
        pass

    runs = [Run() for _ in range(5)]
    running = iter([("a", runs[0]), ("a", runs[0]), ("b", runs[1]), ("a", runs[2]), ("a", runs[2]), ("c", runs[3]),
                    (None, None)])
    monkeypatch.setattr(views, "_execution", lambda: next(running))
    views.new_session()
    assert [bool(views.notebook_renderer()) for _ in range(7)] == [True, False, False, True, False, False, False]
    monkeypatch.setitem(sys.modules, "google.colab", object())  # Colab: every output is its own page
    monkeypatch.setattr(views, "_execution", lambda: ("d", runs[4]))
    assert views.notebook_renderer() and views.notebook_renderer()
