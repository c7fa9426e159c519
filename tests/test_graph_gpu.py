"""The attribution-graph GPU benchmark (mlxterp_tools.graph_gpu) on a tiny build: the build needs
no MLX, what it writes mlx-lm and mlxterp load, its thresholds leave about the asked number of
features active, the graphs it times are saved and described in the documented schema, and
the comparison of a graph with itself finds nothing (circuit-tracer's side is not run here:
the project does not depend on torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxterp_tools import graph_gpu

SCRIPT = Path(graph_gpu.__file__)
NO_MLX = "import runpy, sys; sys.modules['mlx'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph_gpu") / "build"
    done = subprocess.run([sys.executable, "-c", NO_MLX, str(SCRIPT), "build", "--out", str(folder), "--layers", "2",
                           "--d-features", "96", "--prompt-tokens", "9", "--target-l0", "12"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def timed(built):
    runs = {}
    for name in graph_gpu.SETS:
        out = built.parent / f"mlx-{name}.json"
        assert graph_gpu.main(["mlx", "--dir", str(built), "--out", str(out), "--set", name, "--tokens", "6,9",
                               "--max-feature-nodes", "all", "--batch-size", "16", "--repeats", "1"]) == 0
        runs[name] = json.loads(out.read_text())
    return runs


def test_the_build_is_a_llama_of_smollm2s_shape_with_both_transcoder_layouts(built):
    report = json.loads((built / "build.json").read_text())
    config = json.loads((built / "model" / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert report["prompt"][0] == graph_gpu.BOS and len(report["prompt"]) == 9
    assert sorted(p.name for p in (built / "clt").iterdir()) == [
        "W_dec_0.safetensors", "W_dec_1.safetensors", "W_enc_0.safetensors", "W_enc_1.safetensors", "config.yaml"]
    assert sorted(p.name for p in (built / "plt").iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    # thresholds between pre-activations, within 15% of the asked count on average
    assert report["smallest_threshold_margin_over_pre_std"] > 0
    assert 0.85 * 12 <= report["active_per_position"]["mean"] <= 1.15 * 12


def test_mlx_times_graphs_and_saves_them_in_the_documented_schema(timed, built):
    document = timed["clt"]
    assert document["implementation"] == "mlxterp" and document["settings"]["batch_size"] == 16
    assert document["settings"]["max_feature_nodes"] is None and document["resident_bytes"] > 0
    assert [run["tokens"] for run in document["runs"]] == [6, 9]
    for run in document["runs"]:
        assert len(run["seconds"]) == 1 and run["median_seconds"] > 0 and run["peak_bytes"] >= document["resident_bytes"]
        assert run["n_selected"] == run["n_active"] > 0 and 1 <= run["n_logits"] <= 10
        with np.load(run["adjacency"]) as graph:
            assert graph["adjacency_matrix"].shape == (run["n_nodes"], run["n_nodes"])
            assert run["n_nodes"] == run["n_active"] + (2 + 1) * run["tokens"] + run["n_logits"]
            assert graph["input_ids"].tolist() == json.loads((built / "build.json").read_text())["prompt"][:run["tokens"]]


def test_the_two_sets_share_their_encoders_and_prefixes_keep_their_features(timed):
    """One encoder per layer for both layouts: the same active features; and a causal model's
    features at a position do not depend on later tokens: the short prompt's active features
    are the long prompt's at the positions they share."""
    graphs = {(name, run["tokens"]): np.load(run["adjacency"]) for name, document in timed.items() for run in document["runs"]}
    for T in (6, 9):
        assert np.array_equal(graphs["clt", T]["active_features"], graphs["plt", T]["active_features"])
    short, long = graphs["clt", 6]["active_features"], graphs["clt", 9]["active_features"]
    assert np.array_equal(short, long[long[:, 1] < 6])


def test_compare_finds_a_graph_equal_to_itself_and_tells_other_graphs_apart(timed):
    (clt, plt) = (timed[name]["runs"][1]["adjacency"] for name in graph_gpu.SETS)
    with np.load(clt) as a:
        same = graph_gpu.compare_graphs(a, a)
        assert same["max_abs_diff"] == 0 and same["same_active_features"] and same["same_selected_features"]
        with np.load(plt) as b:
            other = graph_gpu.compare_graphs(a, b)
    assert other["same_active_features"] and other["max_abs_diff"] > 0  # the decoders differ, the encoders do not
    done = subprocess.run([sys.executable, "-c", NO_MLX, str(SCRIPT), "compare", clt, clt], capture_output=True, text=True)
    assert done.returncode == 0 and "same nodes" in done.stdout and "max |dA| = 0" in done.stdout


def test_runs_are_compared_length_by_length_and_reported_in_one_table(timed, built, capsys):
    results = built.parent
    assert graph_gpu.main(["compare", str(results / "mlx-clt.json"), str(results / "mlx-plt.json"),
                           "--json", str(results / "compare.json")]) == 0
    pairs = json.loads((results / "compare.json").read_text())["pairs"]
    assert [p["tokens"] for p in pairs] == [6, 9] and all(p["same_active_features"] for p in pairs)
    capsys.readouterr()
    assert graph_gpu.main(["report", str(results), "--json", str(results.parent / "all.json")]) == 0
    table = capsys.readouterr().out
    assert table.count("| mlx-") == 4 and "compare T=9: active same" in table
    assert set(json.loads((results.parent / "all.json").read_text())) == {"mlx-clt", "mlx-plt", "compare"}
