"""The plugin contract: a third-party package adds a family and an analysis without touching
this repository; plugins are chosen, isolated when broken, and schemas are data."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import tiny_family

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mlxterp import (
    ArchitectureSchema,
    InterpretableModel,
    SchemaError,
    UnknownNameError,
    hookimpl,
    load_plugins,
    register_plugin,
)
from mlxterp_core.invariants import check_all
from mlxterp_core.plugins import plugin_manager, schemas

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "plugin_example"


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """The example plugin package, installed as an importlib.metadata distribution outside
    the repository (package + .dist-info with its entry points, on sys.path)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / "mlxterp_toy", tmp_path / "mlxterp_toy")
    dist = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["mlxterp"]
    (dist / "entry_points.txt").write_text("[mlxterp]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["toy"])
    yield
    for name in [m for m in sys.modules if m.startswith("mlxterp_toy")]:
        del sys.modules[name]
    load_plugins([])


@pytest.fixture
def plugins_reset():
    yield
    load_plugins([])


def test_third_party_family_from_a_data_file_and_an_analysis(toy_installed):
    from mlxterp_toy.model import ToyLM

    mx.random.seed(3)
    module = ToyLM()
    mx.eval(module.parameters())
    model = InterpretableModel(module)
    assert model.architecture.family == "toy"
    assert model.architecture.plugin == "toy"
    failed = [c for c in check_all(model, [1, 5, 9, 13, 2, 7]) if c.passed is False]
    assert not failed, failed

    ids = [[4, 8, 15, 16, 23]]
    norms = model.residual_norms(ids)
    outputs = model.run(ids).activations
    expected = [mx.linalg.norm(outputs[f"model.blocks.{i}"][0, -1]).item() for i in range(2)]
    assert norms == pytest.approx(expected, rel=1e-6)
    assert "residual_norms" in dir(model)
    # the analysis is written against standard names: it works on a first-party family too
    llama = InterpretableModel(tiny_family("llama"))
    assert len(llama.residual_norms(ids)) == 3
    # and the plugin's intervention type appears among mlxterp.interventions
    from mlxterp import interventions as iv

    direction = mx.random.normal((32,))
    site = "layers[1].output"
    ablated = model.run(ids, interventions={site: iv.project_out(direction)}, capture=[site]).activations[site]
    unit = direction / mx.linalg.norm(direction)
    assert mx.abs(ablated @ unit).max().item() < 1e-4


def test_third_party_command(toy_installed, capsys):
    from mlxterp_core.cli import main

    assert main(["residual-norms", "--text", "The capital of France is"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["layer", str(i)] for i in range(30)]
    assert all(float(line.split()[2]) > 0 for line in lines)
    load_plugins([])  # first-party only: the command is gone, mlxterp's own stay
    with pytest.raises(SystemExit):
        main(["residual-norms"])
    assert "invalid choice: 'residual-norms'" in capsys.readouterr().err


def test_third_party_plugins_can_be_left_out(toy_installed):
    from mlxterp_toy.model import ToyLM

    load_plugins([])  # first-party only
    model = InterpretableModel(ToyLM())
    assert model.architecture is None
    assert "model.blocks.0.attention.wq" in model.run([[1, 2]]).activations  # raw names still work
    with pytest.raises(AttributeError):
        model.residual_norms([[1, 2]])
    from mlxterp import interventions as iv

    with pytest.raises(AttributeError, match="has no 'project_out'"):
        iv.project_out
    with pytest.raises(UnknownNameError, match=r"no plugin recognises this ToyLM \(model_type='toy'\).*schema="):
        model.run([[1, 2]], capture=["layers[0].attn.q"])
    schema = ArchitectureSchema.from_file(EXAMPLE / "mlxterp_toy" / "toy.toml")
    assert InterpretableModel(ToyLM(), schema=schema).architecture.family == "toy"


def test_first_party_plugins_use_the_entry_points():
    names = dict(plugin_manager().list_name_plugin())
    assert "architectures" in names
    families = {s.family for _, s in schemas()}
    assert {"llama", "qwen2", "qwen3"} <= families


class _Broken:
    @hookimpl
    def mlxterp_architectures(self):
        raise RuntimeError("schema files missing")

    @hookimpl
    def mlxterp_recognize(self, model):
        raise ValueError("cannot look at this model")


def test_a_plugin_that_raises_is_named_and_the_others_still_work(plugins_reset):
    register_plugin(_Broken(), name="broken-example")
    with pytest.warns(UserWarning, match="'broken-example' raised in mlxterp_architectures: RuntimeError: schema files missing"):
        model = InterpretableModel(tiny_family("llama"))
    assert model.architecture.family == "llama"


def test_recognition_error_is_named(plugins_reset):
    register_plugin(_Broken(), name="broken-example")
    import mlx.nn as nn

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def __call__(self, x):
            return self.proj(x)

    with pytest.warns(UserWarning, match="'broken-example' raised in mlxterp_recognize: ValueError"):
        model = InterpretableModel(Unknown())
    assert model.architecture is None
    assert model.run(mx.ones((1, 4))).output.shape == (1, 4)


def test_every_schema_round_trips_through_json():
    for _, schema in schemas():
        data = json.loads(json.dumps(schema.to_data()))
        assert ArchitectureSchema.from_data(data) == schema


def test_schema_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('family = "x"\n[block]\n"attn.qq" = "self_attn.q_proj"\n')
    with pytest.raises(SchemaError, match=r"bad\.toml.*unknown block names \['attn\.qq'\]"):
        ArchitectureSchema.from_file(bad)
    bad.write_text('family = "x"\nlayerz = "model.layers"\n')
    with pytest.raises(SchemaError, match="extra fields found \\(layerz\\)"):
        ArchitectureSchema.from_file(bad)


def _llama_schema(**block_changes):
    import attrs

    (schema,) = [s for _, s in schemas() if s.family == "llama"]
    from mlxterp import Port

    block = dict(schema.block)
    block.update({k: Port(v) for k, v in block_changes.items()})
    return attrs.evolve(schema, block=block)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"attn.q": "self_attn.k_proj"}, "block.attn.q"),
        ({"resid_mid": "input_layernorm:input"}, "block.resid_mid"),
        ({"attn": "self_attn.o_proj:input"}, "block.resid_mid / block.attn"),
        ({"attn.z": "self_attn.v_proj"}, "block.attn.z"),
    ],
)
def test_validation_names_the_wrong_schema_field(change, field):
    expected = f"(?s)schema 'llama' from plugin 'schema=' does not fit.*schema field: {re.escape(field)}"
    with pytest.raises(SchemaError, match=expected):
        InterpretableModel(tiny_family("llama"), schema=_llama_schema(**change))


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_validation_catches_swapped_queries_and_keys(family):
    import attrs

    from mlxterp import Port

    (schema,) = [s for _, s in schemas() if s.family == family]
    q, k = schema.block["attn.q"], schema.block["attn.k"]
    swapped = attrs.evolve(schema, block={**schema.block, "attn.q": attrs.evolve(q, part=k.part), "attn.k": attrs.evolve(k, part=q.part)})
    assert isinstance(swapped.block["attn.q"], Port)
    with pytest.raises(SchemaError, match=r"(?s)qk: .*schema field: block\.attn\.q / block\.attn\.k"):
        InterpretableModel(tiny_family(family), schema=swapped)
