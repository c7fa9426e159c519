"""Models sharded across processes by mlx-lm (tensor and pipeline parallelism) keep the unsharded
model's names, shapes and numbers, and ranks that break the SPMD rule fail, all of them, in time.

Ring ranks on localhost run worker scripts (``sharded_worker.py``, ``sharded_violation_worker.py``,
``sharded_real_worker.py``), one BLAS thread each, under a hard timeout; each rank's exit status and
files are checked here (``mlx.launch`` returns 0 whatever its ranks do). One launch of two ranks
runs every family and mode (the processes are shared across checks); the tests read its files.

Tolerances: pipeline parallelism changes no arithmetic, so its results are bitwise equal. Tensor
parallelism sums each rank's share of a projection, then the shares: float32 results move by
about 1e-6 of the largest value, within 1e-5 everywhere. Two results are differences of nearly
equal numbers, which magnify that rounding: patching recovery with the default logit-difference
metric and attribution estimates (up to ~1.5e-5 seen); they are held to 1e-4, and patching with a
metric without a difference is held to 1e-5.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import environment, tiny_family

import mlxterp
from mlxterp import InterpretableModel
from mlxterp_core import sharding
from mlxterp_tools.ring import run_ring

HERE = Path(__file__).parent
FAMILIES = [("llama", "tensor"), ("mistral", "tensor"), ("qwen2", "tensor"), ("qwen3", "tensor"),
            ("qwen3_moe", "tensor"), ("qwen2", "pipeline"), ("qwen3_moe", "pipeline")]
TENSOR, DIFFERENCE = 1e-5, 1e-4


# -- two ranks, every family and mode: sharded against unsharded ---------------------------------


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sharded")
    items = [f"{family}:{mode}" for family, mode in FAMILIES] + ["loading"]
    command = [sys.executable, str(HERE / "sharded_worker.py"), str(out), *items]
    results = run_ring([command] * 2, out, timeout=900, env=environment(MLXTERP_SHARD_TIMEOUT="120"))
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{output[-4000:]}"
    return {name: [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
            for name in [f"{f}-{m}" for f, m in FAMILIES] + ["loading"]}


def close_enough(result: dict, limit: float, what: str) -> None:
    assert "error" not in result, f"{what}: {result.get('trace', result['error'])}"
    assert result["value"] <= limit, f"{what}: relative difference {result['value']:.3g} at {result.get('at')} (limit {limit:g})"


@pytest.mark.parametrize(("family", "mode"), FAMILIES, ids=[f"{f}-{m}" for f, m in FAMILIES])
def test_a_sharded_model_gives_the_unsharded_models_names_and_numbers(sharded_runs, family, mode):
    exact = mode == "pipeline"
    limit = 0.0 if exact else TENSOR
    for rank, found in enumerate(sharded_runs[f"{family}-{mode}"]):
        where = f"{family} {mode} rank {rank}"
        for name, result in found.items():
            assert not (isinstance(result, dict) and "error" in result), f"{where} {name}: {result.get('trace')}"
            assert name == "timings" or not isinstance(result, dict) or all(
                "error" not in part for part in result.values() if isinstance(part, dict)), f"{where} {name}: {result}"
        assert found["architecture"]["same"], found["architecture"]  # global heads, layers, widths
        for check in ("standard_names", "raw_names", "globs", "saes", "logit_lens", "generation", "head_scores", "cache"):
            close_enough(found[check], limit, f"{where} {check}")
        assert found["standard_names"]["shapes"] and found["globs"]["same_names"]
        unmatched = found["raw_names"]["only_unsharded"] + found["raw_names"]["only_sharded"]
        # a module instance shared by every block (mlx-lm's SwitchGLU activation) is named by its
        # first block and counted per call: a stage's names start at its own first block
        assert all("switch_mlp.activation" in name for name in unmatched) and (not unmatched or exact), unmatched
        for case, result in found["interventions"].items():
            close_enough(result, limit, f"{where} intervention {case}")
            assert result["moves_logits"] > 1e-3, f"{where}: the {case} edit changed nothing"
        for case, result in found["patching"].items():
            magnified = case in ("resid_positions", "heads")  # logit differences
            close_enough(result, 0.0 if exact else DIFFERENCE if magnified else TENSOR, f"{where} patching {case}")
        assert found["logit_lens"]["ids_equal"]
        assert found["generation"]["tokens_equal"] and found["generation"]["steering_changes_tokens"]
        assert found["generation"]["sampled"] == sharded_runs[f"{family}-{mode}"][0]["generation"]["sampled"]
        assert found["cache"]["rows"] and found["cache"]["sites"]
        assert found["cache"]["writers"] == ([0, 1] if exact else [0])  # a stage writes its layers' sites
        assert found["invariants"]["failed"] == [], found["invariants"]
        if exact:
            assert found["attribution"]["refused"] == "PatchingError" and "gradients" in found["attribution"]["message"]
        else:
            close_enough(found["attribution"], DIFFERENCE, f"{where} attribution")


def test_only_what_is_asked_moves_and_all_captures_of_a_pass_share_one_collective(sharded_runs):
    for family, mode in FAMILIES:
        counts = sharded_runs[f"{family}-{mode}"][0]["collectives"]
        if mode == "pipeline":
            # the agreement, then one all_gather of every stage's captures, whatever their number
            assert counts["residual_trace"] == 2 and counts["gathered_trace"] == 2, counts
            continue
        # beyond the model's own: the agreement before every pass, then one all_gather for every
        # sharded capture of the pass; a head edit runs where the head lives, a function of a
        # sharded tensor gathers once
        assert counts["residual_trace"] == 1 and counts["head_edit"] == 1, counts
        assert counts["gathered_trace"] == 2 and counts["function_edit"] == 2, counts


def test_models_sharded_by_mlxterp_load_and_by_mlx_lms_sharded_load_are_wrapped(sharded_runs):
    for rank, found in enumerate(sharded_runs["loading"]):
        for label in ("load_tensor", "load_pipeline", "sharded_load_tensor", "sharded_load_pipeline"):
            result = found[label]
            close_enough(result, 0.0 if label.endswith("pipeline") else TENSOR, f"rank {rank} {label}")
            assert result["mode"] == label.rsplit("_", 1)[1]


# -- the SPMD rule -------------------------------------------------------------------------------


def test_ranks_that_break_the_spmd_rule_all_fail_clearly_and_in_time(tmp_path):
    started = time.monotonic()
    command = [sys.executable, str(HERE / "sharded_violation_worker.py"), "20"]
    (code0, out0), (code1, out1) = run_ring([command] * 2, tmp_path, timeout=150, env=environment(MLXTERP_SHARD_TIMEOUT="8"))
    elapsed = time.monotonic() - started

    def said(output: str, case: str) -> str:
        lines = [line for line in output.splitlines() if line.startswith(f"CASE {case}:")]
        assert lines, f"no line for {case}:\n{output[-3000:]}"
        return lines[0]

    for output in (out0, out1):
        for mode in ("tensor", "pipeline"):
            assert "ShardingError" in said(output, f"{mode} different_sites") and "capture differ" in said(output, f"{mode} different_sites")
            assert "ShardingError" in said(output, f"{mode} different_inputs") and "inputs differ" in said(output, f"{mode} different_inputs")
            assert said(output, f"{mode} in_step").endswith("no error")  # and the ranks are still in step
    for mode in ("tensor", "pipeline"):
        assert "InterventionError" in said(out0, f"{mode} one_rank_fails")
        assert "DistributedError: rank 0 failed" in said(out1, f"{mode} one_rank_fails")
        assert "InterventionError" in said(out0, f"{mode} layer_fails")
    assert "InterventionError" in said(out1, "tensor layer_fails")  # every rank runs layer 2
    assert "DistributedError: rank 0 failed" in said(out1, "pipeline layer_fails")  # rank 0's stage
    # rank 1 stops taking part: rank 0 ends itself after the timeout, saying why; rank 1 fails
    assert code0 == 3 and "rank 0 waited 8 s for the other ranks" in out0 and "SPMD rule" in out0, out0[-2000:]
    assert code1 != 0 or "CASE stops: no error" not in out1, out1[-2000:]
    assert elapsed < 120


# -- the real default model, tensor parallel over 3 ranks ---------------------------------------


def test_the_default_model_sharded_by_tensor_parallelism_gives_the_readme_and_demo_results(tmp_path):
    """SmolLM2-135M has 9 query and 3 key/value heads: tensor parallelism needs a number of ranks
    that divides both, so 3 (2 cannot shard it). Bounded: about 5 minutes on 2 busy cores."""
    command = [sys.executable, str(HERE / "sharded_real_worker.py"), str(tmp_path)]
    results = run_ring([command] * 3, tmp_path, timeout=1500, env=environment(MLXTERP_SHARD_TIMEOUT="300"))
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{output[-4000:]}"
    for rank in range(3):
        found = json.loads((tmp_path / f"real-rank{rank}.json").read_text())
        assert found["heads"] == 9
        assert found["readme_trace"]["top"] == [" Paris", " Paris"]
        for check in ("readme_trace", "readme_run", "logit_lens", "steering", "induction_heads", "induction_loss"):
            assert found[check]["value"] <= TENSOR, (check, found[check])
        assert found["readme_run"]["same_sites"]
        assert found["logit_lens"]["ids_equal"] and found["logit_lens"]["last"] == [" Paris", " Paris"]
        for check in ("patching_resid", "patching_mlp", "patching_attn"):
            assert found[check]["value"] <= 1e-4 and found[check]["top"][0] == found[check]["top"][1], found[check]
            assert found[check]["answers"] == [" Paris", " Rome", " Paris", " Rome"]
        assert found["steering"]["plain_equal"] and found["steering"]["steered_equal"] and found["steering"]["steering_changes"]
        assert found["induction_heads"]["top"][0] == found["induction_heads"]["top"][1]


# -- one process: what cannot be sharded, and a group of one ---------------------------------------


def test_a_family_mlx_lm_cannot_shard_is_a_clear_error_naming_the_families_that_work():
    with pytest.raises(sharding.ShardingError, match=r"cannot pipeline this llama model.*pipeline parallel: qwen2, qwen3_moe"):
        sharding.shard(tiny_family("llama"), "pipeline")
    with pytest.raises(sharding.ShardingError, match=r"cannot shard this gemma model by tensor parallelism.*tensor parallel: llama"):
        sharding.shard(tiny_family("gemma"), "tensor")
    with pytest.raises(sharding.ShardingError, match="shard='columns'"):
        mlxterp.load(shard="columns")


def test_heads_that_do_not_divide_by_the_ranks_are_refused_before_sharding():
    sharding._check_divisible(tiny_family("llama"), 2)  # 4 query and 2 key/value heads: whole heads per rank
    # mistral's tiny model has 1 key/value head, which mlx-lm would divide into 0 per rank
    with pytest.raises(sharding.ShardingError, match="num_key_value_heads=1 does not divide by 2 ranks"):
        sharding._check_divisible(tiny_family("mistral"), 2)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_model_sharded_over_a_group_of_one_is_the_unsharded_model(mode):
    """The plan is read and checked whatever the number of ranks; over one rank nothing moves."""
    family = "qwen3_moe"
    unsharded = InterpretableModel(tiny_family(family))
    module = tiny_family(family)
    sharding.shard(module, mode)
    model = InterpretableModel(module)
    if mode == "pipeline":  # one stage: mlx-lm's pipeline of one rank is no pipeline
        assert model.sharding is None
        return
    assert model.sharding is not None and model.sharding.size == 1
    assert {layout.kind for layout in model.sharding.layouts.values()} == {"replicated"}
    names = unsharded.architecture.standard_names()
    a = unsharded.run([[3, 1, 4, 1, 5]], capture=names).activations
    b = model.run([[3, 1, 4, 1, 5]], capture=names).activations
    assert all(mx.array_equal(a[n], b[n]).item() for n in names)
    assert mlxterp.launch_mode() == "model parallel"


def test_attribution_graphs_refuse_a_sharded_model_clearly():
    """The replacement model's frozen passes and gradients are untested across ranks: a clear
    error, before any work, rather than numbers nobody checked."""
    module = tiny_family("llama")
    sharding.shard(module, "tensor")
    model = InterpretableModel(module)
    for call in (lambda: model.attribution_graph([1, 2, 3], None), lambda: model.feature_intervention([1, 2, 3], [], None)):
        with pytest.raises(sharding.ShardingError, match="attribution graphs .* do not run on a model sharded"):
            call()
