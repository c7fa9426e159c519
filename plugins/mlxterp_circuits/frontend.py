"""Graph files for circuit-tracer's local frontend and Neuronpedia: ``<slug>.json`` with
``metadata``, ``qParams``, ``nodes`` and ``links`` of the pruned graph, and the index
``graph-metadata.json`` (``{"graphs": [metadata, ...]}``, one entry per slug), as
circuit-tracer's ``create_graph_files`` writes them (its ``utils/create_graph_files.py`` and
``frontend/graph_models.py``).

Node ids: a feature ``"{layer}_{feature}_{pos}"`` (``feature`` = Cantor pairing of layer and
feature index), a token ``"E_{token_id}_{pos}"``, a logit ``"{n_layers + 1}_{token_id}_{pos}"``.
Error nodes: ``error_ids="new"`` (default) writes ``"{layer}_-1_{pos}"`` (jsNodeId
``"{layer}_-1-{pos}"``), circuit-tracer's ids after its 0.5.0 release, which never collide with
a feature's; ``error_ids="legacy"`` writes 0.5.0's ``"0_{layer}_{pos}"`` (jsNodeId
``"{layer}_{pos}-0"``), which collides with layer-0 features ``layer`` at ``pos``.
"""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path
from typing import Any

from mlxterp.plugin import FileFormatError, OptionError, WriteError, write_atomic

INDEX = "graph-metadata.json"
ERROR_IDS = ("new", "legacy")


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(graph, slug: str, *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
               scan: str | None = None, error_ids: str = "new") -> dict[str, Any]:
    """The frontend's graph document (a dict) of ``graph`` pruned at the thresholds."""
    if error_ids not in ERROR_IDS:
        raise OptionError(f"error_ids={error_ids!r}: use 'new' ('{{layer}}_-1_{{pos}}') or 'legacy' (circuit-tracer 0.5.0's '0_{{layer}}_{{pos}}').")
    pruned = graph.prune(node_threshold, edge_threshold)
    cumulative = pruned.cumulative_scores
    nodes: dict[int, dict[str, Any]] = {}
    L = graph.n_layers
    for index in map(int, pruned.node_mask.nonzero()[0]):
        node = graph.node(index)
        kind = node["kind"]
        influence = float(cumulative[index])
        if kind == "feature":
            layer, pos, feat = node["layer"], node["position"], node["feature"]
            nodes[index] = _node(f"{layer}_{feat}_{pos}", cantor(layer, feat), str(layer), pos, "cross layer transcoder",
                                 f"{layer}_{feat}-0", influence=influence, activation=node["activation"])
        elif kind == "error":
            layer, pos = node["layer"], node["position"]
            ids = (f"{layer}_-1_{pos}", f"{layer}_-1-{pos}") if error_ids == "new" else (f"0_{layer}_{pos}", f"{layer}_{pos}-0")
            nodes[index] = _node(ids[0], -1, str(layer), pos, "mlp reconstruction error", ids[1], influence=influence)
        elif kind == "token":
            pos, token = node["position"], node["token"]
            nodes[index] = _node(f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}", influence=influence)
        else:
            pos, token, p = node["position"], node["token"], node["probability"]
            nodes[index] = _node(f"{L + 1}_{token}_{pos}", token, str(L + 1), pos, "logit", f"L_{token}-{pos}",
                                 token_prob=p, is_target_logit=index == graph.logit_start,
                                 clerp=f'Output "{node["text"]}" (p={p:.3f})')
    targets, sources, weights = pruned.edges()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(w)}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist()) if s in nodes and t in nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan or graph.info.get("scan") or graph.info.get("model") or "mlxterp",
        "transcoder_list": [],
        "prompt_tokens": list(graph.token_strings),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def _node(node_id, feature, layer, ctx_idx, feature_type, js_id, *, token_prob=0.0, is_target_logit=False,
          clerp="", influence=None, activation=None) -> dict[str, Any]:
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": int(ctx_idx),
            "feature_type": feature_type, "token_prob": float(token_prob), "is_target_logit": bool(is_target_logit),
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id, "clerp": clerp,
            "influence": influence, "activation": activation}


def write_graph_files(graph, folder: str | Path, *, slug: str | None = None, node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, scan: str | None = None, error_ids: str = "new") -> Path:
    """Write ``<slug>.json`` into ``folder`` (made if missing) and add or replace its entry in
    ``folder/graph-metadata.json`` (under a lock: two jobs writing graphs into one folder keep
    both entries). Returns the graph file's path."""
    slug = slug or "graph"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", slug) or slug.startswith("."):
        raise OptionError(f"slug={slug!r}: use letters, digits, '.', '_' and '-' (it names {slug}.json and a frontend URL).")
    document = graph_json(graph, slug, node_threshold=node_threshold, edge_threshold=edge_threshold, scan=scan,
                          error_ids=error_ids)
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"{folder} is a file: to_json writes a folder of graph files ({slug}.json and {INDEX}).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"could not make the folder {folder} ({e.strerror or e}).") from e
    path = write_atomic(folder / f"{slug}.json", json.dumps(document, indent=2, ensure_ascii=False))  # field order as circuit-tracer's
    _add_to_index(folder, document["metadata"])
    return path


def _add_to_index(folder: Path, metadata: dict[str, Any]) -> None:
    index = folder / INDEX
    try:
        lock = open(folder / f".{INDEX}.lock", "a+")
    except OSError as e:
        raise WriteError(f"could not lock {index} ({e.strerror or e}).") from e
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        graphs = []
        if index.exists():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                graphs = data["graphs"]
                if not isinstance(graphs, list):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise FileFormatError(f"{index} is not a graph index ({{\"graphs\": [...]}}); move it away or choose another folder.") from None
        graphs = [g for g in graphs if not (isinstance(g, dict) and g.get("slug") == metadata["slug"])]
        graphs.append(metadata)
        write_atomic(index, json.dumps({"graphs": graphs}, indent=2, ensure_ascii=False))


__all__ = ["graph_json", "write_graph_files", "cantor", "ERROR_IDS"]
