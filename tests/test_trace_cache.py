"""What a trace remembers between traces (the names of a repeated request, per model) never
serves a stale module, architecture or splice, and its lean probes record what the general
probe records."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import bitwise_equal, tiny_llama
from mlx.utils import tree_map

from mlxterp import InterpretableModel, UnknownNameError
from mlxterp_core.errors import InputError
from mlxterp_core.inputs import check_token_ids

IDS = mx.array([[3, 17, 42, 8, 99, 5, 61]])
RESID = [f"layers.{i}.output" for i in range(4)]


def _same_records(a, b) -> None:
    assert list(a.activations) == list(b.activations)
    for name in a.activations:
        if name != "__model_output__":
            assert bitwise_equal(a.activations[name], b.activations[name]), name


def test_a_repeated_request_sees_a_replaced_block():
    module = tiny_llama()
    model = InterpretableModel(module)
    before = model.run(IDS, capture=RESID)
    assert bitwise_equal(model.run(IDS, capture=RESID).activations["layers.2.output"], before.activations["layers.2.output"])
    block = tiny_llama().model.layers[1]
    block.update(tree_map(lambda p: p * 0.5, block.parameters()))  # other weights
    module.model.layers[1] = block
    after = model.run(IDS, capture=RESID)
    fresh = InterpretableModel(module).run(IDS, capture=RESID)  # nothing remembered
    _same_records(after, fresh)
    assert not bitwise_equal(after.activations["layers.2.output"], before.activations["layers.2.output"])
    assert bitwise_equal(after.output, module(IDS))


def test_a_repeated_request_sees_quantized_modules():
    module = tiny_llama()
    model = InterpretableModel(module)
    names = ["model.model.layers.0.self_attn.q_proj", "layers.1.mlp", "layers.2.output"]
    model.run(IDS, capture=names)
    nn.quantize(module, group_size=32, bits=4)
    after = model.run(IDS, capture=names)
    _same_records(after, InterpretableModel(module).run(IDS, capture=names))
    assert bitwise_equal(after.output, module(IDS))


def test_a_removed_module_is_an_error_not_a_remembered_one():
    module = tiny_llama()
    model = InterpretableModel(module, validate=False)
    name = "model.model.layers.3.mlp.down_proj"
    model.run(IDS, capture=[name])
    del module.model.layers[3].mlp["down_proj"]  # nn.Module is a dict of its children
    with pytest.raises(UnknownNameError, match="down_proj"):
        model.run(IDS, capture=[name])


def test_remembered_names_follow_the_architecture():
    model = InterpretableModel(tiny_llama())
    model.run(IDS, capture=RESID)
    architecture, model.architecture = model.architecture, None
    with pytest.raises(UnknownNameError, match="standard name"):
        model.run(IDS, capture=RESID)
    model.architecture = architecture
    assert "layers.3.output" in model.run(IDS, capture=RESID).activations


class _Doubling:
    """A splice (see mlxterp_core.splice) that doubles its site through a named sub-site."""

    site, reads, prefix, sub_sites = "layers.1.output", None, "twice", ("value",)

    def splice(self, x, visit, source):
        return visit("value", x * 2)


def test_splices_are_never_served_from_the_remembered_names():
    module = tiny_llama()
    model = InterpretableModel(module)
    plain = model.run(IDS, capture=RESID)
    with model.saes(_Doubling()):
        spliced = model.run(IDS, capture=RESID)
        assert bitwise_equal(spliced.activations["layers.1.output"], plain.activations["layers.1.output"] * 2)
        assert "layers.1.output.twice.value" in model.run(IDS, capture=["layers.1.output.twice.value"]).activations
    again = model.run(IDS, capture=RESID)
    _same_records(again, plain)
    # resolved again without the splice: not a name of the model
    with pytest.raises(UnknownNameError, match="not a standard block name"):
        model.run(IDS, capture=["layers.1.output.twice.value"])


@pytest.mark.parametrize("capture", [None, RESID + ["layers.0.attn.q", "model.model.layers.2.self_attn.rope#1"]])
def test_lean_probes_record_what_the_general_probe_records(capture):
    model = InterpretableModel(tiny_llama())
    lean = model.run(IDS, capture=capture)  # records, changes nothing: the lean probes
    # an intervention that changes nothing sends every site through the general probe
    general = model.run(IDS, capture=capture, interventions={"layers.3.output": lambda x: x})
    _same_records(lean, general)
    assert "model.model.layers.2.self_attn.rope#1" in lean.activations
    if capture is None:
        assert "model.model.layers.0.self_attn.rope#1:input" in lean.activations


@pytest.mark.parametrize("dtype", [mx.int8, mx.int16, mx.int32, mx.int64, mx.uint8, mx.uint16, mx.uint32])
@pytest.mark.parametrize("vocab", [100, 127, 128, 200, 5000])
def test_the_fast_id_scan_agrees_with_the_definition(dtype, vocab):
    info = mx.iinfo(dtype)
    for row in ([0, 5, 99], [0, vocab - 1], [vocab], [-1, 3], [info.min], [info.max], [3, info.max, 2]):
        if min(row) < info.min or max(row) > info.max:
            continue
        ids = mx.array([row]).astype(dtype)
        valid = all(0 <= i < vocab for i in row)
        if valid:
            check_token_ids(ids, vocab)
        else:
            with pytest.raises(InputError):
                check_token_ids(ids, vocab)


def test_capture_given_as_an_iterator_is_read_once_and_fully():
    module = tiny_llama()
    model = InterpretableModel(module, validate=False)  # nothing asked of it before
    first = model.run(IDS, capture=iter(RESID))
    _same_records(first, InterpretableModel(module).run(IDS, capture=RESID))
    _same_records(model.run(IDS, capture=(name for name in RESID)), first)
