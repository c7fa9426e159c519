"""Habits from other libraries and notebooks end in answers, not internal errors: the bound
analyses show their own help; TransformerLens's cache keys and token helpers work; a
misspelled name suggests the closest names this model has; wrong inputs are explained in
mlxterp's words, raised near the user's call; a trace used without ``with`` says so."""

from __future__ import annotations

import inspect
import traceback

import mlx.core as mx
import pytest
from helpers import tiny_llama, train_tokenizer

from mlxterp import InterpretableModel, InterventionError, TraceError, UnknownNameError
from mlxterp import interventions as iv


@pytest.fixture(scope="module")
def model():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return InterpretableModel(tiny_llama(), tokenizer=TokenizerWrapper(train_tokenizer()))


def test_an_analysis_method_has_its_own_name_signature_and_help(model):
    from mlxterp_analyses import logit_lens

    method = model.logit_lens
    assert method.__name__ == "logit_lens" and method.__doc__ == logit_lens.__doc__
    assert list(inspect.signature(method).parameters)[0] == "text"  # no `model`: bound
    assert "partial" not in repr(method)


def test_transformerlens_cache_keys(model):
    tr = model.run("the cat sat", capture=["layers.*.output", "layers.*.attn.pattern", "embed", "layers.1.ln2"])
    acts = tr.activations
    assert mx.array_equal(acts["resid_post", 2], acts["layers.2.output"]).item()
    assert mx.array_equal(acts["resid_post", -1], acts["layers.3.output"]).item()
    assert mx.array_equal(acts["pattern", 1], acts["layers.1.attn.pattern"]).item()
    assert mx.array_equal(acts["embed",], acts["embed"]).item()
    assert acts["normalized", 1, "ln2"].shape == acts["layers.1.ln2"].shape
    with pytest.raises(UnknownNameError):
        acts["resid_post", "x"]


def test_transformerlens_token_helpers(model):
    ids = model.encode("the cat sat")
    assert model.to_tokens("the cat sat").tolist() == [ids]
    assert model.to_tokens(["the cat", "the cat sat"]).shape == (2, len(ids))
    assert "".join(model.to_str_tokens("the cat sat")) == "the cat sat"
    assert model.to_str_tokens(["a", "the cat"])[0] == model.to_str_tokens("a")
    token = model.encode(" cat")
    if len(token) == 1:
        assert model.to_single_token(" cat") == token[0]
    with pytest.raises(Exception, match="not one"):
        model.to_single_token("the cat sat on the mat")
    check = model.test_prompt("the cat", "sat")
    assert len(check) >= 1 and check[0]["rank"] >= 0 and 0 <= check[-1]["probability"] <= 1
    assert len(repr(check)) < 300


def test_generate_takes_max_new_tokens(model):
    a = model.generate("the cat", max_new_tokens=3)
    b = model.generate("the cat", max_tokens=3)
    assert a.tokens == b.tokens and len(a.tokens) <= 3
    with pytest.raises(Exception, match="disagree"):
        model.generate("the cat", max_tokens=4, max_new_tokens=3)


def test_a_misspelled_name_suggests_this_models_closest_names(model):
    with pytest.raises(UnknownNameError) as e:
        model.run("the cat", capture=["layers[2].atn.q"])
    message = str(e.value)
    assert "layers[2].attn.q" in message
    assert "router" not in message and "q_norm" not in message  # names this llama does not have
    with pytest.raises(AttributeError, match="'InterpretableModel' object has no attribute 'to_str_token'.*to_str_tokens"):
        model.to_str_token("x")


def test_a_wrong_width_vector_is_explained_and_raised_near_the_call(model):
    with pytest.raises(InterventionError, match="add_vector has 100 values; the activation has width 64") as e:
        model.run("the cat", interventions={"layers.3.output": iv.add_vector(mx.zeros(100))})
    frames = traceback.extract_tb(e.value.__traceback__)
    assert not any("mlx_lm" in f.filename for f in frames) and len(frames) <= 6
    assert e.value.__cause__ is None
    with pytest.raises(InterventionError, match="replace_with has shape"):
        model.run("the cat", interventions={"layers.1.mlp": iv.replace_with(mx.zeros((2, 7, 64)))})


def test_a_trace_used_without_with_says_it_never_ran(model):
    with pytest.raises(TraceError, match="has not run"):
        model.trace("the cat").activations["layers[1].output"]
