"""Attribution graphs (issue 24): equal to circuit-tracer's edge by edge on its own reference
outputs (a tiny random HF Llama with GQA and non-unit norm gains, random PLT, skip-PLT and CLT
sets: tests/fixtures/circuit_tracer), checked independently of any implementation by an
intervention oracle on every family and on the real model, pruned and scored as circuit-tracer
does, written as its frontend's graph files, saved and loaded, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import family_names, random_transcoders, tiny_family

import mlxterp
from mlxterp import InterpretableModel
from mlxterp_circuits import AttributionGraph, GraphError
from mlxterp_circuits.replacement import Replacement

FIXTURES = Path(__file__).parent / "fixtures" / "circuit_tracer"
REFERENCE = FIXTURES / "reference"
SETS = ["plt_jumprelu", "plt_skip_relu", "clt_jumprelu"]
RUNS = [("plt_jumprelu", "full"), ("plt_skip_relu", "full"), ("clt_jumprelu", "full"),
        ("plt_jumprelu", "top40"), ("clt_jumprelu", "top40")]
TOL = 1e-5  # float32: circuit-tracer's two backends agree to 2e-6 on these graphs


@pytest.fixture(scope="module")
def tiny():
    return mlxterp.load(FIXTURES / "model")


@pytest.fixture(scope="module")
def ids():
    return np.load(REFERENCE / "model_io.npz")["input_ids"].tolist()


def transcoders(name, model):
    return mlxterp.load_transcoders(FIXTURES / "transcoders" / name, model=model)


@pytest.fixture(scope="module")
def graphs(tiny, ids):
    made = {}
    for name, run in RUNS:
        ref = np.load(REFERENCE / f"{name}__{run}.npz")
        made[name, run] = tiny.attribution_graph(
            ids, transcoders(name, tiny), max_feature_nodes=None if run == "full" else int(ref["param_max_feature_nodes"]),
            batch_size=int(ref["param_batch_size"]), update_interval=int(ref["param_update_interval"]), progress=False)
    return made


def node_keys(graph_or_ref, n_layers=3) -> list[tuple]:
    """Every node by what it is, for aligning two graphs: ("f", layer, pos, feature),
    ("e", layer, pos), ("t", pos), ("l", token)."""
    if isinstance(graph_or_ref, AttributionGraph):
        g = graph_or_ref
        active, selected, T, logits = g.active_features, g.selected_features, g.n_pos, g.logit_tokens
    else:
        ref = graph_or_ref
        active, selected, T, logits = ref["active_features"], ref["selected_features"], len(ref["input_ids"]), ref["logit_token_ids"]
    keys = [("f", *map(int, active[k])) for k in selected]
    keys += [("e", layer, pos) for layer in range(n_layers) for pos in range(T)]
    keys += [("t", pos) for pos in range(T)]
    keys += [("l", int(t)) for t in logits]
    return keys


# ---------------------------------------------------------------- equal to circuit-tracer


@pytest.mark.parametrize("name,run", RUNS)
def test_the_graph_is_circuit_tracers_edge_by_edge(graphs, name, run):
    g, ref = graphs[name, run], np.load(REFERENCE / f"{name}__{run}.npz")
    assert np.array_equal(g.active_features, ref["active_features"])  # the active set, exactly
    np.testing.assert_allclose(g.activation_values, ref["activation_values"], atol=TOL)
    assert np.array_equal(g.selected_features, ref["selected_features"])  # influence-ordered selection (top40)
    assert g.logit_tokens.tolist() == ref["logit_token_ids"].tolist()
    np.testing.assert_allclose(g.logit_probabilities, ref["logit_probabilities"], atol=1e-6)
    ours, theirs = node_keys(g), node_keys(ref)
    assert sorted(ours) == sorted(theirs) and len(set(ours)) == len(ours)
    order = [ours.index(key) for key in theirs]
    A = g.adjacency[np.ix_(order, order)]
    assert A.shape == ref["adjacency_matrix"].shape
    assert np.abs(A - ref["adjacency_matrix"]).max() < TOL
    assert np.abs(ref["adjacency_matrix"]).max() > 2  # not a graph of zeros


@pytest.mark.parametrize("name,run", RUNS)
def test_pruning_and_scores_are_circuit_tracers(graphs, name, run):
    g, ref = graphs[name, run], np.load(REFERENCE / f"{name}__{run}.npz")
    np.testing.assert_allclose(g.influence(), ref["node_influence"], atol=1e-6)
    pruned = g.prune(0.8, 0.98)
    assert np.array_equal(pruned.node_mask, ref["node_mask"])
    assert np.array_equal(pruned.edge_mask, ref["edge_mask"])
    np.testing.assert_allclose(pruned.cumulative_scores, ref["cumulative_scores"], atol=1e-5)
    scores = g.scores()
    assert abs(scores.replacement - float(ref["replacement_score"])) < 1e-5
    assert abs(scores.completeness - float(ref["completeness_score"])) < 1e-5
    # the pruned graph keeps the kept features and edges, in the same node order
    small = pruned.graph
    assert small.n_selected == int(pruned.node_mask[: g.n_selected].sum())
    targets, sources, weights = pruned.edges()
    assert len(weights) == pruned.n_edges == int(ref["edge_mask"].sum())
    assert np.count_nonzero(small.rows) <= pruned.n_edges


@pytest.mark.parametrize("name", SETS)
def test_error_vectors_and_features_are_circuit_tracers(tiny, ids, name):
    setup = np.load(REFERENCE / f"{name}__setup.npz")
    rep = Replacement(tiny, transcoders(name, tiny), ids)
    np.testing.assert_allclose(np.array(rep.errors), setup["error_vectors"], atol=TOL, rtol=2e-6)  # |error| up to 15
    assert np.array_equal(rep.active, setup["active_features"])
    np.testing.assert_allclose(rep.logits, setup["logits"], atol=2e-5)


@pytest.mark.parametrize("name", SETS)
def test_feature_interventions_are_circuit_tracers(tiny, ids, name):
    ref = np.load(REFERENCE / f"{name}__interventions.npz")
    edits = [(int(a), int(b), int(c), float(v)) for a, b, c, v in ref["interventions"]]
    modes = {"direct": {"constrained": True}, "frozen_attention": {"constrained": False, "freeze_attention": True},
             "live": {"constrained": False, "freeze_attention": False}}
    for mode, options in modes.items():
        result = tiny.feature_intervention(ids, edits, transcoders(name, tiny), **options)
        np.testing.assert_allclose(result.logits, ref[f"{mode}_logits"], atol=2e-5)
        np.testing.assert_allclose(result.pre_activations, ref[f"{mode}_pre_acts"], atol=2e-5)
        assert np.abs(ref[f"{mode}_logits"] - result.clean_logits).max() > 0.3  # the edits did something


@pytest.mark.parametrize("name", ["plt_jumprelu", "clt_jumprelu"])
def test_the_json_is_what_create_graph_files_writes(graphs, name, tmp_path):
    g = graphs[name, "full"]
    slug = f"{name}-full"
    path = g.to_json(tmp_path, slug=slug, error_ids="legacy")
    ours, theirs = json.loads(path.read_text()), json.loads((FIXTURES / "graph_files" / f"{slug}.json").read_text())
    assert list(ours) == list(theirs) and ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]
    floats = ("influence", "activation", "token_prob")
    strip = lambda nodes: [{k: v for k, v in n.items() if k not in floats} for n in nodes]  # noqa: E731
    assert strip(ours["nodes"]) == strip(theirs["nodes"])
    for a, b in zip(ours["nodes"], theirs["nodes"]):
        assert list(a) == list(b)
        for key in floats:
            assert (a[key] is None) == (b[key] is None) and abs((a[key] or 0) - (b[key] or 0)) < 1e-5
    assert [(x["source"], x["target"]) for x in ours["links"]] == [(x["source"], x["target"]) for x in theirs["links"]]
    assert max(abs(x["weight"] - y["weight"]) for x, y in zip(ours["links"], theirs["links"])) < TOL
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index == {"graphs": [theirs["metadata"]]}
    # the new error ids: the same nodes, errors as "{layer}_-1_{pos}", never colliding with a feature
    new = json.loads(g.to_json(tmp_path, slug=slug).read_text())
    errors = [n for n in new["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and all(n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" for n in errors)
    assert all(n["jsNodeId"] == f"{n['layer']}_-1-{n['ctx_idx']}" for n in errors)
    assert len({n["node_id"] for n in new["nodes"]}) == len(new["nodes"])
    assert len(json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]) == 1  # the slug's entry replaced


# ---------------------------------------------------------------- the intervention oracle


class FrozenModel:
    """The local replacement model, written here from the definition alone (not from
    mlxterp_circuits): attention probabilities replaced by the clean ones, every norm's output
    recomputed from its live input with the clean denominator (by module type), every MLP
    output the clean one plus the change of the skip plus what is added; the targets are the
    selected features' pre-activations and the demeaned logits (before any soft-cap)."""

    def __init__(self, model, tc, ids):
        self.model, self.tc, self.ids = model, tc, ids
        arch = self.arch = model.architecture
        L = self.L = arch.n_layers
        self.mlp_sites = [arch.resolve(f"layers.{i}.mlp")[0].site for i in range(L)]
        attention = [arch.resolve(f"layers.{i}.attn.pattern")[0].site.split(":")[0] for i in range(L)]
        norms = [("model." + n, m) for n, m in model.model.named_modules() if "norm" in type(m).__name__.lower() and not list(m.children())]
        self.norms = [(p, m) for p, m in norms if not any(p == s or p.startswith(s + ".") for s in self.mlp_sites + attention)]
        capture = [f"layers.{i}.{s}" for i in range(L) for s in ("attn.pattern", tc.reads, "mlp")]
        self.clean = model.run([ids], capture=capture + [p + ":input" for p, _ in self.norms]).activations
        self.base = self.run({})

    @staticmethod
    def norm(module, x, x_clean):
        xc, x = x_clean.astype(mx.float32), x.astype(mx.float32)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if "LayerNorm" in type(module).__name__:
            scale = mx.rsqrt(((xc - xc.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + module.eps)
            out = (x - x.mean(-1, keepdims=True)) * scale
            out = out if weight is None else out * weight
            return out if bias is None else out + bias
        scale = mx.rsqrt((xc * xc).mean(-1, keepdims=True) + module.eps)
        return x * scale * (1 + weight if "gemma" in type(module).__module__ else weight)

    def run(self, add):
        tc, clean, L, box = self.tc, self.clean, self.L, {}
        interventions = {f"layers.{i}.attn.pattern": (lambda c: lambda p: c)(clean[f"layers.{i}.attn.pattern"]) for i in range(L)}
        reads = {self.arch.resolve(f"layers.{i}.{tc.reads}")[0].site: i for i in range(L)}

        def frozen(path, module):
            def fn(y):
                out = self.norm(module, box[path], clean[path + ":input"]).astype(y.dtype)
                if path in reads:
                    box["read", reads[path]] = out
                return out
            return fn

        for path, module in self.norms:
            interventions[path + ":input"] = (lambda p: lambda x: (box.__setitem__(p, x), x)[1])(path)
            interventions[path] = frozen(path, module)
        for site, i in reads.items():
            if site.endswith(":input"):
                interventions[site] = (lambda i: lambda x: (box.__setitem__(("read", i), x), x)[1])(i)

        def mlp(i):
            def fn(y):
                out = clean[f"layers.{i}.mlp"].astype(mx.float32)
                if tc.skip:
                    x_clean = clean[f"layers.{i}.{tc.reads}"].astype(mx.float32)
                    out = out + tc.skip_term(box["read", i].astype(mx.float32), i) - tc.skip_term(x_clean, i)
                return (out + add.get(("mlp", i), 0)).astype(y.dtype)
            return fn

        for i in range(L):
            interventions[f"layers.{i}.mlp"] = mlp(i)
        if "embed" in add:
            interventions["embed"] = lambda e: (e.astype(mx.float32) + add["embed"]).astype(e.dtype)
        out = self.model.run([self.ids], interventions=interventions, capture=[f"layers.{i}.{tc.reads}" for i in range(L)] + ["ln_final"])
        reads = np.stack([np.array(out.activations[f"layers.{i}.{tc.reads}"][0].astype(mx.float32)) for i in range(L)])
        logits = np.array(self.arch.unembed(out.activations["ln_final"][0, -1:], softcap=False).astype(mx.float32))[0]
        return reads, logits - logits.mean()

    def targets(self, graph, reads, logits):
        encoders = [np.array(w) for w in self.tc.W_enc]
        pre = [reads[layer, pos] @ encoders[layer][feat] for layer, pos, feat in graph.features]
        return np.concatenate([pre, logits[graph.logit_tokens]])

    def column(self, graph, rep, node_index):
        """How every target moves when node ``node_index``'s contribution is added again."""
        node, T = graph.node(node_index), len(self.ids)
        onehot = np.zeros((T, 1), np.float32)
        onehot[node["position"]] = 1
        add = {}
        if node["kind"] == "feature":
            q = self.tc.layers.index(node["layer"])
            rows = np.array(self.tc.W_dec[q][node["feature"]])
            for s in range(rows.shape[0]):  # a CLT feature writes every later layer
                add["mlp", node["layer"] + s] = mx.array(onehot * rows[s] * node["activation"])
        elif node["kind"] == "error":
            add["mlp", node["layer"]] = mx.array(onehot) * rep.errors[node["layer"]]
        else:
            add["embed"] = mx.array(onehot) * rep.embed.astype(mx.float32)
        return self.targets(graph, *self.run(add)) - self.targets(graph, *self.base)


def check_oracle(model, tc, ids, n_features=6, batch_size=16):
    graph = model.attribution_graph(ids, tc, batch_size=batch_size, progress=False)
    rep, frozen = Replacement(model, tc, graph.tokens), FrozenModel(model, tc, graph.tokens)
    T = graph.n_pos
    rng = np.random.default_rng(0)
    columns = [*rng.choice(graph.n_selected, min(n_features, graph.n_selected), replace=False),
               graph.error_start + T + 3, graph.error_start + (graph.n_layers - 1) * T + T - 1,
               graph.token_start + 2, graph.token_start]
    worst = max(np.abs(frozen.column(graph, rep, int(j)) - graph.rows[:, j]).max() for j in columns)
    return graph, worst


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("kind", ["plt+skip", "clt"])
def test_every_edge_is_the_effect_of_adding_its_source_in_the_frozen_model(family, kind):
    model = InterpretableModel(tiny_family(family))
    tc = random_transcoders(model, kind.split("+")[0], skip=kind.endswith("skip"))
    graph, worst = check_oracle(model, tc, [0, 5, 9, 17, 3, 44, 12, 8])
    assert graph.n_selected > 50 and np.abs(graph.rows).max() > 1
    assert worst < 1e-5, (family, kind, worst)


@pytest.mark.parametrize("name", SETS)
def test_the_oracle_holds_on_circuit_tracers_model(tiny, ids, name):
    """GQA, RMSNorm gains 1 +- 0.1, JumpReLU thresholds, PLT without skip."""
    _, worst = check_oracle(tiny, transcoders(name, tiny), ids, n_features=10)
    assert worst < 1e-5


def test_the_oracle_holds_on_the_real_model(smollm):
    tc = random_transcoders(smollm, "clt", d_features=128, seed=1, bias=-2.0)
    reads = Replacement(smollm, tc, [1, 504, 3575, 282, 4649, 314]).reads  # <|im_start|>The capital of France is
    for layer in tc.layers:  # pre-activations of unit spread on this model's MLP inputs
        tc.W_enc[layer] = tc.W_enc[layer] / mx.std(tc.pre_acts(reads[layer][1:], layer) - tc.b_enc[layer])
    graph, worst = check_oracle(smollm, tc, "The capital of France is", n_features=8, batch_size=32)
    assert graph.token_strings[0] == "<|im_start|>" and graph.logit_strings[0] == " Paris"  # BOS prepended
    assert graph.n_selected > 10 and worst < 2e-5, worst


def test_a_constrained_intervention_moves_targets_by_the_graphs_edges(tiny, ids):
    tc = transcoders("clt_jumprelu", tiny)
    g = tiny.attribution_graph(ids, tc, progress=False)
    clean = tiny.feature_intervention(ids, [], tc)
    for node in (3, 120, 250):
        layer, pos, feat = (int(v) for v in g.features[node])
        a = float(g.activation_values[g.selected_features[node]])
        result = tiny.feature_intervention(ids, [(layer, pos, feat, 2 * a)], tc)  # constrained: the graph's model
        moved = np.array([result.pre_activations[l, p, f] - clean.pre_activations[l, p, f] for l, p, f in g.features])
        later = g.features[:, 0] > layer
        np.testing.assert_allclose(moved[later], g.rows[: g.n_selected][later, node], atol=2e-5)
        logits = result.logits[-1] - result.logits[-1].mean() - (clean.logits[-1] - clean.logits[-1].mean())
        np.testing.assert_allclose(logits[g.logit_tokens], g.rows[g.n_selected:, node], atol=2e-5)
    assert "constrained" in repr(result) and len(repr(result)) < 300


# ---------------------------------------------------------------- files, sizes, bad input


def test_a_graph_saves_and_loads(graphs, tmp_path):
    g = graphs["clt_jumprelu", "top40"]
    path = g.save(tmp_path / "graph")
    assert path.name == "graph.safetensors"
    back = mlxterp.load_graph(path)
    for name in ("active_features", "activation_values", "selected_features", "logit_tokens", "logit_probabilities", "rows"):
        assert np.array_equal(getattr(back, name), getattr(g, name)), name
    assert (back.tokens, back.prompt, back.token_strings, back.settings) == (g.tokens, g.prompt, g.token_strings, g.settings)
    assert back.scores() == g.scores() and repr(back) == repr(g)
    assert repr(g) == ("AttributionGraph(attribution graph of 10 tokens: 40 of 327 active features, 10 logits "
                       "(top '<s>' p=0.230), 90 nodes)")


def test_a_file_that_is_not_a_graph_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(mlxterp.FileFormatError, match="not a safetensors file"):
        AttributionGraph.load(tmp_path / "notes.txt")
    other = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(other), {"W": mx.zeros((2, 2))})
    with pytest.raises(mlxterp.FileFormatError, match="not an attribution graph"):
        AttributionGraph.load(other)
    with pytest.raises(mlxterp.FileFormatError, match="no such file"):
        AttributionGraph.load(tmp_path / "missing.safetensors")


def test_bad_input_is_a_clear_error(tiny, ids, graphs):
    tc = transcoders("plt_jumprelu", tiny)
    partial = mlxterp.load_transcoders(FIXTURES / "transcoders" / "plt_jumprelu")
    partial.layers, partial.W_enc, partial.b_enc = [0, 1], partial.W_enc[:2], partial.b_enc[:2]
    with pytest.raises(GraphError, match=r"cover layers \[0, 1\].*all 3 layers"):
        tiny.attribution_graph(ids, partial)
    from mlxterp_transcoders import TranscoderError, Transcoders

    W = [np.array(w) for w in tc.W_enc]
    with pytest.raises(TranscoderError, match=r"W_enc of layer 1 has shape \(64, 32\); expected \(128, 32\)"):
        Transcoders("plt", [0, 1, 2], [mx.array(W[0]), mx.array(W[1][:64]), mx.array(W[2])], tc.b_enc, tc.W_dec, tc.b_dec,
                    activation="jumprelu", threshold=tc.threshold)  # widths that differ
    wide = InterpretableModel(tiny_family("llama"))  # 64 wide, 3 layers
    with pytest.raises(GraphError, match="width 32; this model's d_model is 64"):
        wide.attribution_graph([1, 2, 3], tc)
    with pytest.raises(GraphError, match="expected a transcoder set"):
        tiny.attribution_graph(ids, "not transcoders")
    with pytest.raises(mlxterp.InputError, match="empty"):
        tiny.attribution_graph("", tc)
    with pytest.raises(mlxterp.OptionError, match="max_feature_nodes"):
        tiny.attribution_graph(ids, tc, max_feature_nodes=0)
    with pytest.raises(mlxterp.OptionError, match="desired_logit_prob"):
        tiny.attribution_graph(ids, tc, desired_logit_prob=1.5)
    with pytest.raises(GraphError, match="memory_budget"):
        tiny.attribution_graph(ids, tc, memory_budget="1KiB")
    g = graphs["plt_jumprelu", "full"]
    for bad in (0, 1.01, -0.5):
        with pytest.raises(mlxterp.OptionError, match=r"node_threshold.*\(0, 1\]"):
            g.prune(node_threshold=bad)
        with pytest.raises(mlxterp.OptionError, match=r"edge_threshold.*\(0, 1\]"):
            g.prune(edge_threshold=bad)
    with pytest.raises(mlxterp.OptionError, match="position"):
        tiny.feature_intervention(ids, [(0, 10, 0, 1.0)], tc)
    with pytest.raises(mlxterp.OptionError, match="feature"):
        tiny.feature_intervention(ids, [(0, 1, 128, 1.0)], tc)
    with pytest.raises(GraphError, match=r"\(layer, position, feature, value\)"):
        tiny.feature_intervention(ids, [(0, 1)], tc)
    with pytest.raises(mlxterp.OptionError, match="slug"):
        g.to_json(Path("/tmp"), slug="../escape")


def test_text_gets_a_bos_and_ids_are_kept(tiny, ids):
    tc = transcoders("plt_jumprelu", tiny)
    from_text = tiny.attribution_graph("the cat sat on the mat and the dog", tc, progress=False)
    assert from_text.tokens == ids and from_text.prompt == "<s> the cat sat on the mat and the dog"
    assert tiny.attribution_graph(ids[1:], tc, progress=False).tokens == ids  # the BOS prepended to ids too


def test_thresholds_of_one_keep_every_node_with_influence(graphs):
    g = graphs["plt_jumprelu", "top40"]
    pruned = g.prune(1.0, 1.0)
    influential = g.influence() > 0
    assert pruned.node_mask[influential].all() and pruned.node_mask[g.token_start:].all()
    assert not pruned.node_mask[g.error_start:g.error_start + g.n_pos * g.n_layers:g.n_pos].any()  # position 0: no error
    assert pruned.n_edges > g.prune(0.8, 0.98).n_edges


def test_decoder_rows_gathered_per_batch_give_the_same_rows(tiny, ids):
    """Under a tight memory budget the active features' decoder rows are not kept but gathered
    again in every batch, one source layer at a time: the same computation, the same rows."""
    from mlxterp_circuits.attribution import _encoder_rows, _Sources

    rep = Replacement(tiny, transcoders("clt_jumprelu", tiny), ids)
    kept, gathered = _Sources(rep), _Sources(rep, room=0)
    assert kept.kept and not gathered.kept and gathered.nbytes < kept.nbytes
    encoders = _encoder_rows(rep)
    batch = [(int(rep.active[k, 0]), int(rep.active[k, 1]), encoders[k]) for k in range(150, 200)]
    assert np.array_equal(kept.rows(batch), gathered.rows(batch))
