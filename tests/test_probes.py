"""Probing leaves the wrapped model exactly as it was: outputs, parameters, classes, state."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import SimpleModel, bitwise_equal, tiny_llama
from mlx.utils import tree_flatten

from mlxterp import InterpretableModel, InterventionError, interventions as iv
from mlxterp_core.module_probes import is_probed, probes_installed, walk_modules
from mlxterp_core.trace import active_traces

IDS = mx.array([[3, 17, 42, 8, 99, 5, 61]])


def _snapshot(module: nn.Module):
    """Everything about a module tree that a probe could disturb."""
    return [
        (path, type(m), sorted(m.__dict__), sorted(k for k in m.keys()))
        for path, m in walk_modules(module)
    ]


def _cases():
    mx.random.seed(1)
    simple = SimpleModel()
    mx.eval(simple.parameters())
    return [
        ("llama", tiny_llama(), IDS),
        ("simple", simple, mx.random.normal((2, 64))),
    ]


@pytest.mark.parametrize("name,module,x", _cases(), ids=["llama", "simple"])
def test_idle_probes_and_traces_are_bitwise_identical(name, module, x):
    reference = module(x)
    before = _snapshot(module)
    with probes_installed([(m, None) for _, m in walk_modules(module)]):
        assert all(is_probed(m) for _, m in walk_modules(module))
        idle = module(x)
    assert bitwise_equal(idle, reference)
    traced = InterpretableModel(module).run(x)
    assert bitwise_equal(traced.output, reference)
    assert bitwise_equal(traced.activations["__model_output__"], reference)
    assert bitwise_equal(module(x), reference)
    assert _snapshot(module) == before


def test_parameter_tree_load_weights_and_quantize_still_work():
    module = tiny_llama()
    model = InterpretableModel(module)
    params_before = tree_flatten(module.parameters())
    model.run(IDS)
    params_after = tree_flatten(model.parameters())  # delegated to the wrapped module
    assert [k for k, _ in params_before] == [k for k, _ in params_after]
    assert all(a is b for (_, a), (_, b) in zip(params_before, params_after))

    other = tiny_llama()
    other.update(nn.utils.tree_map(lambda p: p * 0.5, other.parameters()))
    model.load_weights(tree_flatten(other.parameters()))
    assert bitwise_equal(model.run(IDS).output, other(IDS))

    nn.quantize(model, group_size=32, bits=4)  # works on the wrapper, quantizes the module
    assert isinstance(module.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    tr = model.run(IDS)
    assert bitwise_equal(tr.output, module(IDS))
    assert "model.model.layers.0.self_attn.q_proj" in tr.activations


def _assert_pristine(model: InterpretableModel, x, reference):
    assert not any(is_probed(m) for _, m in walk_modules(model.model))
    assert not any("_mlxterp_probe" in m.__dict__ for _, m in walk_modules(model.model))
    assert active_traces(model) == []
    assert bitwise_equal(model.model(x), reference)
    assert bitwise_equal(model.run(x).output, reference)


def test_exception_in_with_body_leaves_model_pristine():
    model = InterpretableModel(tiny_llama())
    reference = model.model(IDS)
    with pytest.raises(ZeroDivisionError):
        with model.trace(IDS):
            1 / 0
    _assert_pristine(model, IDS, reference)


def test_exception_inside_intervention_leaves_model_pristine():
    model = InterpretableModel(tiny_llama())
    reference = model.model(IDS)

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(InterventionError, match=r"raised at model\.model\.layers\.2\.mlp: RuntimeError: boom"):
        with model.trace(IDS, interventions={"model.model.layers.2.mlp": broken}):
            pass
    _assert_pristine(model, IDS, reference)


def test_exception_in_forward_leaves_model_pristine():
    mx.random.seed(1)
    module = SimpleModel()
    model = InterpretableModel(module)
    x = mx.random.normal((1, 64))
    reference = module(x)
    with pytest.raises(ValueError):
        model.run(mx.random.normal((1, 32)), interventions={"model.layers.0": iv.scale(2.0)})
    _assert_pristine(model, x, reference)


def test_walk_guards_against_cycles_and_shared_modules():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)
            self.again = [self.inner]

    loop = Loop()
    loop.inner.parent = [loop]  # a cycle back to the root
    paths = [p for p, _ in walk_modules(loop)]
    assert paths == ["model", "model.inner"]
