"""Raw capture: names, ports, repeated calls, capture filters, inputs, tokenizer helpers, errors."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import bitwise_equal

from mlxterp import (
    InputError,
    InterpretableModel,
    InterventionError,
    TraceError,
    UnknownNameError,
    interventions as iv,
)

PROMPT = "The capital of France is"
L0 = "model.model.layers.0"


def test_readme_names_and_model_output(llama):
    with llama.trace("Hello, how are you?") as trace:
        pass
    acts = trace.activations
    n_tokens = len(llama.encode("Hello, how are you?"))
    assert acts["model.model.layers.3.self_attn"].shape == (1, n_tokens, 64)
    assert acts["model.model.layers.2.self_attn.q_proj"].shape == (1, n_tokens, 64)
    assert acts["model.model.layers.1.self_attn.k_proj"].shape == (1, n_tokens, 32)  # 2 KV heads
    assert acts["model.model.layers.3.mlp.gate_proj"].shape == (1, n_tokens, 128)
    assert acts["model.model.embed_tokens"].shape == (1, n_tokens, 64)
    assert bitwise_equal(acts["__model_output__"], trace.output)
    assert bitwise_equal(trace.output, llama.model(trace.inputs))


def test_module_inputs_are_recorded_and_consistent(llama):
    acts = llama.run(PROMPT).activations
    # what a module receives is what its parent passed on
    assert bitwise_equal(acts[f"{L0}:input"], acts["model.model.embed_tokens"])
    assert bitwise_equal(acts["model.model.layers.1:input"], acts[L0])
    assert bitwise_equal(acts[f"{L0}.self_attn.q_proj:input"], acts[f"{L0}.input_layernorm"])
    # o_proj's input is the per-head attention mix z, (B, T, H*D); o_proj(z) is the attention output
    z = acts[f"{L0}.self_attn.o_proj:input"]
    assert z.shape == (1, len(llama.encode(PROMPT)), 64)
    o_proj = llama.model.model.layers[0].self_attn.o_proj
    assert bitwise_equal(o_proj(z), acts[f"{L0}.self_attn"])


def test_repeated_calls_each_keep_their_name(llama):
    acts = llama.run(PROMPT).activations
    B, T = 1, len(llama.encode(PROMPT))
    queries = acts[f"{L0}.self_attn.rope"]
    keys = acts[f"{L0}.self_attn.rope#1"]
    assert queries.shape == (B, 4, T, 16) and keys.shape == (B, 2, T, 16)
    assert bitwise_equal(acts[f"{L0}.self_attn.rope#0"], queries)
    q_heads = acts[f"{L0}.self_attn.q_proj"].reshape(B, T, 4, 16).transpose(0, 2, 1, 3)
    k_heads = acts[f"{L0}.self_attn.k_proj"].reshape(B, T, 2, 16).transpose(0, 2, 1, 3)
    assert bitwise_equal(acts[f"{L0}.self_attn.rope:input"], q_heads)
    assert bitwise_equal(acts[f"{L0}.self_attn.rope#1:input"], k_heads)
    assert f"{L0}.self_attn.rope#2" not in acts


def test_capture_filter_records_only_what_is_asked(llama):
    tr = llama.run(PROMPT, capture=[f"{L0}.mlp", "model.model.layers.*.self_attn.rope#1"])
    assert sorted(tr.activations) == sorted(
        [f"{L0}.mlp"] + [f"model.model.layers.{i}.self_attn.rope#1" for i in range(4)]
    )
    assert bitwise_equal(tr.output, llama.model(tr.inputs))
    with pytest.raises(UnknownNameError, match="was not captured: add it to capture="):
        tr.activations[f"{L0}.self_attn"]
    single = llama.run(PROMPT, capture=f"{L0}:input")
    assert list(single.activations) == [f"{L0}:input"]


def test_captured_values_equal_a_full_trace(llama):
    full = llama.run(PROMPT).activations
    some = llama.run(PROMPT, capture=["model.model.layers.2.mlp.*"]).activations
    assert len(some) == 6  # gate/up/down projections, inputs and outputs
    for name, value in some.items():
        assert bitwise_equal(value, full[name]), name


def test_output_save_and_run(llama):
    with llama.trace(PROMPT) as tr:
        saved = llama.output.save()
    assert bitwise_equal(saved, tr.output)
    assert bitwise_equal(llama.run(PROMPT).output, saved)
    with pytest.raises(TraceError, match="only available inside"):
        llama.output.save()


@pytest.mark.parametrize(
    "inputs",
    [
        "text",
        "texts",
        "ids",
        "array",
        "array1d",
    ],
)
def test_input_kinds_agree(llama, inputs):
    ids = llama.encode(PROMPT)
    given = {
        "text": PROMPT,
        "texts": [PROMPT],
        "ids": ids,
        "array": mx.array([ids]),
        "array1d": mx.array(ids),
    }[inputs]
    tr = llama.run(given)
    assert tr.inputs.tolist() == [ids]
    assert tr.lengths == (len(ids),)
    assert bitwise_equal(tr.output, llama.model(mx.array([ids])))


@pytest.mark.parametrize("which", ["hf_tokenizer", "wrapped_tokenizer"])
def test_tokenizer_helpers(request, llama_module, which):
    tokenizer = request.getfixturevalue(which)
    model = InterpretableModel(llama_module, tokenizer=tokenizer)
    ids = model.encode(PROMPT)
    assert ids == tokenizer.encode(PROMPT)
    assert model.decode(ids) == PROMPT
    assert model.decode(mx.array(ids)) == PROMPT
    assert "".join(model.token_to_str(i) for i in ids) == PROMPT
    assert model.token_to_str(ids[-1]).startswith(" ")  # byte-level BPE keeps the space
    assert model.vocab_size == 300


def test_bare_tokenizers_tokenizer(llama_module, hf_tokenizer):
    model = InterpretableModel(llama_module, tokenizer=hf_tokenizer.backend_tokenizer)
    assert model.encode(PROMPT) == hf_tokenizer.encode(PROMPT)
    assert model.vocab_size == 300
    assert model.decode(model.encode("héllo ✓")) == "héllo ✓"


# -- errors ---------------------------------------------------------------------------------


def test_unknown_name_lists_closest(llama):
    with pytest.raises(UnknownNameError, match=r"Closest names: .*model\.model\.layers\.1\.self_attn\.q_proj"):
        llama.run(PROMPT, capture=["model.model.layers.1.self_attn.q_prj"])
    with pytest.raises(UnknownNameError, match=r"Closest names: .*model\.model\.layers\.1\.mlp"):
        llama.run(PROMPT, interventions={"model.model.layer.1.mlp": iv.zero_out})
    tr = llama.run(PROMPT)
    with pytest.raises(UnknownNameError, match=r"model\.model\.layers\.0\.mlp\.up_proj"):
        tr.activations["model.model.layers.0.mlp.up_prj"]


def test_wrong_shape_or_dtype_names_site_and_shapes(llama):
    site = "model.model.layers.1.mlp"
    T = len(llama.encode(PROMPT))
    with pytest.raises(InterventionError, match=rf"at model\.model\.layers\.1\.mlp returned shape \(1, 3, 64\).*activation there is \(1, {T}, 64\)"):
        llama.run(PROMPT, interventions={site: lambda x: x[:, :3]})
    with pytest.raises(InterventionError, match=rf"returned shape \(1, {T}, 64\) mlx.core.float16.*\(1, {T}, 64\) mlx.core.float32"):
        llama.run(PROMPT, interventions={site: lambda x: x.astype(mx.float16)})
    with pytest.raises(InterventionError, match="returned NoneType.*forget to return"):
        llama.run(PROMPT, interventions={site: lambda x: None})
    with pytest.raises(InterventionError, match=r"at model\.model\.layers\.1\.mlp"):
        llama.run(PROMPT, interventions={site: iv.add_vector(mx.ones((7,)))})


def test_text_without_tokenizer(llama_module):
    with pytest.raises(InputError, match="text input needs a tokenizer"):
        InterpretableModel(llama_module).run(PROMPT)


@pytest.mark.parametrize("empty", ["", [""], [], [[1, 2], []]])
def test_empty_prompt(llama, empty):
    with pytest.raises(InputError, match="empty"):
        llama.run(empty)


def test_capture_pattern_matching_nothing(llama):
    with pytest.raises(UnknownNameError, match="matches no site"):
        llama.run(PROMPT, capture=["model.model.blocks.*"])
    with pytest.raises(UnknownNameError, match=r"matched nothing.*rope x2"):
        llama.run(PROMPT, capture=[f"{L0}.self_attn.rope#3"])
    with pytest.raises(InterventionError, match="never ran"):
        llama.run(PROMPT, interventions={f"{L0}.self_attn.rope#2": iv.zero_out})
    with pytest.raises(UnknownNameError):
        llama.run(PROMPT, capture=[f"{L0}.self_attn.q_proj:output"])
