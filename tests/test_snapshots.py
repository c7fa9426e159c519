"""Recorded activations are snapshots: model code that edits an array in place after a site
recorded it (``h += pos``, ``h *= scale``: MLX rebinds that handle's buffer) leaves the record
as it was when the module was called and returned."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import bitwise_equal, tiny_family

from mlxterp import InterpretableModel
from mlxterp_core.invariants import check_snapshots

IDS = [[3, 1, 4, 1, 5, 9, 2, 6]]


class ScaleInPlace(nn.Module):
    """Edits its input in place and returns it."""

    def __call__(self, x):
        x *= 2.0
        x += 1.0
        return x


class InPlaceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.scale = ScaleInPlace()

    def __call__(self, ids):
        h = self.embed(ids)
        h += 0.5  # the embedding's output, edited after it returned (GPT-2: h += wpe(pos))
        h *= 3.0  # (Gemma: h *= sqrt(hidden_size))
        h = self.scale(h)  # a module that edits its input
        y = self.proj(h)
        y += h  # proj's output, edited after it returned
        return self.scale(y)  # second call of scale: its '#1' sites


@pytest.fixture
def in_place():
    mx.random.seed(3)
    module = InPlaceModel()
    mx.eval(module.parameters())
    return module


def expected(module, ids, embedded=None):
    """Every site's value, computed afresh with no in-place operation."""
    e = module.embed(ids) if embedded is None else embedded
    in0 = (e + 0.5) * 3.0
    s0 = in0 * 2.0 + 1.0
    p = module.proj(s0)
    in1 = p + s0
    s1 = in1 * 2.0 + 1.0
    return {
        "model.embed:input": ids, "model.embed": e,
        "model.scale:input": in0, "model.scale": s0,
        "model.proj:input": s0, "model.proj": p,
        "model.scale#1:input": in1, "model.scale#1": s1,
        "__model_output__": s1,
    }


# capture everything (the recording probe), a capture list (the general probe), and with an
# intervention that returns its input object unchanged (the general probe's edit path)
@pytest.mark.parametrize("how", ["everything", "listed", "identity intervention"])
def test_records_survive_in_place_edits(in_place, how):
    ids = mx.array(IDS)
    want = expected(in_place, ids)
    model = InterpretableModel(in_place)
    if how == "everything":
        tr = model.run(ids)
    elif how == "listed":
        tr = model.run(ids, capture=list(want))
    else:
        tr = model.run(ids, capture=list(want), interventions={"model.embed": lambda x: x, "model.proj": lambda x: x})
    assert set(want) <= set(tr.activations)
    for site, value in want.items():
        assert bitwise_equal(tr.activations[site], value), site
    assert bitwise_equal(tr.output, in_place(ids))  # the traced output is the plain one


def test_an_intervention_result_edited_in_place_is_recorded_as_returned(in_place):
    ids = mx.array(IDS)
    doubled = in_place.embed(ids) * 2.0
    tr = InterpretableModel(in_place).run(ids, capture=["model.embed", "model.scale:input"],
                                          interventions={"model.embed": lambda x: x * 2.0})
    assert bitwise_equal(tr.activations["model.embed"], doubled)
    assert bitwise_equal(tr.activations["model.scale:input"], (doubled + 0.5) * 3.0)


def test_the_snapshot_invariant_sees_in_place_edits(in_place):
    check = check_snapshots(InterpretableModel(in_place), IDS[0])
    assert check.passed, check.detail


def test_the_snapshot_invariant_fails_a_record_that_followed_an_edit(in_place, monkeypatch):
    """The invariant can fail: with records taken as the model's own handle (no snapshot),
    the in-place edits show through and the check names the site."""
    import mlxterp_core.trace as trace

    monkeypatch.setattr(trace, "snapshot", lambda x: x)
    check = check_snapshots(InterpretableModel(in_place), IDS[0])
    assert check.passed is False
    assert "model.embed" in check.detail


def test_gradients_flow_through_records(in_place):
    """A record is the same graph node as what the model computed: mx.grad through it is the
    gradient through the model's own value."""
    from mlxterp_core.trace import Hooks

    ids = mx.array(IDS)
    model = InterpretableModel(in_place)

    def through_records(delta):
        with Hooks(model, {"model.embed": lambda x: x + delta}, capture=["model.proj"]) as hooks:
            _, recorded = hooks(ids, evaluate=False)
        return recorded["model.proj"].sum()

    def direct(delta):
        return expected(in_place, ids, in_place.embed(ids) + delta)["model.proj"].sum()

    zero = mx.zeros((8,))
    assert bitwise_equal(mx.grad(through_records)(zero), mx.grad(direct)(zero))


def test_generation_records_each_step_as_it_was():
    """GPT-2 adds the position embedding in place to the token embedding: every generated
    step's raw token-embedding site is still the lookup of that step's token."""
    model = InterpretableModel(tiny_family("gpt2"))
    result = model.generate([5, 17, 3], max_tokens=3, capture=["model.model.wte", "model.model.wte:input"])
    assert len(result.activations) == 3
    for step in result.activations:
        wte = model.model.model.wte
        assert bitwise_equal(step["model.model.wte"], wte(step["model.model.wte:input"]))


def test_queries_scaled_in_place_by_quantized_kv_attention():
    """mlx-lm's attention over a quantized KV cache does ``queries *= scale``
    (``base.quantized_scaled_dot_product_attention``): the recorded rotated queries are still
    the rotation's output, the same as with a plain cache."""
    from helpers import tiny_llama
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from mlxterp_core.trace import Hooks

    module = tiny_llama(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
    model = InterpretableModel(module)
    ids = mx.array(IDS)
    sites = ["model.model.layers.0.self_attn.rope", "model.model.layers.0.self_attn.rope#1"]  # before any cache
    records = {}
    for kind, make in (("plain", KVCache), ("quantized", lambda: QuantizedKVCache(group_size=64, bits=8))):
        with Hooks(model, capture=sites) as hooks:
            _, records[kind] = hooks(ids, cache=[make() for _ in module.layers])
    for site in sites:
        assert bitwise_equal(records["quantized"][site], records["plain"][site]), site
