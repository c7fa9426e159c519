"""The attribution graph result: its nodes and edges, influence, pruning and scores, saved and
loaded, as circuit-tracer defines them (its ``graph.py``).

Only feature and logit nodes have inputs, so the graph keeps just their rows (``rows``:
selected features in active-feature order, then the logits): lossless, and a fraction of the
square matrix for long prompts (error and token nodes grow with layers x positions).
``graph.adjacency`` gives the square matrix when wanted. Influence, pruning and scores run on
the rows directly; they equal circuit-tracer's on its square matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from mlxterp.plugin import Display, FileFormatError, Rounded, graph_html, read_safetensors, short, write_atomic

from .replacement import GraphError

FORMAT = "mlxterp.AttributionGraph"
VERSION = 1


@attrs.define(eq=False, repr=False)
class AttributionGraph(Display):
    """A prompt's attribution graph (see the module doc).

    Attributes:
        tokens, prompt, token_strings: the prompt as ids, decoded, and token by token.
        n_layers: layers of the model (error nodes are ``n_layers x n_pos``).
        active_features: (n_active, 3) int32 (layer, position, feature), lexicographic; their
            ``activation_values`` (n_active,) float32.
        selected_features: indices into ``active_features`` of the feature nodes.
        logit_tokens, logit_probabilities, logit_strings: the logit targets, most probable first.
        rows: (n_selected + n_logits, n_nodes) float32, the inputs of the feature nodes then of
            the logit nodes, columns in node order.
        settings: the arguments the graph was computed with; info: model and transcoders.
        feature_details: what is known of features, by ``"{layer}_{feature}"``: their logit
            effects and top activating contexts (:meth:`describe_features`), shown in the view.
    """

    tokens: list[int]
    prompt: str
    token_strings: list[str]
    n_layers: int
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    logit_strings: list[str]
    rows: np.ndarray
    settings: dict[str, Any] = attrs.field(factory=dict)
    info: dict[str, Any] = attrs.field(factory=dict)
    feature_details: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    # -- sizes and node order ----------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_selected(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_selected + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def error_start(self) -> int:
        return self.n_selected

    @property
    def token_start(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def row_nodes(self) -> np.ndarray:
        """The node of each of ``rows``: the feature nodes, then the logit nodes."""
        return np.concatenate([np.arange(self.n_selected), np.arange(self.logit_start, self.n_nodes)])

    @property
    def features(self) -> np.ndarray:
        """(n_selected, 3) (layer, position, feature) of the feature nodes, in node order."""
        return self.active_features[self.selected_features]

    @property
    def adjacency(self) -> np.ndarray:
        """The square (n_nodes, n_nodes) matrix, rows targets and columns sources, as
        circuit-tracer's ``Graph.adjacency_matrix`` (error and token rows are zero)."""
        out = np.zeros((self.n_nodes, self.n_nodes), dtype=np.float32)
        out[self.row_nodes] = self.rows
        return out

    def logit_weights(self) -> np.ndarray:
        """(n_nodes,) the logit probabilities on the logit nodes, zero elsewhere."""
        w = np.zeros(self.n_nodes, dtype=np.float32)
        w[self.logit_start:] = self.logit_probabilities
        return w

    def node(self, index: int) -> dict[str, Any]:
        """What node ``index`` is: ``{"kind": "feature", "layer", "position", "feature",
        "activation"}``, ``{"kind": "error", "layer", "position"}``, ``{"kind": "token",
        "position", "token"}`` or ``{"kind": "logit", "token", "probability"}``."""
        n = self.n_nodes
        if not -n <= index < n:
            raise GraphError(f"node {index} is out of range: this graph has {n} nodes (0..{n - 1}).")
        index %= n
        if index < self.error_start:
            k = int(self.selected_features[index])
            layer, pos, feat = (int(v) for v in self.active_features[k])
            return {"kind": "feature", "layer": layer, "position": pos, "feature": feat,
                    "activation": float(self.activation_values[k])}
        if index < self.token_start:
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return {"kind": "error", "layer": layer, "position": pos}
        if index < self.logit_start:
            pos = index - self.token_start
            return {"kind": "token", "position": pos, "token": int(self.tokens[pos]), "text": self.token_strings[pos]}
        k = index - self.logit_start
        return {"kind": "logit", "token": int(self.logit_tokens[k]), "text": self.logit_strings[k],
                "probability": float(self.logit_probabilities[k]), "position": self.n_pos - 1}

    def label(self, index: int) -> str:
        """A short label of node ``index``: ``L3 #1234 @5 'cat'``, ``err L3 @5``, ``tok 'cat' @5``,
        ``logit 'dog' (p=0.231)``."""
        node = self.node(index)
        kind = node["kind"]
        if kind == "feature":
            return f"L{node['layer']} #{node['feature']} @{node['position']} {self.token_strings[node['position']]!r}"
        if kind == "error":
            return f"err L{node['layer']} @{node['position']}"
        if kind == "token":
            return f"tok {node['text']!r} @{node['position']}"
        return f"logit {node['text']!r} (p={node['probability']:.3f})"

    def feature_node(self, layer: int, position: int, feature: int) -> int:
        """The node index of a selected feature; a GraphError if it is not a node."""
        hits = np.flatnonzero((self.features == np.array([layer, position, feature])).all(axis=1))
        if len(hits) == 0:
            active = (self.active_features == np.array([layer, position, feature])).all(axis=1).any()
            why = "active but not selected (raise max_feature_nodes)" if active else "not active on this prompt"
            raise GraphError(f"feature {feature} of layer {layer} at position {position} is {why}.")
        return int(hits[0])

    # -- influence, pruning, scores ------------------------------------------------------------

    def _normalized(self, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.abs(self.rows if rows is None else rows)
        return rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-10)

    def influence(self) -> np.ndarray:
        """(n_nodes,) each node's influence on the logits: ``w (A + A^2 + ...)`` with ``A``
        the row-normalised absolute adjacency and ``w`` the logit probabilities
        (circuit-tracer's ``compute_node_influence``)."""
        return _influence(self._normalized(), self.row_nodes, self.logit_weights())

    def scores(self) -> GraphScores:
        """The replacement and completeness scores (circuit-tracer's ``compute_graph_scores``)."""
        normed = self._normalized()
        w = self.logit_weights()
        influence = _influence(normed, self.row_nodes, w)
        tokens = float(influence[self.token_start:self.logit_start].sum(dtype=np.float32))
        errors = float(influence[self.error_start:self.token_start].sum(dtype=np.float32))
        non_error = np.ones(self.n_nodes, dtype=np.float32)
        non_error[self.row_nodes] = 1 - normed[:, self.error_start:self.token_start].sum(axis=1)
        output = influence + w
        completeness = float((non_error * output).sum(dtype=np.float32) / output.sum(dtype=np.float32))
        return GraphScores(replacement=Rounded(tokens / (tokens + errors)), completeness=Rounded(completeness))

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
        """Keep the nodes that make ``node_threshold`` of the total influence on the logits
        (tokens and logits always), then the edges that make ``edge_threshold`` of the
        influence among them, then drop features and errors left without an outgoing edge and
        features without an incoming one, until nothing changes (circuit-tracer's
        ``prune_graph``). Returns the masks and the pruned graph."""
        node_threshold = _threshold(node_threshold, "node_threshold")
        edge_threshold = _threshold(edge_threshold, "edge_threshold")
        n, k, T = self.n_nodes, self.n_logits, self.n_pos
        row_nodes, w = self.row_nodes, self.logit_weights()
        influence = _influence(self._normalized(), row_nodes, w)
        node_mask = influence >= _find_threshold(influence, node_threshold, n)
        node_mask[n - k - T:] = True

        pruned = self.rows.copy()
        pruned[~node_mask[row_nodes]] = 0
        pruned[:, ~node_mask] = 0
        normed = self._normalized(pruned)
        pruned_influence = _influence(normed, row_nodes, w) + w
        scores = normed * pruned_influence[row_nodes][:, None]
        cut = _find_threshold(scores.ravel(), edge_threshold, n * n)
        edge_rows = scores >= cut  # the rows of feature and logit nodes
        other_rows = np.zeros(n, dtype=bool)  # error and token rows: all scores 0, kept only by a cut of 0
        if cut <= 0:  # every edge is kept (scores >= 0): nothing to clean up
            other_rows[:] = True
            other_rows[row_nodes] = False
        else:
            inner = n - k - T  # features and errors need an outgoing edge, features an incoming one
            before = node_mask.copy()
            node_mask[:inner] &= edge_rows[:, :inner].any(axis=0)
            node_mask[:self.n_selected] &= edge_rows[:self.n_selected].any(axis=1)
            while not np.array_equal(node_mask, before):
                before[:] = node_mask
                edge_rows[~node_mask[row_nodes]] = False
                edge_rows[:, ~node_mask] = False
                node_mask[:inner] &= edge_rows[:, :inner].any(axis=0)
                node_mask[:self.n_selected] &= edge_rows[:self.n_selected].any(axis=1)

        order = np.argsort(-influence, kind="stable")
        cumulative = np.zeros(n, dtype=np.float32)
        cumulative[order] = np.cumsum(influence[order], dtype=np.float32) / influence.sum(dtype=np.float32)
        return PrunedGraph(self, node_mask, edge_rows, cumulative, node_threshold, edge_threshold, other_rows)

    def describe_features(self, model, transcoders, **options) -> AttributionGraph:
        """Find what the graph's features do (their logit effects and top activating contexts
        in a corpus) for its view and saved file; see :func:`mlxterp_circuits.describe_features`."""
        from .features import describe_features

        return describe_features(self, model, transcoders, **options)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the graph to one safetensors file (atomically); :meth:`load` reads it."""
        meta = {"format": FORMAT, "version": VERSION, "tokens": list(map(int, self.tokens)), "prompt": self.prompt,
                "token_strings": self.token_strings, "n_layers": self.n_layers, "logit_strings": self.logit_strings,
                "settings": self.settings, "info": self.info, "feature_details": self.feature_details}
        arrays = {
            "active_features": mx.array(self.active_features.astype(np.int32)),
            "activation_values": mx.array(self.activation_values.astype(np.float32)),
            "selected_features": mx.array(self.selected_features.astype(np.int32)),
            "logit_tokens": mx.array(self.logit_tokens.astype(np.int32)),
            "logit_probabilities": mx.array(self.logit_probabilities.astype(np.float32)),
            "rows": mx.array(self.rows.astype(np.float32)),
            "meta": mx.array(np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)),
        }
        path = Path(path).expanduser()
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        return write_atomic(path, lambda tmp: mx.save_safetensors(str(tmp), arrays))

    @classmethod
    def load(cls, path: str | Path) -> AttributionGraph:
        """A graph written by :meth:`save`; any other file is a FileFormatError."""
        expected = "an attribution graph saved by graph.save()"
        tensors = read_safetensors(path, expected)
        try:
            meta = json.loads(bytes(np.array(tensors["meta"], dtype=np.uint8)).decode("utf-8"))
        except (KeyError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FileFormatError(f"{path} is not {expected}.")
        if meta.get("version", 0) > VERSION:
            raise FileFormatError(f"{path} was written by a newer mlxterp (graph format {meta['version']}); upgrade mlxterp.")
        try:
            graph = cls(
                tokens=meta["tokens"], prompt=meta["prompt"], token_strings=meta["token_strings"],
                n_layers=int(meta["n_layers"]), logit_strings=meta["logit_strings"],
                settings=meta.get("settings", {}), info=meta.get("info", {}),
                feature_details=meta.get("feature_details", {}),
                **{name: np.array(tensors[name]) for name in ("active_features", "activation_values", "selected_features",
                                                              "logit_tokens", "logit_probabilities", "rows")},
            )
        except KeyError as e:
            raise FileFormatError(f"{path} is not {expected}: {e} is missing.") from None
        if graph.rows.shape != (graph.n_selected + graph.n_logits, graph.n_nodes):
            raise FileFormatError(f"{path} is corrupt: its edge rows have shape {graph.rows.shape}, its nodes say "
                                  f"({graph.n_selected + graph.n_logits}, {graph.n_nodes}).")
        return graph

    def to_json(self, path: str | Path, slug: str | None = None, *, node_threshold: float = 0.8,
                edge_threshold: float = 0.98, scan: str | None = None, error_ids: str = "new") -> Path:
        """Write the graph files circuit-tracer's frontend and Neuronpedia open: ``<slug>.json``
        and the index ``graph-metadata.json`` in folder ``path`` (see :mod:`.frontend`)."""
        from .frontend import write_graph_files

        return write_graph_files(self, path, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold,
                                 scan=scan, error_ids=error_ids)

    # -- display -------------------------------------------------------------------------------

    def _view(self) -> str | None:
        return self.prune()._view()

    def _summary(self) -> str:
        top = self.logit_strings[0] if self.logit_strings else "?"
        cap = self.settings.get("max_feature_nodes")
        features = f"{self.n_selected:,} of {len(self.active_features):,} active features" if cap else f"{self.n_selected:,} features"
        return (f"attribution graph of {self.n_pos} tokens: {features}, {self.n_logits} logits "
                f"(top {top!r} p={float(self.logit_probabilities[0]):.3f}), {self.n_nodes:,} nodes")


@attrs.define(repr=False)
class GraphScores(Display):
    """How much of the graph's influence on the logits goes through features rather than
    error nodes: ``replacement`` (from the tokens, all paths) and ``completeness`` (each
    node's inputs, weighted by its influence); 1 is a graph without error."""

    replacement: float
    completeness: float

    def _summary(self) -> str:
        return f"graph scores: replacement {self.replacement:.4f}, completeness {self.completeness:.4f}"


class PrunedGraph(Display):
    """A pruned attribution graph: ``node_mask`` (n_nodes,), ``edge_mask`` (n_nodes, n_nodes)
    (rows targets), ``cumulative_scores`` (each node's cumulative influence fraction at its
    rank: smaller is more important), and ``graph``: the graph with only the kept feature
    nodes and kept edges (every other node order as before)."""

    def __init__(self, source: AttributionGraph, node_mask, edge_rows, cumulative, node_threshold, edge_threshold, other_rows):
        self.source, self.node_mask, self.cumulative_scores = source, node_mask, cumulative
        self.node_threshold, self.edge_threshold = node_threshold, edge_threshold
        self._edge_rows, self._other_rows = edge_rows, other_rows

    @property
    def edge_mask(self) -> np.ndarray:
        mask = np.zeros((self.source.n_nodes, self.source.n_nodes), dtype=bool)
        mask[self._other_rows] = True
        mask[self.source.row_nodes] = self._edge_rows
        return mask

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept edges: (targets, sources, weights), node indices of the full graph."""
        rows, sources = np.nonzero(self._edge_rows)
        targets = self.source.row_nodes[rows]
        return targets, sources, self.source.rows[rows, sources]

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self._edge_rows.sum()) + int(self._other_rows.sum()) * self.source.n_nodes

    @property
    def graph(self) -> AttributionGraph:
        g = self.source
        keep = self.node_mask[: g.n_selected]
        columns = np.concatenate([np.flatnonzero(keep), np.arange(g.n_selected, g.n_nodes)])
        row_keep = np.concatenate([keep, np.ones(g.n_logits, dtype=bool)])
        rows = np.where(self._edge_rows, g.rows, 0)[row_keep][:, columns]
        return attrs.evolve(g, selected_features=g.selected_features[keep], rows=np.ascontiguousarray(rows),
                            settings={**g.settings, "pruned": [self.node_threshold, self.edge_threshold]})

    def _view(self) -> str:
        """The kept nodes by layer and position, the kept edges (see ``graph_html``)."""
        g = self.source
        kept = np.flatnonzero(self.node_mask)
        where = {int(k): i for i, k in enumerate(kept)}
        rows, columns, kinds, labels, details, sizes = [], [], [], [], [], []
        influence = 1 - self.cumulative_scores  # 1 for the most influential
        for k in kept:
            node = g.node(int(k))
            kind = node["kind"]
            kinds.append(kind)
            columns.append(node["position"])
            rows.append({"token": 0, "logit": g.n_layers + 1}.get(kind, node.get("layer", 0) + 1))
            labels.append(g.label(int(k)))
            sizes.append(float(node["probability"]) if kind == "logit" else float(influence[k]))
            lines = []
            if kind == "feature":
                lines.append(f"activation {node['activation']:.3g}, cumulative influence {self.cumulative_scores[k]:.3f}")
                lines += _detail_lines(g.feature_details.get(f"{node['layer']}_{node['feature']}"))
            elif kind == "error":
                lines.append(f"MLP reconstruction error, cumulative influence {self.cumulative_scores[k]:.3f}")
            details.append("\n".join(lines))
        targets, sources, weights = self.edges()
        inside = np.array([t in where and s in where for t, s in zip(targets.tolist(), sources.tolist())], dtype=bool)
        edges = (np.array([where[s] for s in sources[inside].tolist()], dtype=np.int64),
                 np.array([where[t] for t in targets[inside].tolist()], dtype=np.int64), weights[inside])
        layers = ["emb", *(f"L{layer}" for layer in range(g.n_layers)), "logit"]
        return graph_html(layers, g.token_strings, rows, columns, kinds, labels, edges, node_size=sizes, details=details,
                          title=f"Attribution graph: {short(g.prompt, 70)}",
                          subtitle=f"{self._summary()}; top logit {g.logit_strings[0]!r} p={float(g.logit_probabilities[0]):.3f}")

    def to_html(self, path, title: str | None = None):
        return super().to_html(path, title or "Attribution graph")

    def _summary(self) -> str:
        g = self.source
        features = int(self.node_mask[: g.n_selected].sum())
        errors = int(self.node_mask[g.error_start:g.token_start].sum())
        return (f"pruned graph (nodes {self.node_threshold:g}, edges {self.edge_threshold:g}): {self.n_nodes} of "
                f"{g.n_nodes:,} nodes ({features} features, {errors} errors, {g.n_pos} tokens, {g.n_logits} logits), "
                f"{self.n_edges:,} edges")


def _detail_lines(details: dict[str, Any] | None) -> list[str]:
    if not details:
        return []
    lines = []
    for key, title in (("top_logits", "promotes"), ("bottom_logits", "suppresses")):
        if details.get(key):
            lines.append(f"{title}: " + ", ".join(repr(t) for t, _ in details[key]))
    for value, text in details.get("examples", [])[:5]:
        lines.append(f"  {value:.3g}  {text}")
    return lines


def _influence(normed: np.ndarray, row_nodes: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """``w A + w A^2 + ...`` for the square matrix whose rows ``row_nodes`` are ``normed``
    (the others zero): until a term is exactly zero (the graph is acyclic)."""
    current = weights[row_nodes] @ normed
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current[row_nodes] @ normed
        total += current
    raise GraphError(f"influence did not vanish after {max_iter} steps: the graph has a cycle (is it an attribution graph?).")


def partial_influences(edges: np.ndarray, probabilities: np.ndarray, row_node: np.ndarray, max_iter: int = 128) -> np.ndarray:
    """circuit-tracer's ``compute_partial_influences``: the influence of every column node
    from the rows computed so far (rows normalised with a 1e-8 floor), seeded by the logit
    probabilities on the last columns."""
    normed = np.abs(edges)
    normed /= np.maximum(normed.sum(axis=1, keepdims=True), 1e-8)
    influence = np.zeros(edges.shape[1], dtype=np.float32)
    product = np.zeros(edges.shape[1], dtype=np.float32)
    product[-len(probabilities):] = probabilities
    for _ in range(max_iter):
        product = product[row_node] @ normed
        if not product.any():
            return influence
        influence += product
    raise GraphError("the partial influences did not converge in 128 steps.")


def _find_threshold(scores: np.ndarray, fraction: float, total: int) -> float:
    """The score at which the sorted scores (``total`` of them, the ones not given zero)
    reach ``fraction`` of their sum (circuit-tracer's ``find_threshold``)."""
    ordered = np.sort(scores.astype(np.float32))[::-1]
    cumulative = np.cumsum(ordered, dtype=np.float32) / ordered.sum(dtype=np.float32)
    index = int(np.searchsorted(cumulative, fraction))
    if index >= len(ordered):  # in the zeros not given, or the last of all
        return 0.0 if total > len(ordered) else float(ordered[-1])
    return float(ordered[index])


def _threshold(value, option: str) -> float:
    from mlxterp.plugin import options

    value = options.number(value, option)
    if not 0 < value <= 1:
        raise options.OptionError(f"{option}={value!r}: give a fraction of the influence in (0, 1].")
    return value


__all__ = ["AttributionGraph", "GraphScores", "PrunedGraph", "partial_influences"]
