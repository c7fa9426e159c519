"""How results show themselves: a short ``repr`` everywhere, and self-contained HTML views
(``result.to_html(path)``; Jupyter calls ``_repr_html_`` and shows them inline).

A result class takes both by inheriting :class:`Display` and declaring itself
``@attrs.frozen(repr=False)`` (attrs would otherwise write its own, field-by-field ``repr``)::

    @attrs.frozen(repr=False)
    class MyResult(Serialisable, Display):
        def _summary(self) -> str:          # one line: sizes and the headline finding
            return f"{len(self.tokens)} tokens, top feature {self.top_feature}"

        def _view(self) -> str | None:      # an HTML fragment (None: no HTML view)
            return token_heatmap_html(self.tokens, self.values, title="...")

A view is one ``<div class="mlxterp-view">`` holding its data as JSON in its ``data-mlxterp``
attribute (every ``<``, ``>``, ``&`` and ``'`` escaped, so no token can end it), and nothing
else: no script, no style. The renderer (``static/views.js``, which carries ``static/views.css``
and puts it in the page's ``<head>``) is one ``<script>`` per page: a written file carries it
once, and a notebook carries it in the first view shown in a kernel session; it renders every
view on the page and the views added later, in any order. A result's HTML also holds its
one-line summary, which the renderer hides: where no script runs (an untrusted notebook, a
sanitising viewer), the summary is what shows. The page reads no network and no CDN. Large
arrays travel as base64: attention weights and probabilities as uint8 (1/255 steps), other
values as float16. Text reaches the page only through ``textContent``, never as markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, WriteError
from .files import write_atomic


# ---------------------------------------------------------------- compact repr and the mixin


def short(text: str, width: int = 40) -> str:
    """``repr`` of a string, cut to about ``width`` characters."""
    text = str(text)
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def percent(value: float) -> str:
    return f"{value:.1f}%"


class Rounded(float):
    """A float that shows 4 significant digits in ``repr`` (``90.97``, not
    ``90.97457122802734``) and keeps its full value: arithmetic, comparisons, ``str``,
    f-strings and JSON see every digit. What results' helpers (``top()``, ``best()``) return,
    so that a list of them prints short."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{float(self):.4g}"

    __str__ = float.__repr__


def summary_html(text: str) -> str:
    """A result's one-line summary as a small HTML fragment (for results with no view): plain
    text in a monospace block, colours inherited from the page (light or dark)."""
    return f'<pre class="mlxterp-summary" style="white-space: pre-wrap; margin: 0">{html.escape(text)}</pre>'


class Display:
    """Mixin of result classes: a one-line ``repr`` from ``_summary()``, and an HTML view from
    ``_view()`` written by ``to_html(path)`` and shown inline by Jupyter (``_repr_html_``;
    a result with no view shows its summary there).

    Declare the attrs class with ``repr=False`` so that attrs keeps this ``__repr__``.
    """

    def _summary(self) -> str:
        """Sizes and the headline finding, one line (override)."""
        return ""

    def _view(self) -> str | None:
        """The HTML fragment of this result, or None where it has no HTML view (override)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()})"

    def _repr_html_(self) -> str:
        """The view, above its summary (which shows where no script runs); for a result with no
        view, its summary as a line of HTML."""
        views = self._view()
        if views is None:
            return summary_html(repr(self))
        return result_html(repr(self), views) + notebook_renderer()

    def to_html(self, path: str | Path, title: str | None = None) -> Path:
        """Write this result's view to ``path`` as one self-contained HTML file."""
        views = self._view()
        if views is None:
            raise InputError(f"{type(self).__name__} has no HTML view; use .plot() or .save().")
        return write_html(path, result_html(repr(self), views), title or type(self).__name__)


# ---------------------------------------------------------------- encoding arrays for the page


def encode_unit(values: Any) -> dict[str, Any]:
    """Values in [0, 1] (probabilities) as uint8 base64: 255 steps, 1 byte each."""
    array = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    quantised = np.rint(array * 255).astype(np.uint8)
    return {"codec": "u8", "shape": list(array.shape), "b64": base64.b64encode(quantised.tobytes()).decode()}


def encode_values(values: Any) -> dict[str, Any]:
    """Any finite values as little-endian float16 base64 (3 significant digits), 2 bytes each."""
    array = np.asarray(values, dtype=np.float32)
    return {"codec": "f16", "shape": list(array.shape), "b64": base64.b64encode(array.astype("<f2").tobytes()).decode()}


def encode_ids(values: Any) -> dict[str, Any]:
    """Integer indices as little-endian int32 base64."""
    array = np.asarray(values, dtype="<i4")
    return {"codec": "i32", "shape": list(array.shape), "b64": base64.b64encode(array.tobytes()).decode()}


def decode(encoded: dict[str, Any]) -> np.ndarray:
    """The array an ``encode_*`` function stored (for tests and round trips)."""
    raw = base64.b64decode(encoded["b64"])
    codec = encoded["codec"]
    if codec == "u8":
        array = np.frombuffer(raw, dtype=np.uint8).astype(np.float32) / 255
    elif codec == "f16":
        array = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        array = np.frombuffer(raw, dtype="<i4")
    return array.reshape(encoded["shape"])


# ---------------------------------------------------------------- fragments and documents


@cache
def _static(name: str) -> str:
    return resources.files("mlxterp_core").joinpath("static", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' appear literally."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _attribute_json(data: Any) -> str:
    """JSON for a single-quoted attribute: '<', '>', '&' as JSON escapes, "'" as a character
    reference (the parser gives it back), so a value can neither end the attribute nor the tag."""
    return _script_json(data).replace("'", "&#39;")


RENDERER_MARK = 'class="mlxterp-renderer"'


@cache
def renderer_script() -> str:
    """The one ``<script>`` that renders every view of a page: views.js called with its
    version and the stylesheet (which it puts in the page's ``<head>``)."""
    js, css = _static("views.js"), _static("views.css")
    version = hashlib.sha256((js + css).encode()).hexdigest()[:12]
    return f"<script {RENDERER_MARK}>{js.strip()}({_script_json(version)},{_script_json(css)});</script>"


class _Session:
    """Where this kernel session's notebook got the renderer: the cell whose output carried it
    and that cell's run (a weak reference to IPython's ExecutionResult)."""

    carrier: tuple[str | None, Callable[[], Any]] | None = None


def _execution() -> tuple[str | None, Any]:
    """The notebook cell running now (None where the frontend does not say) and its run
    (IPython's ExecutionResult, None outside a cell)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    return getattr(getattr(running, "info", None), "cell_id", None), running


def notebook_renderer() -> str:
    """The renderer's ``<script>`` for the first view a kernel session shows, "" after that.

    Later views need no script of their own: the renderer, once on the page, renders views as
    they are added, and on a reopened notebook the outputs render in order, the carrier first
    (a view above it is rendered when it arrives). It is carried again when the cell that carried
    it runs again (that output is being replaced), and always in Colab, whose outputs are
    separate pages. Where it is missing (the carrier's cell cleared or deleted, then the notebook
    reopened), each result shows its one-line summary until a cell shows a view in a new session.
    """
    cell, run = _execution()
    carrier = _Session.carrier
    again = carrier is not None and cell is not None and cell == carrier[0] and carrier[1]() is not run
    if carrier is None or again or "google.colab" in sys.modules:
        _Session.carrier = (cell, weakref.ref(run) if run is not None else lambda: None)
        return renderer_script()
    return ""


def new_session() -> None:
    """Forget that this session carried the renderer (the next view carries it again)."""
    _Session.carrier = None


def fragment(kind: str, data: dict[str, Any]) -> str:
    """One view as an HTML fragment: an empty div holding its data (the renderer fills it)."""
    payload = _attribute_json({"kind": kind, **data})
    return f"<div class=\"mlxterp-view\" data-kind=\"{kind}\" data-mlxterp='{payload}'></div>"


def result_html(summary: str, views: str) -> str:
    """A result's HTML: its one-line summary (what shows where no script runs; the renderer
    hides it) and its views."""
    return f'<div class="mlxterp-result">{summary_html(summary)}{views}</div>'


def document(fragment_html: str, title: str = "mlxterp") -> str:
    """A whole HTML page around a fragment, with the renderer (once)."""
    renderer = "" if RENDERER_MARK in fragment_html else renderer_script()
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
        f'<body class="mlxterp-page">{fragment_html}{renderer}</body></html>\n'
    )


def write_html(path: str | Path, fragment_html: str, title: str = "mlxterp") -> Path:
    """Write ``fragment_html`` as a self-contained page (atomically: temporary file, rename)."""
    if not isinstance(path, (str, os.PathLike)) or Path(path).name in ("", ".", ".."):
        raise InputError(f"write_html: path={path!r:.60} is not a file path (e.g. 'view.html').")
    _text(fragment_html, "the fragment", "write_html")
    _text(title, "title", "write_html")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path} could not be written: its folder cannot be made ({e.strerror or e}).") from None
    return write_atomic(path, document(fragment_html, title))


# ---------------------------------------------------------------- checking what a view is given


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {what} must be a string, got {type(value).__name__}.")
    return value


def _items(value: Any, what: str, where: str) -> list:
    """A list, tuple or array as a list (a string, a mapping or a number is not one)."""
    import mlx.core as mx

    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray, mx.array)) or getattr(value, "ndim", 1) == 0:
        raise InputError(f"{where}: {what} must be a list, got {type(value).__name__} {value!r:.40}.")
    return list(value)


def _ints(value: Any, what: str, where: str) -> list[int]:
    items = _items(value, what, where)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items):
        raise InputError(f"{where}: {what} must be a list of integers, got {value!r:.60}.")
    return [int(i) for i in items]


def _floats(value: Any, what: str, where: str) -> np.ndarray:
    """Numbers of one shape (an mx or NumPy array, nested lists) as float32."""
    try:
        import mlx.core as mx

        if isinstance(value, mx.array):
            value = np.array(value.astype(mx.float32))
        if isinstance(value, (str, bytes)):
            raise TypeError
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} must be numbers (an array, or nested lists of one shape), got {value!r:.60}.") from None


# ---------------------------------------------------------------- the views


def token_heatmap_html(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    values: Any,
    labels: Sequence[str] | None = None,
    title: str = "",
    scale: float | Sequence[float] | None = None,
) -> str:
    """Values over tokens: each token coloured by its value, hover for the number.

    - one text: ``tokens`` (T strings), ``values`` (T,) or (F, T) with F ``labels`` (e.g.
      SAE features) chosen from a menu;
    - several texts (e.g. a feature's top examples): ``tokens`` a list of N token lists,
      ``values`` a list of N arrays (T_n,), or of (F, T_n) with ``labels``; each text is a line.

    Colours: blue for positive, red for negative, full colour at ``scale`` (one |value| for
    every row, or one per row). By default that is the largest |value| of the row, leaving out
    the first token of a text where it is an outlier (more than ``OUTLIER`` times every other
    token's |value|, as the attention sink's activations are), so that one token does not pale
    all the others; tokens past the scale show at full colour, dashed, and the legend names
    them. Returns an HTML fragment (``write_html(path, fragment)`` writes a page).
    """
    where = "token_heatmap_html"
    tokens, title = _items(tokens, "tokens", where), _text(title, "title", where)
    several = len(tokens) > 0 and not isinstance(tokens[0], str)
    texts = [[str(t) for t in _items(text, "each text's tokens", where)] for text in tokens] if several else [list(map(str, tokens))]
    rows = _items(values, "values (one array per text)", where) if several else [values]
    if len(rows) != len(texts):
        raise InputError(f"token_heatmap_html: {len(texts)} texts but {len(rows)} value arrays.")
    arrays = [_floats(r, "values", where) for r in rows]
    arrays = [a[None] if a.ndim == 1 else a for a in arrays]
    for text, a in zip(texts, arrays):
        if a.ndim != 2 or a.shape[1] != len(text):
            raise InputError(
                f"token_heatmap_html: values of shape {a.shape} for {len(text)} tokens; give (T,) "
                "or (F, T) per text, T its number of tokens."
            )
    n_rows = {a.shape[0] for a in arrays}
    if len(n_rows) != 1:
        raise InputError(f"token_heatmap_html: every text needs the same number of value rows, got {sorted(n_rows)}.")
    (n_features,) = n_rows
    labels = [str(label) for label in _items(labels, "labels", where)] if labels is not None else [f"row {i}" for i in range(n_features)]
    if len(labels) != n_features:
        raise InputError(f"token_heatmap_html: {n_features} value rows but {len(labels)} labels.")
    joined = np.concatenate(arrays, axis=1) if arrays else np.zeros((n_features, 0), np.float32)
    if not np.isfinite(joined).all():
        raise InputError("token_heatmap_html: values must be finite (no NaN or inf).")
    starts = np.cumsum([0] + [len(t) for t in texts[:-1]]) if texts else np.zeros(0, int)
    if scale is None:
        scales = [_robust_scale(np.abs(row), starts) for row in joined]
    else:
        scales = [float(v) for v in np.broadcast_to(np.asarray(scale, dtype=np.float64), (n_features,))]
    return fragment("tokens", {
        "title": title,
        "texts": texts,
        "labels": labels,
        "values": encode_values(joined),  # (F, sum of T_n)
        "scale": scales,
        "clipped": [np.flatnonzero(np.abs(row) > s * (1 + 1e-3)).tolist() for row, s in zip(joined, scales)],
        "outliers": scale is None,
    })


OUTLIER = 4.0  # a first token this many times larger than every other token is left out of the scale


def _robust_scale(magnitudes: np.ndarray, starts: np.ndarray) -> float:
    """The |value| of full colour for one row of |values|: the largest, unless the first
    tokens of the texts (``starts``) are outliers (see :func:`token_heatmap_html`)."""
    if magnitudes.size == 0:
        return 0.0
    rest = np.delete(magnitudes, starts)
    largest_rest = float(rest.max()) if rest.size else 0.0
    firsts = magnitudes[starts]
    if largest_rest > 0 and (firsts > OUTLIER * largest_rest).any():
        return max(largest_rest, float(firsts[firsts <= OUTLIER * largest_rest].max(initial=0.0)))
    return float(magnitudes.max())


def attention_html(
    tokens: Sequence[str],
    patterns: Any,
    layers: Sequence[int],
    heads: Sequence[int],
    title: str = "",
) -> str:
    """Attention patterns (L, H, T, T), rows attending to columns: pick a layer and a head
    (or their mean); hover a token to see where it attends (or, switched, what attends to it);
    click to keep it. Weights are stored as uint8."""
    where = "attention_html"
    tokens, title = _items(tokens, "tokens", where), _text(title, "title", where)
    layers, heads = _ints(layers, "layers", where), _ints(heads, "heads", where)
    array = _floats(patterns, "patterns", where)
    if array.ndim != 4 or array.shape[:2] != (len(layers), len(heads)) or array.shape[2:] != (len(tokens),) * 2:
        raise InputError(
            f"attention_html: patterns of shape {array.shape} for {len(layers)} layers, {len(heads)} "
            f"heads and {len(tokens)} tokens; expected (layers, heads, T, T)."
        )
    return fragment("attention", {
        "title": title,
        "tokens": [str(t) for t in tokens],
        "layers": [int(i) for i in layers],
        "heads": [int(h) for h in heads],
        "patterns": encode_unit(array),
    })


def lens_html(
    tokens: Sequence[str],
    layers: Sequence[int],
    predictions: Sequence[Sequence[Sequence[tuple[int, float, str]]]],
    title: str = "",
    metrics: Sequence[dict[str, Any]] = (),
) -> str:
    """A logit lens grid (layers x positions): each cell shows the top token, coloured by its
    probability; hover (or click) a cell for its top-k list. ``predictions[l][t]`` is the
    top-k list of ``(token_id, probability, text)`` at layer ``layers[l]``, position t.

    ``metrics``: more numbers per cell, each ``{"name": ..., "values": (layers, positions),
    "unit": " nats", "log": False, "integer": False}``, listed with a cell's top-k and selectable
    as the cells' colour (``log``: coloured on a log scale, e.g. a rank)."""
    where = "lens_html"
    tokens, title = _items(tokens, "tokens", where), _text(title, "title", where)
    layers = _ints(layers, "layers", where)
    vocab: dict[str, int] = {}
    try:
        rows = _items(predictions, "predictions", where)
        if len(rows) != len(layers) or any(len(_items(row, "a layer's predictions", where)) != len(tokens) for row in rows):
            raise ValueError
        ids = [[[vocab.setdefault(str(text), len(vocab)) for _, _, text in cell] for cell in row] for row in rows]
        probs = [[[float(p) for _, p, _ in cell] for cell in row] for row in rows]
    except (TypeError, ValueError):
        raise InputError(
            f"lens_html: predictions must be, for each of the {len(layers)} layers and each of the {len(tokens)} "
            "positions, a list of (token_id, probability, text)."
        ) from None
    k = max((len(cell) for row in ids for cell in row), default=0)
    ids_array = np.full((len(layers), len(tokens), k), -1, dtype=np.int32)
    probs_array = np.zeros((len(layers), len(tokens), k), dtype=np.float32)
    for li, row in enumerate(ids):
        for t, cell in enumerate(row):
            ids_array[li, t, : len(cell)] = cell
            probs_array[li, t, : len(cell)] = probs[li][t]
    if not np.isfinite(probs_array).all():
        raise InputError("lens_html: probabilities must be finite.")
    extra = []
    for metric in metrics:
        values = np.asarray(metric["values"], dtype=np.float32)
        if values.shape != (len(layers), len(tokens)):
            raise InputError(f"lens_html: metric {metric['name']!r} has shape {values.shape}; "
                             f"expected (layers, positions) = {(len(layers), len(tokens))}.")
        extra.append({"name": str(metric["name"]), "unit": str(metric.get("unit", "")), "log": bool(metric.get("log")),
                      "integer": bool(metric.get("integer")), "values": encode_values(np.nan_to_num(values))})
    return fragment("lens", {
        "title": title,
        "tokens": [str(t) for t in tokens],
        "layers": [int(i) for i in layers],
        "vocab": list(vocab),
        "ids": encode_ids(ids_array),
        "probs": encode_unit(probs_array),
        "metrics": extra,
    })


def heatmap_html(
    rows: Sequence[str],
    columns: Sequence[str],
    values: Any,
    title: str = "",
    subtitle: str = "",
    unit: str = "",
    row_name: str = "row",
    column_name: str = "column",
    flip: bool = False,
    scale: float | None = None,
    quote_columns: bool = False,
) -> str:
    """A labelled (rows, columns) heatmap, diverging around 0, hover for the value: patching
    recovery, head scores, per-layer metrics. ``flip`` draws the first row at the bottom (layer
    0 below, as the residual stream flows upwards); ``scale`` is the |value| of full colour
    (default: the largest |value|); ``quote_columns`` shows column labels quoted (tokens)."""
    where = "heatmap_html"
    rows, columns = _items(rows, "rows", where), _items(columns, "columns", where)
    for what, value in (("title", title), ("subtitle", subtitle), ("unit", unit), ("row_name", row_name), ("column_name", column_name)):
        _text(value, what, where)
    if scale is not None and not (isinstance(scale, (int, float, np.floating)) and not isinstance(scale, bool) and np.isfinite(scale)):
        raise InputError(f"heatmap_html: scale={scale!r:.40} must be a finite number, or None.")
    array = _floats(values, "values", where)
    if array.shape != (len(rows), len(columns)):
        raise InputError(f"heatmap_html: values of shape {array.shape} for {len(rows)} rows x {len(columns)} columns.")
    finite = array[np.isfinite(array)]
    return fragment("heatmap", {
        "title": title,
        "subtitle": subtitle,
        "unit": unit,
        "rows": [str(r) for r in rows],
        "columns": [str(c) for c in columns],
        "row_name": row_name,
        "column_name": column_name,
        "values": encode_values(np.nan_to_num(array)),
        "scale": float(scale) if scale is not None else float(np.abs(finite).max()) if finite.size else 0.0,
        "flip": bool(flip),
        "quote_columns": bool(quote_columns),
    })


def graph_html(
    rows: Sequence[str],
    columns: Sequence[str],
    node_row: Sequence[int],
    node_column: Sequence[int],
    node_kind: Sequence[str],
    labels: Sequence[str],
    edges: tuple[Any, Any, Any],
    node_size: Any = None,
    details: Sequence[str] | None = None,
    title: str = "",
    subtitle: str = "",
    legend: str = "",
) -> str:
    """A layered node-link graph (a circuit): node ``i`` at row ``node_row[i]`` (0 at the
    bottom) and column ``node_column[i]`` (a token position), drawn by ``node_kind[i]``
    ("feature": circle, "error": square, "token": rounded square, "logit": diamond) with radius
    by ``node_size[i]`` in [0, 1]; ``edges`` = (sources, targets, weights), drawn by |weight|,
    blue positive, red negative. Hovering a node shows ``labels[i]``, ``details[i]`` (text,
    several lines) and its strongest edges; clicking it lights its neighbours."""
    n = len(labels)
    if not (len(node_row) == len(node_column) == len(node_kind) == n):
        raise InputError(f"graph_html: {len(node_row)} rows, {len(node_column)} columns, {len(node_kind)} kinds for {n} labels.")
    sources, targets, weights = (np.asarray(a) for a in edges)
    kinds = sorted(set(node_kind))
    size = np.zeros(n, dtype=np.float32) if node_size is None else np.clip(np.asarray(node_size, dtype=np.float32), 0, 1)
    return fragment("graph", {
        "title": title,
        "subtitle": subtitle,
        "legend": legend,
        "rows": [str(r) for r in rows],
        "columns": [str(c) for c in columns],
        "kinds": kinds,
        "node_row": encode_ids(node_row),
        "node_col": encode_ids(node_column),
        "node_kind": encode_ids([kinds.index(k) for k in node_kind]),
        "node_size": encode_values(size),
        "labels": [str(x) for x in labels],
        "details": [str(x) for x in (details or [""] * n)],
        "edge_source": encode_ids(sources),
        "edge_target": encode_ids(targets),
        "edge_weight": encode_values(np.asarray(weights, dtype=np.float32)),
    })
